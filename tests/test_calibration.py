"""int8's calibration: which set it is made of, its cache key, what it measured, and how
the agreement with fp32 follows the refine margin (fast: no quantization here; the real
one runs in tests/test_int8.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from inference import int8_cache
from inference.calibration import sample_pixels, user_pixels
from inference.int8_cache import Calibration, Int8Entry
from inference.onnx_cache import Entry
from inference.specs import EMBEDDED, Preprocessing

EXPORT = Entry(Path("/cache/efficientnet_lite0-0123456789abcdef.onnx"), Path("/cache/x.json"))


def test_the_agreement_counts_refined_images_as_agreeing() -> None:
    measured = Calibration(
        images=300,
        fp32_top1=(1, 2, 3, 4),
        int8_top1=(1, 9, 3, 8),
        int8_gap=(5.0, 0.1, 2.0, 0.3),
        source="shipped photos",
    )
    assert measured.agreement(0) == 0.5  # 2 of 4 without refining
    assert measured.agreement(0.2) == 0.75 and measured.refined_share(0.2) == 0.25  # the 0.1 one refined
    assert measured.agreement(0.5) == 1.0 and measured.refined_share(0.5) == 0.5
    assert Calibration.from_json(measured.to_json()) == measured


def test_the_shipped_set_is_diverse_deterministic_and_as_the_service_preprocesses() -> None:
    first = sample_pixels(EMBEDDED.preprocessing, 32, seed=5)
    assert first.shape == (32, 224, 224, 3) and first.dtype == np.uint8
    assert np.array_equal(first, sample_pixels(EMBEDDED.preprocessing, 32, seed=5))
    assert not np.array_equal(first, sample_pixels(EMBEDDED.preprocessing, 32, seed=6))  # the hold-out's differ
    assert len(list(int8_cache.PHOTOS_DIR.glob("*.jpg"))) == 16  # every scene once in 16 images
    grayscale = [np.array_equal(pixels[..., 0], pixels[..., 2]) for pixels in first]
    assert 0 < sum(grayscale) < len(first)


def test_a_users_calibration_dir_keeps_every_third_image_for_the_hold_out(
    tmp_path: Path, photos: dict[str, bytes]
) -> None:
    for number in range(45):
        (tmp_path / f"{number:02}.jpg").write_bytes(list(photos.values())[number % 3])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    calibration, hold_out = user_pixels(tmp_path, EMBEDDED.preprocessing)
    assert (len(calibration), len(hold_out)) == (30, 15)
    for path in list(tmp_path.glob("*.jpg"))[:20]:
        path.unlink()
    with pytest.raises(ValueError, match="holds 25 usable images; calibration needs at least 30"):
        user_pixels(tmp_path, EMBEDDED.preprocessing)


def test_the_cache_key_follows_the_export_and_the_calibration_set(tmp_path: Path) -> None:
    shipped = int8_cache.entry_for(EXPORT, None)
    assert shipped == int8_cache.entry_for(EXPORT, None)
    assert shipped.xml.name.startswith("efficientnet_lite0-0123456789abcdef.int8-") and shipped.xml.suffix == ".xml"
    other_export = Entry(EXPORT.onnx.with_name("efficientnet_lite0-fedcba9876543210.onnx"), EXPORT.meta)
    assert int8_cache.entry_for(other_export, None) != shipped
    (tmp_path / "a.jpg").write_bytes(b"one")
    mine = int8_cache.entry_for(EXPORT, tmp_path)
    assert mine != shipped
    (tmp_path / "b.jpg").write_bytes(b"two")
    assert int8_cache.entry_for(EXPORT, tmp_path) != mine  # a new image: calibrated again
    (tmp_path / "b.jpg").unlink()
    (tmp_path / "readme.txt").write_text("not an image")
    assert int8_cache.entry_for(EXPORT, tmp_path) == mine


def test_an_entry_is_its_three_files_and_the_xml_comes_last(tmp_path: Path) -> None:
    entry = Int8Entry(tmp_path / "m.int8-abc.xml")
    assert (entry.bin.name, entry.meta.name, entry.lock.name) == (
        "m.int8-abc.bin",
        "m.int8-abc.json",
        "m.int8-abc.lock",
    )
    for path in (entry.xml, entry.bin, entry.meta):
        path.write_text("x")
    entry.remove()
    assert not os.listdir(tmp_path)


def test_the_preprocessing_reaches_the_calibrating_child_as_it_is() -> None:
    for preprocessing in (EMBEDDED.preprocessing, Preprocessing(160, 182, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))):
        text = int8_cache.preprocessing_to_json(preprocessing)
        assert int8_cache.preprocessing_from_json(text) == preprocessing
