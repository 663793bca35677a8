"""Entry points the process pool runs inside worker processes.

The pool calls `init_worker` once per process and `classify_batch` per batch. On the default
path (an ONNX runtime and a cached export) no worker imports torch; `model_infos` imports it
only when torchvision models are declared or cached, and the pool runs it in a process of
its own.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from inference.handover import SharedBatch, images_of
from inference.lifetime import Heartbeat, die_with_parent
from inference.onnx_cache import cache_home
from inference.protocol import ModelLoadError, Outcome, WorkerConfig
from inference.specs import ModelInfo, ModelSpec, local_info

if TYPE_CHECKING:
    from inference.engine import Engine

# The per-process model cache (module-level mutable state exists only in worker processes:
# this, and `inference.handover`'s open batch files).
_engine: Engine | None = None


def init_worker(config: WorkerConfig, heartbeat: Heartbeat | None = None) -> None:
    """Pool initializer. A default model that cannot load does not raise here (the pool
    would only say "broken"): `worker_info` reports the reason instead."""
    global _engine
    from inference.engine import Engine

    # Ctrl-C in a terminal signals the whole process group: the parent stops the pool in
    # order; a worker that took the SIGINT itself would die mid-batch with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.parent_pid:
        die_with_parent(config.parent_pid)
    if heartbeat is not None:
        heartbeat.start()
    if config.nice:
        os.nice(config.nice)
    _engine = Engine(config, on_load=heartbeat.model_loaded if heartbeat is not None else None)
    try:
        _engine.model(config.default_model)
    except ModelLoadError as exc:
        _engine.startup_error = str(exc)
    _engine.warm_up()


def worker_info() -> tuple[int, tuple[str, ...], str]:
    """(pid, loaded model names, why the default model did not load or ""): lets the
    service check that workers came up."""
    engine = _current()
    return os.getpid(), tuple(engine.models), engine.startup_error


def classify_batch(model: ModelInfo, images: list[bytes] | SharedBatch, top_k: list[int]) -> list[Outcome]:
    """The images as they are, or where the web process put them (`inference.handover`).
    Raises inference.protocol.ModelLoadError when the model cannot be loaded."""
    return _current().classify(model, images_of(images), top_k)


def needs_torch(declared: list[ModelSpec]) -> bool:
    """Whether `model_infos` imports torch: for torchvision models, declared or in the cache."""
    return any(spec.source == "torchvision" for spec in declared) or _hub_checkpoints()


def model_infos(declared: list[ModelSpec]) -> list[ModelInfo]:
    """Facts about the declared models, then about torchvision weights found in the cache.

    Raises inference.specs.CatalogError for a declaration that can never work."""
    if not needs_torch(declared):
        return [local_info(spec) for spec in declared]
    from inference import zoo  # imports torch

    specs = declared + zoo.discover_cached({spec.name for spec in declared})
    return [zoo.model_info(spec) for spec in specs]


def _hub_checkpoints() -> bool:
    """Whether torch's hub cache holds any weights file (`$TORCH_HOME/hub/checkpoints`, as
    torch.hub documents it), found out without importing torch."""
    hub = Path(os.environ.get("TORCH_HOME") or cache_home() / "torch") / "hub" / "checkpoints"
    return hub.is_dir() and any(hub.iterdir())


def _current() -> Engine:
    if _engine is None:
        raise RuntimeError("init_worker() has not run in this process")
    return _engine
