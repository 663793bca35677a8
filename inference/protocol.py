"""What crosses between the service and the worker processes: config, results, errors.

Plain picklable data with no torch import, so the web process can use it without loading
torch (importing torch costs ~900 MiB of RSS with the PyPI build).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inference.specs import ModelInfo, Runtime


@dataclass(frozen=True)
class WorkerConfig:
    default_model: ModelInfo  # loaded at start and never evicted
    runtime: Runtime
    threads: int
    max_pixels: int
    model_cache_dir: Path  # ONNX exports (inference.onnx_cache)
    batch_size: int = 16  # a model runs one batch this big when it loads, so the first real one is not slow
    parent_pid: int = 0  # the web process: a worker ends with it (0: do not watch)
    nice: int = 0  # added to the worker's niceness: the web process then wins the CPU
    max_loaded_models: int = 3  # the default included; least recently used ones go first
    # bf16/int8 images whose two best scores are closer are redone in fp32 (0: never; None:
    # the precision's measured margin, inference.specs.REFINE_MARGINS)
    refine_margin: float | None = None
    calibration_dir: Path | None = None  # int8 calibration images (None: made of the shipped photos)


@dataclass(frozen=True)
class Label:
    """One of an image's top classes. The service stores and serves this very type (task
    records validate it as a pydantic dataclass field), so nothing is copied field by field."""

    label: str
    class_index: int
    score: float


@dataclass(frozen=True)
class Prediction:
    labels: tuple[Label, ...]
    refined: bool = False  # classified again in fp32: bf16 was unsure of it (see inference.models)


@dataclass(frozen=True)
class Rejection:
    """An image this service will not classify; `code` is API-stable."""

    code: str
    message: str


Outcome = Prediction | Rejection


class ModelLoadError(Exception):
    """A model is unknown or its weights cannot be loaded."""
