"""The application factory and the lifetimes of its resources.

Started in order and closed in reverse (`cleanup_ctx`): the backend (task store and image
queue, `service.backend`), the webhook sender, the model catalog and the inference pool, then
the download session and the task engine that uses them. On shutdown, running tasks get
`--shutdown-grace` seconds before what is left is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from service.api import events, operations, results, tasks
from service.api.appkeys import (
    BACKEND,
    CATALOG,
    CLOSING,
    CONNECTIONS,
    ENGINE,
    METRICS,
    POOL,
    REGISTRY,
    SETTINGS,
    SUBMIT_FORM,
    SUBMIT_KEYS,
    SUBMIT_REQUEST,
    UPLOAD_BUDGET,
    WEBHOOKS,
)
from service.api.auth import auth_middleware
from service.api.connections import ConnectionLimits, Connections
from service.api.docs import add_docs
from service.api.errors import error_middleware
from service.api.idempotency import KeyLocks
from service.api.page import add_page
from service.api.schemas import SubmitForm, SubmitRequest
from service.backend import open_backend
from service.fetch.fetcher import make_session
from service.metrics import Metrics
from service.pool import InferencePool
from service.pool.factory import build_catalog, make_pool, prepare_models
from service.settings import Settings
from service.tasks.classifier import CONSUMERS_PER_WORKER
from service.tasks.engine import TaskEngine
from service.tasks.fleet import WorkerIdentity
from service.tasks.uploads import UploadBudget
from service.webhooks.sender import WebhookSender

log = logging.getLogger(__name__)


async def backend_ctx(app: web.Application) -> AsyncIterator[None]:
    """The task store and the image queue the settings ask for (`service.backend`); one that
    cannot be opened stops start-up here, before any worker starts."""
    async with open_backend(app[SETTINGS], app[METRICS], app[UPLOAD_BUDGET]) as backend:
        app[BACKEND] = backend
        app[REGISTRY] = backend.registry
        yield


def pool_ctx(pool: InferencePool | None) -> Callable[[web.Application], AsyncIterator[None]]:
    """Find out about every declared model and the torchvision weights in the cache (the
    catalog), then start the workers with the default model loaded (a web-only replica,
    `--workers 0`, has none). A `pool` handed to `create_app` is used as it is: its owner
    starts and stops it."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        app[CATALOG] = await build_catalog(settings)
        if pool is not None:
            app[POOL] = pool
            yield
            return
        if settings.resolved_workers() == 0:
            await prepare_models(settings, app[CATALOG], make=False)
            yield
            return
        await prepare_models(settings, app[CATALOG])
        workers = make_pool(settings, app[CATALOG])
        try:
            await workers.start()
            app[POOL] = workers
            yield
        finally:
            await workers.close()

    return ctx


async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
    """The task engine, fed through the backend's queue; this process's own workers, if any,
    take batches from the backend's source."""
    settings, backend = app[SETTINGS], app[BACKEND]
    pool = app.get(POOL)
    async with contextlib.AsyncExitStack() as stack:
        source = None
        if pool is not None:
            source = await stack.enter_async_context(backend.batches([info.name for info in app[CATALOG].infos()]))
        session = await stack.enter_async_context(download_session(settings))
        engine = await stack.enter_async_context(
            TaskEngine(
                backend.registry,
                backend.queue,
                app[CATALOG],
                session,
                settings.fetch_limits(),
                app[METRICS],
                app[UPLOAD_BUDGET],
                backend.spool,
                download_concurrency=settings.download_concurrency,
                batch_size=settings.resolved_batch_size(),
                batch_wait=settings.batch_wait_ms / 1000,
                consumers=CONSUMERS_PER_WORKER * settings.resolved_workers(),
                pool=pool,
                source=source,
                adopt_every=backend.adopt_every,
                identity=None if pool is None else _identity(app),
            )
        )
        app[ENGINE] = engine
        yield


def _identity(app: web.Application) -> WorkerIdentity:
    settings, catalog = app[SETTINGS], app[CATALOG]
    return WorkerIdentity(
        [info.name for info in catalog.infos()],
        settings.resolved_runtime(),
        catalog.info(catalog.default).precision,
        settings.resolved_workers(),
    )


def download_session(settings: Settings) -> aiohttp.ClientSession:
    """The download client the settings ask for (`service.fetch.fetcher.make_session`)."""
    return make_session(settings.address_policy(), settings.download_timeouts(), settings.download_concurrency)


async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    """With a webhook secret: deliver the completion webhooks, those kept from before a
    restart included, until shutdown (a durable store keeps what is still pending)."""
    settings = app[SETTINGS]
    if not settings.webhook_secret:
        pending = await app[REGISTRY].pending_deliveries()
        if pending:  # kept from a run with a secret: they wait, and say so
            log.warning(
                "%d completion webhooks are pending but --webhook-secret is not set: they are sent once it is",
                pending,
            )
        app[METRICS].webhooks_pending.set(pending)
        yield
        return
    sender = WebhookSender(
        app[REGISTRY],
        settings.address_policy(),
        settings.webhook_secret,
        settings.webhook_timeout,
        settings.webhook_retry_for,
        app[METRICS],
    )
    app[WEBHOOKS] = sender
    running = asyncio.create_task(sender.run())
    try:
        yield
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await sender.close()


async def freeze_start_up_objects(app: web.Application) -> None:
    """What start-up made (modules, schemas, restored tasks) lives as long as the process: once
    frozen, the collector's full passes no longer walk it. Under load such a pass took 25-50 ms
    of the event loop, the worst `GET` latencies of the benchmark."""
    gc.collect()
    gc.freeze()


async def release_watchers(app: web.Application) -> None:
    """First on shutdown: long polls answer with the task as it is and event streams end with
    a `shutdown` event, so no watcher holds the exit up (the grace below is for tasks)."""
    app[CLOSING].set()


async def drain_tasks(app: web.Application) -> None:
    """On shutdown (new connections are already refused): give active tasks the grace period."""
    await app[ENGINE].drain(app[SETTINGS].shutdown_grace)


def create_app(settings: Settings, pool: InferencePool | None = None) -> web.Application:
    """The application for `settings`; with `pool`, batches go to that inference pool (a
    fake one in tests of the HTTP contract) instead of worker processes started here."""
    metrics = Metrics()
    connections = Connections(ConnectionLimits.from_settings(settings), metrics)
    # Outermost, the connection's deadlines; then the one that renders every error below it as JSON.
    middlewares: list[Middleware] = [connections.middleware, error_middleware]
    if settings.api_key_list():
        middlewares.append(auth_middleware(settings.api_key_list()))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_request_bytes)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[CONNECTIONS] = connections
    app[SUBMIT_REQUEST] = SubmitRequest.limited(
        max_urls=settings.max_urls_per_task, max_url_length=settings.max_url_length, max_top_k=settings.max_top_k
    )
    app[SUBMIT_FORM] = SubmitForm.limited(
        max_items=settings.max_urls_per_task, max_url_length=settings.max_url_length, max_top_k=settings.max_top_k
    )
    app[UPLOAD_BUDGET] = UploadBudget(settings.max_upload_bytes)
    app[SUBMIT_KEYS] = KeyLocks()
    app.cleanup_ctx.extend([backend_ctx, webhooks_ctx, pool_ctx(pool), engine_ctx])
    app.on_startup.append(freeze_start_up_objects)  # runs after the contexts above have started
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.extend([release_watchers, drain_tasks])
    for module in (operations, tasks, events, results):
        app.add_routes(module.routes)
    add_page(app)
    add_docs(app)  # last: the OpenAPI document describes every route added before it
    return app
