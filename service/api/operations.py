"""Operations endpoints: liveness, readiness, Prometheus metrics, and the model list."""

from __future__ import annotations

from collections import Counter

from aiohttp import web

from inference.specs import margin_for
from service.api.appkeys import BACKEND, CATALOG, ENGINE, METRICS, POOL, REGISTRY, SETTINGS, UPLOAD_BUDGET
from service.api.errors import STORE_UNAVAILABLE, ApiError
from service.api.openapi import Reply, documented
from service.api.schemas import CalibrationEntry, Health, ModelEntry, ModelList, WorkerList
from service.api.tasks import json_response
from service.metrics import CONTENT_TYPE
from service.pool.catalog import ModelCatalog
from service.tasks.fleet import WorkerEntry, WorkerState

routes = web.RouteTableDef()


@routes.get("/healthz")
@documented(
    summary="Liveness: the process and its event loop answer",
    tag="operations",
    public=True,
    replies={200: Reply("Alive", Health)},
)
async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return json_response(Health(status="ok"))


@routes.get("/readyz")
@documented(
    summary="Readiness: every worker is up with the default model loaded",
    tag="operations",
    public=True,
    replies={200: Reply("Ready", Health)},
    errors={503: "not_ready"},
)
async def readyz(request: web.Request) -> web.Response:
    """Ready when every inference worker is up with the default model loaded."""
    pool = request.app.get(POOL)  # none in a web-only replica
    if pool is not None and not pool.check_ready():
        raise ApiError(503, "not_ready", "the inference workers are starting or being replaced")
    if not await request.app[REGISTRY].check():  # a store elsewhere is asked now
        raise ApiError(503, "not_ready", "the task store cannot write")
    return json_response(Health(status="ready"))


@routes.get("/metrics")
@documented(
    summary="Prometheus metrics",
    tag="operations",
    replies={200: Reply("Prometheus text format", media_type="text/plain")},
    errors=STORE_UNAVAILABLE,
)
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; current-state gauges are read at scrape time."""
    app = request.app
    app_metrics = app[METRICS]
    for status, count in (await app[REGISTRY].status_counts()).items():
        app_metrics.tasks.labels(status=status.value).set(count)
    for waiting in await app[ENGINE].backlog():
        labels = {"model": waiting.model, "priority": waiting.priority.value}
        app_metrics.queue_depth.labels(**labels).set(waiting.images)
        app_metrics.queue_oldest.labels(**labels).set(waiting.oldest_seconds)
    app_metrics.upload_bytes.set(app[UPLOAD_BUDGET].used)
    if (pool := app.get(POOL)) is not None:
        app_metrics.worker_restarts.set(pool.restarts)
        app_metrics.model_loads.set(pool.model_loads)
    states = Counter(worker.state for worker in await fleet(app))
    for state in WorkerState:
        app_metrics.workers.labels(state=state.value).set(states[state])
    await app[REGISTRY].observe()
    return web.Response(body=app_metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@routes.get("/workers")
@documented(
    summary="The workers that classify: this process's own pool, and with Redis every worker by its heartbeat",
    tag="operations",
    replies={200: Reply("The workers, up or gone (a gone one is listed for 10 minutes)", WorkerList)},
    errors=STORE_UNAVAILABLE,
)
async def list_workers(request: web.Request) -> web.Response:
    return json_response(WorkerList(workers=await fleet(request.app)))


async def fleet(app: web.Application) -> list[WorkerEntry]:
    """This process's own pool, then the workers that beat into a shared store."""
    own, shared = app[ENGINE].own_worker(), app[BACKEND].fleet
    return ([] if own is None else [own]) + ([] if shared is None else await shared.workers())


@routes.get("/models")
@documented(
    summary="Every model this service knows, and whether its weights are on disk",
    tag="models",
    replies={200: Reply("The models", ModelList)},
)
async def list_models(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    margin = request.app[SETTINGS].refine_margin
    return json_response(ModelList(default=catalog.default, models=model_entries(catalog, margin)))


def model_entries(catalog: ModelCatalog, chosen_margin: float | None) -> list[ModelEntry]:
    entries = []
    for info in catalog.infos():
        margin = margin_for(info.precision, chosen_margin)
        calibration = catalog.calibration(info.name)
        entries.append(
            ModelEntry(
                name=info.name,
                source=info.spec.source,
                architecture=info.architecture,
                input_size=info.preprocessing.input_size,
                num_classes=info.num_classes,
                precision=info.precision,
                refine_margin=margin,
                calibration=None
                if calibration is None
                else CalibrationEntry(
                    images=calibration.images,
                    held_out=len(calibration.fp32_top1),
                    source=calibration.source,
                    agreement_with_fp32=round(calibration.agreement(margin), 4),
                    agreement_without_refine=round(calibration.agreement(0), 4),
                    refined_share=round(calibration.refined_share(margin), 4),
                ),
                default=info.name == catalog.default,
                weights_present=info.weights_present(),
            )
        )
    return entries
