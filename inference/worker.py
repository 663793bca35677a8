"""Entry points the process pool runs inside worker processes.

The pool calls `init_worker` once per process and `classify_batch` per batch. This module
imports torch only inside `init_worker` (through `inference.engine`), so the web process
can hand these functions to the executor without loading torch itself.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from inference.protocol import Outcome, WorkerConfig

if TYPE_CHECKING:
    from inference.engine import Engine

# The per-process model cache: the only module-level mutable state in the project.
_engine: Engine | None = None


def init_worker(config: WorkerConfig) -> None:
    """Pool initializer: raise here and the pool is broken, which is what start-up wants."""
    global _engine
    import torch

    from inference.engine import Engine

    if config.nice:
        os.nice(config.nice)
    torch.set_num_threads(config.threads)
    _engine = Engine(config)
    _engine.model(config.default_model)


def worker_info() -> tuple[int, tuple[str, ...]]:
    """(pid, loaded model names): lets the service check that workers came up."""
    return os.getpid(), tuple(_current().models)


def classify_batch(model_name: str, images: list[bytes], top_k: list[int]) -> list[Outcome]:
    """Raises inference.protocol.ModelLoadError when the model cannot be loaded."""
    return _current().classify(model_name, images, top_k)


def _current() -> Engine:
    if _engine is None:
        raise RuntimeError("init_worker() has not run in this process")
    return _engine
