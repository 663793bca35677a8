"""Deterministic sets of realistic JPEGs (640x480 .. 1600x1200) to benchmark with.

- `make_images`: the bench's photos, crops of the three test photos (`tests/photos/`).
- `make_diverse_images`: a diverse mix made of the sixteen scenes in `inference/photos/`
  (people, animals, food, sky, medical, textures, text), a sixth of it grayscale JPEGs,
  at mixed qualities: photos on which fp32 itself often hesitates between two labels.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageOps

from inference.int8_cache import PHOTOS_DIR as DIVERSE_DIR

PHOTOS_DIR = Path(__file__).resolve().parent.parent / "tests" / "photos"


def make_images(count: int, seed: int = 1234) -> list[bytes]:
    return _made(sorted(PHOTOS_DIR.glob("*.jpg")), count, seed, grayscale_share=0.0)


def make_diverse_images(count: int, seed: int = 4321) -> list[bytes]:
    return _made(sorted(DIVERSE_DIR.glob("*.jpg")), count, seed, grayscale_share=1 / 6)


def _made(paths: list[Path], count: int, seed: int, grayscale_share: float) -> list[bytes]:
    rng = random.Random(seed)
    sources = [Image.open(path).convert("RGB") for path in paths]
    images = []
    for _ in range(count):
        source = rng.choice(sources)
        width, height = source.size
        # A random crop of 60-100% of each side, maybe mirrored, scaled to a camera-like size.
        crop_w, crop_h = int(width * rng.uniform(0.6, 1.0)), int(height * rng.uniform(0.6, 1.0))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        image = source.crop((left, top, left + crop_w, top + crop_h))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        target_w = rng.randint(640, 1600)
        target_h = max(480, min(1200, round(target_w * rng.choice((0.75, 0.667, 0.5625)))))
        image = image.resize((target_w, target_h), Image.Resampling.BILINEAR)
        if rng.random() < grayscale_share:
            image = image.convert("L")
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(70, 95))
        images.append(buffer.getvalue())
    return images
