"""The standalone worker's own small HTTP server (`run_worker.py --metrics-port`): Prometheus
metrics of its batches, liveness, and readiness (its inference processes are up with the
default model loaded, and Redis answers).

A worker serves no API: this is what an orchestrator probes and what Prometheus scrapes, so
a fleet's inference (batch sizes, inference time, restarts, claims) is observed where it
happens. It binds `--host`, and only when asked: several workers on one machine each need a
port of their own.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from service.api.appkeys import METRICS, POOL, REGISTRY
from service.api.errors import ApiError, error_middleware
from service.api.schemas import Health
from service.metrics import CONTENT_TYPE, Metrics
from service.pool import InferencePool
from service.tasks.registry import TaskRegistry

READY_TIMEOUT = 5.0  # seconds Redis has to answer a readiness probe's ping

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process and its event loop answer."""
    return web.json_response(text=Health(status="ok").model_dump_json())


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready when every inference process is up with the default model and Redis answers."""
    if not request.app[POOL].check_ready():
        raise ApiError(503, "not_ready", "the inference processes are starting or being replaced")
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            answers = await request.app[REGISTRY].check()
    except TimeoutError:
        answers = False
    if not answers:
        raise ApiError(503, "not_ready", f"Redis does not answer (within {READY_TIMEOUT:g} s)")
    return web.json_response(text=Health(status="ready").model_dump_json())


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    app_metrics = request.app[METRICS]
    pool = request.app[POOL]
    app_metrics.worker_restarts.set(pool.restarts)
    app_metrics.model_loads.set(pool.model_loads)
    return web.Response(body=app_metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def create_probe_app(metrics: Metrics, pool: InferencePool, registry: TaskRegistry) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[METRICS] = metrics
    app[POOL] = pool
    app[REGISTRY] = registry
    app.add_routes(routes)
    return app
