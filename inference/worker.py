"""Entry points the process pool runs inside worker processes.

The pool calls `init_worker` once per process and `classify_batch` per batch. This module
imports torch only inside `init_worker` (through `inference.engine`), so the web process
can hand these functions to the executor without loading torch itself.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from inference.protocol import ModelLoadError, Outcome, WorkerConfig
from inference.specs import ModelInfo, ModelSpec

if TYPE_CHECKING:
    from inference.engine import Engine

# The per-process model cache: the only module-level mutable state in the project.
_engine: Engine | None = None


def init_worker(config: WorkerConfig) -> None:
    """Pool initializer. A default model that cannot load does not raise here (the pool
    would only say "broken"): `worker_info` reports the reason instead."""
    global _engine
    import torch

    from inference.engine import Engine

    if config.nice:
        os.nice(config.nice)
    torch.set_num_threads(config.threads)
    _engine = Engine(config)
    try:
        _engine.model(config.default_model)
    except ModelLoadError as exc:
        _engine.startup_error = str(exc)


def worker_info() -> tuple[int, tuple[str, ...], str]:
    """(pid, loaded model names, why the default model did not load or ""): lets the
    service check that workers came up."""
    engine = _current()
    return os.getpid(), tuple(engine.models), engine.startup_error


def classify_batch(model: ModelSpec, images: list[bytes], top_k: list[int]) -> list[Outcome]:
    """Raises inference.protocol.ModelLoadError when the model cannot be loaded."""
    return _current().classify(model, images, top_k)


def model_infos(declared: list[ModelSpec]) -> list[ModelInfo]:
    """Facts about the declared models, then about torchvision weights found in the cache.

    Raises inference.specs.CatalogError for a declaration that can never work."""
    from inference import zoo

    specs = declared + zoo.discover_cached({spec.name for spec in declared})
    return [zoo.model_info(spec) for spec in specs]


def _current() -> Engine:
    if _engine is None:
        raise RuntimeError("init_worker() has not run in this process")
    return _engine
