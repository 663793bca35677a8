"""The application factory and the lifetimes of its resources.

Started in order and closed in reverse (`cleanup_ctx`): the task registry, the webhook
sender, the model catalog and the inference pool, the download session, then the task
service that uses them. On shutdown, running tasks get `--shutdown-grace` seconds before
what is left is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from service.api import events, operations, tasks
from service.api.auth import auth_middleware
from service.api.connections import ConnectionLimits, Connections
from service.api.docs import add_docs
from service.api.errors import error_middleware
from service.api.idempotency import KeyLocks
from service.api.keys import (
    CATALOG,
    CLOSING,
    CONNECTIONS,
    METRICS,
    POOL,
    REGISTRY,
    SETTINGS,
    SUBMIT_FORM,
    SUBMIT_KEYS,
    SUBMIT_REQUEST,
    TASKS,
    UPLOAD_BUDGET,
    WEBHOOKS,
)
from service.api.page import add_page
from service.api.schemas import SubmitForm, SubmitRequest
from service.broker.jobs import StreamBatches, StreamJobs, consumer_name
from service.fetch.fetcher import FetchLimits, make_session
from service.metrics import Metrics
from service.pool.setup import build_catalog, make_pool
from service.settings import Settings
from service.tasks.batching import BatchQueue, BatchSource, JobQueue
from service.tasks.classifier import CONSUMERS_PER_WORKER
from service.tasks.memory import InMemoryRegistry
from service.tasks.redis_store import RedisRegistry
from service.tasks.service import TaskService
from service.tasks.sqlite import SqliteRegistry
from service.tasks.uploads import UploadBudget, UploadSpool
from service.webhooks.sender import WebhookSender

log = logging.getLogger(__name__)


async def registry_ctx(app: web.Application) -> AsyncIterator[None]:
    """The task registry: SQLite in the data dir (a bad data dir stops start-up here, before
    any worker starts), Redis (one that cannot be reached stops it too), or memory."""
    settings = app[SETTINGS]
    if settings.store_kind() == "redis":
        shared = await RedisRegistry.open(
            settings.redis,
            settings.finished_task_ttl,
            settings.max_finished_tasks,
            prefix=settings.redis_prefix,
            lease=settings.lease,
            idempotency_ttl=settings.idempotency_ttl,
            metrics=app[METRICS],
        )
        app[REGISTRY] = shared
        try:
            yield
        finally:
            await shared.close()
        return
    if settings.store == "memory":
        app[REGISTRY] = InMemoryRegistry(
            settings.finished_task_ttl,
            settings.max_finished_tasks,
            metrics=app[METRICS],
            idempotency_ttl=settings.idempotency_ttl,
        )
        yield
        return
    registry = await SqliteRegistry.open(
        settings.data_dir,
        settings.finished_task_ttl,
        settings.max_finished_tasks,
        app[METRICS],
        idempotency_ttl=settings.idempotency_ttl,
    )
    app[REGISTRY] = registry
    try:
        yield
    finally:
        await registry.close()


async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
    """Find out about every declared model and the torchvision weights in the cache (the
    catalog), then start the workers with the default model loaded (a web-only replica,
    `--workers 0`, has none)."""
    settings = app[SETTINGS]
    app[CATALOG] = await build_catalog(settings)
    if settings.resolved_workers() == 0:
        yield
        return
    pool = make_pool(settings, app[CATALOG])
    try:
        await pool.start()
        app[POOL] = pool
        yield
    finally:
        await pool.close()


async def tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    """The task service, fed through an in-process queue, or with Redis through the job
    streams (this replica's own workers, if any, then take batches from there too)."""
    settings = app[SETTINGS]
    budget = app[UPLOAD_BUDGET]
    spool = UploadSpool(settings.data_dir / "uploads", budget) if settings.store_kind() == "sqlite" else None
    registry = app[REGISTRY]
    pool = app.get(POOL)
    queue: JobQueue
    source: BatchSource | None
    async with contextlib.AsyncExitStack() as stack:
        if isinstance(registry, RedisRegistry):
            jobs = StreamJobs(registry, settings.max_queued_images)
            stack.push_async_callback(jobs.close)
            queue, source = jobs, None
            if pool is not None:
                batches = StreamBatches(
                    registry,
                    [info.name for info in app[CATALOG].infos()],
                    consumer_name(),
                    settings.claim_idle,
                    settings.max_deliveries,
                )
                await batches.start()
                stack.push_async_callback(batches.close)
                source = batches
        else:
            queue = source = BatchQueue(settings.max_queued_images)
        session = await stack.enter_async_context(make_session(settings))
        service = await stack.enter_async_context(
            TaskService(
                registry,
                queue,
                app[CATALOG],
                session,
                FetchLimits.from_settings(settings),
                app[METRICS],
                budget,
                spool,
                download_concurrency=settings.download_concurrency,
                batch_size=settings.batch_size,
                batch_wait=settings.batch_wait_ms / 1000,
                consumers=CONSUMERS_PER_WORKER * settings.resolved_workers(),
                pool=pool,
                source=source,
                adopt_every=registry.adopt_every if isinstance(registry, RedisRegistry) else None,
            )
        )
        app[TASKS] = service
        yield


async def webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    """With a webhook secret: deliver the completion webhooks, those kept from before a
    restart included, until shutdown (a durable store keeps what is still pending)."""
    settings = app[SETTINGS]
    if not settings.webhook_secret:
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
    await app[TASKS].drain(app[SETTINGS].shutdown_grace)


def create_app(settings: Settings) -> web.Application:
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
    app.cleanup_ctx.extend([registry_ctx, webhooks_ctx, pool_ctx, tasks_ctx])
    app.on_startup.append(freeze_start_up_objects)  # runs after the contexts above have started
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.extend([release_watchers, drain_tasks])
    for module in (operations, tasks, events):
        app.add_routes(module.routes)
    add_page(app)
    add_docs(app)  # last: the OpenAPI document describes every route added before it
    return app
