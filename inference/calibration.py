"""The images int8 calibration is made of, and the hold-out its agreement with fp32 is measured on.

By default both are made from the sixteen scenes shipped in `inference/photos/` (people,
animals, food, sky, medical, textures, text, grayscale): random crops, mirrored or not,
scaled to camera sizes and JPEG-compressed, then preprocessed exactly as the service does,
so that the quantizer sees the pixel statistics the model will meet. The two sets are
drawn with different seeds: the hold-out holds crops the quantizer never saw (of the same
scenes). With `--calibration-dir` they are the user's own images instead, every third one
held out.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from inference.int8_cache import IMAGE_SUFFIXES, PHOTOS_DIR
from inference.preprocess import ImageRejected, preprocess
from inference.specs import Preprocessing

CALIBRATION_SEED, HOLD_OUT_SEED = 11, 12
MAX_PIXELS = 40_000_000


def sample_pixels(info: Preprocessing, count: int, seed: int) -> np.ndarray:
    """`count` inputs (N, H, W, 3) uint8 made of the shipped photos."""
    rng = random.Random(seed)
    sources = [Image.open(path).convert("RGB") for path in sorted(PHOTOS_DIR.glob("*.jpg"))]
    made = []
    for number in range(count):
        source = sources[number % len(sources)]  # every scene equally often
        width, height = source.size
        crop_w, crop_h = int(width * rng.uniform(0.5, 1.0)), int(height * rng.uniform(0.5, 1.0))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        image = source.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        scale = rng.uniform(640, 1600) / max(crop_w, crop_h)
        image = image.resize((max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.Resampling.BILINEAR)
        if rng.random() < 1 / 6:
            image = image.convert("L")
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(60, 95))
        made.append(preprocess(buffer.getvalue(), info, MAX_PIXELS))
    return np.stack(made)


def user_pixels(directory: Path, info: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, hold-out) from the images in `directory` (every third held out);
    files that are not images are skipped. Raises ValueError when too few are usable."""
    paths = sorted(path for path in directory.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    inputs = []
    for path in paths:
        try:
            inputs.append(preprocess(path.read_bytes(), info, MAX_PIXELS))
        except (ImageRejected, OSError):
            continue
    if len(inputs) < 30:
        raise ValueError(f"{directory} holds {len(inputs)} usable images; calibration needs at least 30")
    held = [pixels for number, pixels in enumerate(inputs) if number % 3 == 2]
    kept = [pixels for number, pixels in enumerate(inputs) if number % 3 != 2]
    return np.stack(kept), np.stack(held)
