"""The model catalog and the inference pool as the settings ask for them: shared by the web
process (`service.app`) and the standalone worker (`service.worker`)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace

from inference import int8_cache, onnx_cache
from inference.int8_cache import Calibration
from inference.protocol import ModelLoadError, WorkerConfig
from inference.specs import ONNX_RUNTIMES, ModelInfo, margin_for
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


async def prepare_models(settings: Settings, catalog: ModelCatalog, make: bool = True) -> None:
    """Make the default model's ONNX export and calibrate the int8 models here, before the
    workers start, if they are not cached yet: the first start on a machine then says what
    it is doing for those seconds (the workers would make them too, but their logs are not
    the service's), and /models can show what each calibration measured. A failure is left
    for the workers to report as the reason the model cannot load. With `make` false (a
    web-only replica) only what is cached already is read."""
    if settings.resolved_runtime() not in ONNX_RUNTIMES:
        return
    for info in catalog.infos():
        if info.spec.is_graph or not info.weights_present():
            continue
        if info.name == settings.default_model or info.precision == "int8":
            calibration = await asyncio.to_thread(_prepare, info, settings, make)
            if calibration is not None:
                catalog.calibrated(info.name, calibration)


def _prepare(info: ModelInfo, settings: Settings, make: bool) -> Calibration | None:
    cache_dir = settings.model_cache_dir
    try:
        export = onnx_cache.entry_for(info, cache_dir)
        if not export.onnx.is_file():
            if not make:
                return None
            log.info("exporting %s to ONNX (once per machine) into %s...", info.name, cache_dir)
            started = time.monotonic()
            onnx_cache.ensure(info, cache_dir)
            log.info("exported %s in %.1f s", info.name, time.monotonic() - started)
        if info.precision != "int8":
            return None
        entry = int8_cache.entry_for(export, settings.calibration_dir)
        if not entry.xml.is_file():
            if not make:
                return None
            log.info("calibrating %s for int8 (once per model and calibration set)...", info.name)
            started = time.monotonic()
            int8_cache.ensure(info, export, settings.calibration_dir)
            log.info("calibrated %s in %.1f s", info.name, time.monotonic() - started)
        calibration = entry.calibration()
    except (OSError, ValueError, KeyError, ModelLoadError) as exc:
        log.warning("model %s: %s", info.name, exc)
        return None
    margin = margin_for("int8", settings.refine_margin)
    log.info(
        "%s in int8: top-1 agreement with fp32 %.1f%% on %d held-out images (%.0f%% of them refined at margin %g; "
        "%.1f%% without refining)",
        info.name,
        100 * calibration.agreement(margin),
        len(calibration.fp32_top1),
        100 * calibration.refined_share(margin),
        margin,
        100 * calibration.agreement(0),
    )
    return calibration


def worker_config(settings: Settings, catalog: ModelCatalog) -> WorkerConfig:
    """What each worker process is started with, the default model it loads included."""
    return WorkerConfig(
        default_model=catalog.info(settings.default_model),
        runtime=settings.resolved_runtime(),
        threads=settings.resolved_threads(),
        max_pixels=settings.max_image_pixels,
        model_cache_dir=settings.model_cache_dir,
        batch_size=settings.resolved_batch_size(),
        parent_pid=os.getpid(),
        nice=settings.worker_nice,
        max_loaded_models=settings.max_loaded_models,
        refine_margin=settings.refine_margin,
        calibration_dir=settings.calibration_dir,
    )


def make_pool(settings: Settings, catalog: ModelCatalog) -> ProcessInferencePool:
    """The workers (not started yet)."""
    return ProcessInferencePool(settings.resolved_workers(), worker_config(settings, catalog), settings.batch_timeout)
