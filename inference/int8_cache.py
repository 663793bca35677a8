"""int8 models, calibrated once per ONNX export and calibration set, cached beside the export.

An entry is `<export stem>.int8-<key>.{json,bin,xml}`: the key hashes the export's name
(itself keyed by the weights), the calibration set (the shipped photos' bytes, or the
files of `--calibration-dir` by name, size and time) and the quantizer's version, so new
weights or a new calibration set never reuse an old model. `.json` (what the calibration
measured) and `.bin` are renamed into place before `.xml`, so an `.xml` that exists is
complete. A missing entry is made by `python -m inference.quantize` in a child process
(NNCF imports torch; no worker should), under a lock file, as exports are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from inference.onnx_cache import Entry, made_once, preprocessing_from_fields, run_child
from inference.protocol import ModelLoadError
from inference.specs import ModelInfo, Preprocessing

log = logging.getLogger(__name__)

PHOTOS_DIR = Path(__file__).resolve().parent / "photos"  # the shipped photos (inference.calibration)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

QUANTIZE_VERSION = 3  # bump when inference.quantize changes what it writes (2: logit gaps; 3: full bias correction)
QUANTIZE_TIMEOUT = 900.0  # seconds; the embedded model calibrates in about 20 s on 2 cores


@dataclass(frozen=True)
class Calibration:
    """What the calibration measured on its hold-out: for each held-out image, fp32's best
    class, int8's best class and the gap between int8's two best logits
    (`inference.models.top_two_gap`). Enough to tell the top-1 agreement with fp32 at any
    refine margin (`agreement`)."""

    images: int  # in the calibration set proper
    fp32_top1: tuple[int, ...]
    int8_top1: tuple[int, ...]
    int8_gap: tuple[float, ...]
    source: str  # "shipped photos" or the directory

    def agreement(self, refine_margin: float) -> float:
        """The share of hold-out images whose top-1 is fp32's, where images with an int8
        gap below `refine_margin` are classified again in fp32 (so agree)."""
        agreeing = sum(
            1
            for fp32, int8, gap in zip(self.fp32_top1, self.int8_top1, self.int8_gap, strict=True)
            if gap < refine_margin or fp32 == int8
        )
        return agreeing / max(1, len(self.fp32_top1))

    def refined_share(self, refine_margin: float) -> float:
        return sum(1 for gap in self.int8_gap if gap < refine_margin) / max(1, len(self.int8_gap))

    def to_json(self) -> str:
        return json.dumps(
            {
                "images": self.images,
                "fp32_top1": self.fp32_top1,
                "int8_top1": self.int8_top1,
                "int8_gap": self.int8_gap,
                "source": self.source,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        fields = json.loads(text)
        return cls(
            images=int(fields["images"]),
            fp32_top1=tuple(int(value) for value in fields["fp32_top1"]),
            int8_top1=tuple(int(value) for value in fields["int8_top1"]),
            int8_gap=tuple(float(value) for value in fields["int8_gap"]),
            source=str(fields["source"]),
        )


@dataclass(frozen=True)
class Int8Entry:
    xml: Path

    @property
    def bin(self) -> Path:
        return self.xml.with_suffix(".bin")

    @property
    def meta(self) -> Path:
        return self.xml.with_suffix(".json")

    @property
    def lock(self) -> Path:
        return self.xml.with_suffix(".lock")

    def calibration(self) -> Calibration:
        return Calibration.from_json(self.meta.read_text())

    def remove(self) -> None:
        for path in (self.xml, self.bin, self.meta):
            path.unlink(missing_ok=True)


def entry_for(export: Entry, calibration_dir: Path | None) -> Int8Entry:
    digest = hashlib.sha256(f"{export.onnx.name}:v{QUANTIZE_VERSION}".encode())
    if calibration_dir is None:
        for path in sorted(PHOTOS_DIR.glob("*.jpg")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    else:
        digest.update(str(calibration_dir.resolve()).encode())
        for path in sorted(calibration_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                stat = path.stat()
                digest.update(f"{path.relative_to(calibration_dir)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return Int8Entry(export.onnx.with_name(f"{export.onnx.stem}.int8-{digest.hexdigest()[:12]}.xml"))


def ensure(info: ModelInfo, export: Entry, calibration_dir: Path | None) -> Int8Entry:
    """The int8 model of `export`, calibrated first if it is not cached; raises ModelLoadError."""
    try:
        entry = entry_for(export, calibration_dir)
    except OSError as exc:
        raise ModelLoadError(f"the calibration set {calibration_dir} cannot be read: {exc}") from exc
    if not entry.xml.is_file():
        made_once(entry.xml, entry.lock, lambda: _quantize(info, export, entry, calibration_dir))
    return entry


def _quantize(info: ModelInfo, export: Entry, entry: Int8Entry, calibration_dir: Path | None) -> None:
    log.debug("calibrating model %s for int8 into %s (once per export and calibration set)", info.name, entry.xml)
    arguments = ["inference.quantize", "--onnx", str(export.onnx), "--to", str(entry.xml)]
    arguments += ["--preprocessing", preprocessing_to_json(info.preprocessing)]
    if calibration_dir is not None:
        arguments += ["--calibration-dir", str(calibration_dir)]
    run_child(
        arguments,
        entry.xml,
        QUANTIZE_TIMEOUT,
        doing=f"calibrating model {info.name!r} for int8",
        failing=f"model {info.name!r} could not be calibrated for int8",
    )


def preprocessing_to_json(info: Preprocessing) -> str:
    return json.dumps(dataclasses.asdict(info))


def preprocessing_from_json(text: str) -> Preprocessing:
    return preprocessing_from_fields(json.loads(text))
