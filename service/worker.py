"""The standalone worker (`run_worker.py`, or the `ics-worker` console script): inference
processes that take batches from the Redis job streams and write outcomes into the shared
task registry, on any machine that reaches the Redis of the web replicas.

It is the web process's own pool and consumers without the web: the same settings (the
models declared the same way as on the web replicas; `--serve-models` narrows them), the
same supervision of the inference processes. It never downloads: the web tier does, behind
its address policy. Stopping it (SIGTERM) leaves the batches it holds to other workers once
`--claim-idle` has passed. With `--metrics-port` it serves its metrics and probes
(`service.api.worker_probes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator

import uvloop
from aiohttp import web

from inference.specs import CatalogError
from service.api.worker_probes import create_probe_app
from service.backend import open_backend
from service.broker.fleet import HEARTBEAT_SECONDS, RedisFleet
from service.broker.streams import consumer_name
from service.lifetimes import stop_tasks
from service.listening import ListenError, bind
from service.logs import configure_logging
from service.metrics import Metrics
from service.pool import DefaultModelError
from service.pool.factory import build_catalog, make_pool, prepare_models
from service.settings import WORKER_SETTINGS, Settings, load_settings, usage_error
from service.stores.redis.link import safe_url
from service.tasks.classifier import CONSUMERS_PER_WORKER, Classifier
from service.tasks.fleet import WorkerIdentity, WorkerStats
from service.tasks.registry import StoreOpenError
from service.tasks.uploads import UploadBudget

log = logging.getLogger("service.worker")

PROGRAM = "run_worker.py"


@contextlib.asynccontextmanager
async def probes(sockets: list[socket.socket], app: web.Application) -> AsyncIterator[None]:
    """Serve `app` on the `--metrics-port` sockets until the block ends (nothing without them)."""
    if not sockets:
        yield
        return
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        for sock in sockets:
            await web.SockSite(runner, sock).start()
            host, port = sock.getsockname()[:2]
            log.info("metrics and probes on http://%s:%d", host, port)
        yield
    finally:
        await runner.cleanup()


async def heartbeat(fleet: RedisFleet, identity: WorkerIdentity, stats: WorkerStats) -> None:
    """Tell the fleet this worker is alive, every `HEARTBEAT_SECONDS`, until cancelled; then
    that it has left. A beat that fails is logged: missing beats are how others see it gone."""
    try:
        while True:
            try:
                await fleet.beat(identity.entry(stats))
            except Exception as exc:  # Redis away: the others will take over what this worker holds
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(HEARTBEAT_SECONDS)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(fleet.leave(identity.id))


async def work(settings: Settings) -> None:
    """Classify until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    metrics = Metrics()
    # Bound before the workers load, so that a busy port ends start-up at once, in one line.
    sockets = [] if settings.metrics_port is None else bind(settings.host, settings.metrics_port, "--metrics-port")
    async with open_backend(settings, metrics, UploadBudget(0), web=False) as backend:
        catalog = await build_catalog(settings)
        models = settings.serve_model_list() or [info.name for info in catalog.infos()]
        await prepare_models(settings, catalog)
        pool = make_pool(settings, catalog)
        try:
            await pool.start()
            probe_app = create_probe_app(metrics, pool, backend.registry)
            async with probes(sockets, probe_app), backend.batches(models) as batches:
                classifier = Classifier(
                    backend.registry,
                    pool,
                    catalog,
                    batches,
                    metrics,
                    settings.resolved_batch_size(),
                    settings.batch_wait_ms / 1000,
                )
                consumers = [
                    asyncio.create_task(classifier.consume()) for _ in range(CONSUMERS_PER_WORKER * pool.workers)
                ]
                if backend.fleet is not None:
                    identity = WorkerIdentity(
                        models,
                        settings.resolved_runtime(),
                        catalog.info(catalog.default).precision,
                        pool.workers,
                        id=consumer_name(),
                    )
                    consumers.append(asyncio.create_task(heartbeat(backend.fleet, identity, classifier.stats)))
                where = safe_url(settings.redis)
                log.info(
                    "worker %s: %d processes classify %s at %s", consumer_name(), pool.workers, ", ".join(models), where
                )
                await stop.wait()
                log.info("stopping")
                await stop_tasks(consumers)
        finally:
            await pool.close()


def main(program: str = PROGRAM) -> None:
    settings = load_settings(program=program, shown=WORKER_SETTINGS)
    if not settings.redis:
        usage_error("--redis is required: the Redis the web replicas use", program)
    if settings.resolved_workers() == 0:
        usage_error("--workers must be at least 1 for a worker", program)
    configure_logging(settings.log_format)
    try:
        uvloop.run(work(settings))
    except (ListenError, DefaultModelError, CatalogError, StoreOpenError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
