"""Make a deterministic set of realistic JPEGs (640x480 .. 1600x1200) from the test photos."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageOps

PHOTOS_DIR = Path(__file__).resolve().parent.parent / "tests" / "photos"


def make_images(count: int, seed: int = 1234) -> list[bytes]:
    rng = random.Random(seed)
    sources = [Image.open(path).convert("RGB") for path in sorted(PHOTOS_DIR.glob("*.jpg"))]
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
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=rng.randint(70, 95))
        images.append(buffer.getvalue())
    return images
