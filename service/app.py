"""The application factory and the lifetimes of its resources."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from inference.catalog import declared_specs
from inference.protocol import WorkerConfig
from service.appkeys import (
    CATALOG,
    DISPATCHER,
    METRICS,
    POOL,
    REGISTRY,
    SESSION,
    SETTINGS,
    SUBMIT_FORM,
    SUBMIT_REQUEST,
    UPLOAD_BUDGET,
)
from service.auth import auth_middleware
from service.catalog import ModelCatalog
from service.dispatcher import Dispatcher
from service.docs import add_docs
from service.errors import error_middleware
from service.fetcher import make_session
from service.handlers import routes
from service.metrics import Metrics
from service.page import add_page
from service.pool import ProcessInferencePool
from service.registry import InMemoryRegistry
from service.schemas import SubmitForm, SubmitRequest
from service.settings import Settings
from service.uploads import UploadBudget

log = logging.getLogger(__name__)


async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the workers with the default model loaded, then have one of them describe every
    declared model and the torchvision weights in the cache (the catalog)."""
    settings = app[SETTINGS]
    specs = declared_specs(settings.models, settings.models_file)
    config = WorkerConfig(
        default_model=next(spec for spec in specs if spec.name == settings.default_model),
        runtime=settings.runtime,
        threads=settings.resolved_threads(),
        max_pixels=settings.max_image_pixels,
        nice=settings.worker_nice,
        max_loaded_models=settings.max_loaded_models,
    )
    pool = ProcessInferencePool(settings.resolved_workers(), config, settings.batch_timeout)
    try:
        await pool.check_started()
        catalog = ModelCatalog(await pool.describe(specs), settings.default_model)
        log.info("models: %s", ", ".join(
            f"{entry.name} ({entry.source}{'' if entry.weights_present else ', weights missing'})"
            for entry in catalog.entries()
        ))
        app[POOL] = pool
        app[CATALOG] = catalog
        yield
    finally:
        await pool.close()


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    async with make_session(app[SETTINGS]) as session:
        app[SESSION] = session
        yield


async def dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    dispatcher = Dispatcher(
        app[REGISTRY], app[POOL], app[SESSION], settings,
        consumers=settings.resolved_workers(), metrics=app[METRICS], catalog=app[CATALOG],
    )
    app[DISPATCHER] = dispatcher
    yield
    await dispatcher.close()


async def drain_tasks(app: web.Application) -> None:
    """On shutdown (new connections are already refused): give active tasks the grace
    period to finish; whatever is left is cancelled when the dispatcher closes."""
    registry, grace = app[REGISTRY], app[SETTINGS].shutdown_grace
    unfinished = await registry.unfinished_images()
    if unfinished:
        log.info("shutting down: waiting up to %gs for %d unfinished images", grace, unfinished)
    deadline = asyncio.get_running_loop().time() + grace
    while await registry.unfinished_images() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)


def create_app(settings: Settings) -> web.Application:
    middlewares = [error_middleware]  # outermost: it renders every error below it as JSON
    if settings.api_key_list():
        middlewares.append(auth_middleware(settings.api_key_list()))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_request_bytes)
    app[SETTINGS] = settings
    app[REGISTRY] = InMemoryRegistry(settings.finished_task_ttl, settings.max_finished_tasks)
    app[METRICS] = Metrics()
    app[SUBMIT_REQUEST] = SubmitRequest.limited(
        max_urls=settings.max_urls_per_task, max_url_length=settings.max_url_length, max_top_k=settings.max_top_k
    )
    app[SUBMIT_FORM] = SubmitForm.limited(
        max_items=settings.max_urls_per_task, max_url_length=settings.max_url_length, max_top_k=settings.max_top_k
    )
    app[UPLOAD_BUDGET] = UploadBudget(settings.max_upload_bytes)
    # Started in this order, closed in reverse: the dispatcher stops before the session and pool.
    app.cleanup_ctx.extend([pool_ctx, session_ctx, dispatcher_ctx])
    app.on_shutdown.append(drain_tasks)
    app.add_routes(routes)
    add_page(app)
    add_docs(app)  # last: the OpenAPI document describes every route added before it
    return app
