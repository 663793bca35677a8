"""The model catalog and the inference pool as the settings ask for them: shared by the web
process (`service.app`) and the standalone worker (`service.worker`)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from inference import onnx_cache
from inference.protocol import ModelLoadError, WorkerConfig
from inference.specs import ONNX_RUNTIMES, ModelInfo
from service.pool.catalog import ModelCatalog
from service.pool.process import ProcessInferencePool, describe_models
from service.settings import Settings

log = logging.getLogger(__name__)


async def build_catalog(settings: Settings) -> ModelCatalog:
    """Find out about every declared model and the torchvision weights in the cache."""
    infos = await describe_models(settings.model_specs())
    # Weights found in the cache were not declared: they run at the service's precision.
    catalog = ModelCatalog(
        [replace(info, spec=settings.resolve_precision(info.spec)) for info in infos], settings.default_model
    )
    log.info(
        "models: %s",
        ", ".join(
            f"{info.name} ({info.spec.source}, {info.spec.precision}"
            f"{'' if info.weights_present() else ', weights missing'})"
            for info in catalog.infos()
        ),
    )
    return catalog


async def export_default(settings: Settings, catalog: ModelCatalog) -> None:
    """Make the default model's ONNX export here, before the workers start, if it is not
    cached yet: the first start on a machine then says what it is doing for those seconds
    (the workers would make it too, but their logs are not the service's). A failure is left
    for the workers to report as the reason the default model cannot load."""
    info = catalog.info(settings.default_model)
    if settings.resolved_runtime() not in ONNX_RUNTIMES or info.spec.is_graph or not info.weights_present():
        return
    await asyncio.to_thread(_export, info, settings.model_cache_dir)


def _export(info: ModelInfo, cache_dir: Path) -> None:
    try:
        if onnx_cache.entry_for(info, cache_dir).onnx.is_file():
            return
    except OSError:
        return
    log.info("exporting %s to ONNX (once per machine) into %s...", info.name, cache_dir)
    started = time.monotonic()
    try:
        onnx_cache.ensure(info, cache_dir)
    except ModelLoadError:
        return
    log.info("exported %s in %.1f s", info.name, time.monotonic() - started)


def worker_config(settings: Settings, catalog: ModelCatalog) -> WorkerConfig:
    """What each worker process is started with, the default model it loads included."""
    return WorkerConfig(
        default_model=catalog.info(settings.default_model),
        runtime=settings.resolved_runtime(),
        threads=settings.resolved_threads(),
        max_pixels=settings.max_image_pixels,
        model_cache_dir=settings.model_cache_dir,
        batch_size=settings.batch_size,
        parent_pid=os.getpid(),
        nice=settings.worker_nice,
        max_loaded_models=settings.max_loaded_models,
        refine_margin=settings.refine_margin,
    )


def make_pool(settings: Settings, catalog: ModelCatalog) -> ProcessInferencePool:
    """The workers (not started yet)."""
    return ProcessInferencePool(settings.resolved_workers(), worker_config(settings, catalog), settings.batch_timeout)
