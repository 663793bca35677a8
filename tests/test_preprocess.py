"""Decoding untrusted bytes: formats, modes, orientation, draft decoding and rejections."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from inference.preprocess import ImageRejected, decode_image, normalize, preprocess, to_input
from inference.specs import EMBEDDED

INFO = EMBEDDED.preprocessing
assert INFO is not None
MAX_PIXELS = 40_000_000


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_photo_becomes_input_pixels_then_a_normalised_array(photos: dict[str, bytes]) -> None:
    pixels = preprocess(photos["coffee"], INFO, MAX_PIXELS)
    assert pixels.shape == (224, 224, 3)
    assert pixels.dtype == np.uint8
    array = normalize(pixels[np.newaxis], INFO)
    assert array.shape == (1, 3, 224, 224)
    assert array.dtype == np.float32
    assert array.flags.c_contiguous
    # TF-Lite normalisation maps 0..255 to about -0.99..1.0
    assert -1.0 <= float(array.min()) < 0 < float(array.max()) <= 1.0


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 256), (1024, 1024)])
def test_resize_crop_and_normalise_match_torchvision(photos: dict[str, bytes], size: tuple[int, int]) -> None:
    """The Pillow/numpy path gives torchvision's Resize(antialias) / CenterCrop / Normalize
    result, up to the rounding of a resampled pixel (one step of 255)."""
    image = Image.open(io.BytesIO(photos["rocket"])).convert("RGB").resize(size)
    expected = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(INFO.resize_size, antialias=True),
            v2.CenterCrop(INFO.input_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(INFO.mean), std=list(INFO.std)),
        ]
    )(image)
    difference = np.abs(normalize(to_input(image, INFO)[np.newaxis], INFO)[0] - expected.numpy())
    one_step = 1 / (255 * min(INFO.std))
    assert difference.max() <= one_step + 1e-5
    assert difference.mean() < one_step / 4


def test_large_jpegs_are_draft_decoded_but_keep_enough_pixels(photos: dict[str, bytes]) -> None:
    big = Image.open(io.BytesIO(photos["coffee"])).resize((1920, 1280))
    image = decode_image(encode(big, "JPEG", quality=90), min_side=256, max_pixels=MAX_PIXELS)
    assert image.mode == "RGB"
    assert min(image.size) >= 256
    assert image.size[0] <= 1920 // 2  # the DCT-domain downscale happened


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("RGB", "TIFF"),
        ("P", "GIF"),
    ],
)
def test_any_mode_and_common_format_becomes_rgb(mode: str, fmt: str) -> None:
    if mode == "I;16":
        source = Image.new("I;16", (300, 280))
        source.putpixel((10, 10), 65535)
    else:
        source = Image.new("RGB", (300, 280), (200, 30, 30)).convert(mode)
    image = decode_image(encode(source, fmt), min_side=256, max_pixels=MAX_PIXELS)
    assert image.mode == "RGB"
    assert image.size == (300, 280)
    if mode == "I;16":
        assert image.getpixel((10, 10)) == (255, 255, 255)  # scaled, not clipped
        assert image.getpixel((0, 0)) == (0, 0, 0)


def test_transparent_pixels_become_white() -> None:
    source = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    image = decode_image(encode(source, "PNG"), min_side=256, max_pixels=MAX_PIXELS)
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (400, 300), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image = decode_image(encode(source, "JPEG", exif=exif), min_side=256, max_pixels=MAX_PIXELS)
    assert image.size == (300, 400)


@pytest.mark.parametrize(
    "data",
    [b"", b"plain text, not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 100],
    ids=["empty", "text", "jpeg-magic-then-garbage"],
)
def test_non_images_are_rejected(data: bytes) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, min_side=256, max_pixels=MAX_PIXELS)
    assert caught.value.code == "not_an_image"


def test_truncated_jpeg_is_rejected(photos: dict[str, bytes]) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image(photos["coffee"][: len(photos["coffee"]) // 2], min_side=256, max_pixels=MAX_PIXELS)
    assert caught.value.code == "not_an_image"


def test_pixel_cap_is_checked_before_decoding() -> None:
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, min_side=256, max_pixels=3000 * 3000 - 1)
    assert caught.value.code == "image_too_large"
    assert str(caught.value) == "image is 3000x3000 pixels, above the limit of 8999999 (--max-image-pixels)"


def test_large_non_jpeg_images_are_reduced_before_the_exact_resize(photos: dict[str, bytes]) -> None:
    big = Image.open(io.BytesIO(photos["rocket"])).resize((2400, 1600))
    image = decode_image(encode(big, "PNG"), min_side=256, max_pixels=MAX_PIXELS)
    assert 256 <= min(image.size) < 2 * 256
    assert image.size == (400, 267)  # reduced by 1600 // 256 = 6, rounding up


def test_the_simd_resize_stays_within_rounding_of_pillows(photos: dict[str, bytes]) -> None:
    """`to_input` resizes with fast_image_resize (cykooz-resizer); Pillow's own antialiased
    bilinear resize of the same box gives the same pixels up to rounding: one step, two in
    a few pixels of millions (measured 1 in 2.5 million)."""
    differences = []
    for name, data in photos.items():
        for size in [(640, 480), (481, 777), (300, 256), (1600, 1200)]:
            image = Image.open(io.BytesIO(data)).convert("RGB").resize(size)
            width, height = image.size
            if width <= height:
                resized = (INFO.resize_size, int(INFO.resize_size * height / width))
            else:
                resized = (int(INFO.resize_size * width / height), INFO.resize_size)
            left, top = round((resized[0] - INFO.input_size) / 2), round((resized[1] - INFO.input_size) / 2)
            x, y = width / resized[0], height / resized[1]
            box = (left * x, top * y, (left + INFO.input_size) * x, (top + INFO.input_size) * y)
            pillows = image.resize((INFO.input_size, INFO.input_size), Image.Resampling.BILINEAR, box=box)
            ours = to_input(image, INFO)
            assert ours.shape == (INFO.input_size, INFO.input_size, 3) and ours.dtype == np.uint8, name
            differences.append(np.abs(ours.astype(int) - np.asarray(pillows, dtype=int)).ravel())
    every = np.concatenate(differences)
    assert every.max() <= 2
    assert (every > 1).mean() < 1e-5
    assert (every == 0).mean() > 0.8
