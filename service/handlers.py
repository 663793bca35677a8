"""HTTP handlers: parse and validate the request, call the registry or dispatcher, answer JSON."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from inference.catalog import MODELS
from service.appkeys import DISPATCHER, METRICS, POOL, REGISTRY, SETTINGS
from service.auth import request_owner
from service.errors import ApiError
from service.metrics import CONTENT_TYPE
from service.registry import InvalidCursor
from service.schemas import SubmitLimits, SubmitRequest, SubmitResponse, TaskDetail, TaskStatus

routes = web.RouteTableDef()

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
RETRY_AFTER_SECONDS = 5

# pydantic's error types -> our error codes. SubmitRequest's own validators raise types
# that already are our codes (invalid_url, too_many_urls, top_k_out_of_range).
_VALIDATION_CODES = {
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "too_short": "empty_urls",
}
_OWN_CODES = {"invalid_url", "too_many_urls", "top_k_out_of_range"}


def _json(model: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(text=model.model_dump_json(), status=status, headers=headers)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready when every inference worker is up with the default model loaded."""
    if not request.app[POOL].check_ready():
        raise ApiError(503, "not_ready", "the inference workers are starting or being replaced")
    return web.json_response({"status": "ready"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; current-state gauges are read at scrape time."""
    app = request.app
    app_metrics = app[METRICS]
    for status, count in (await app[REGISTRY].status_counts()).items():
        app_metrics.tasks.labels(status=status.value).set(count)
    app_metrics.queue_depth.set(app[DISPATCHER].queue_depth())
    app_metrics.worker_restarts.set(app[POOL].restarts)
    return web.Response(body=app_metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@routes.post("/submit")
async def submit(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    registry = request.app[REGISTRY]
    body = await _read_json_object(request)
    limits = SubmitLimits(
        max_urls=settings.max_urls_per_task,
        max_url_length=settings.max_url_length,
        max_top_k=settings.max_top_k,
    )
    try:
        submission = SubmitRequest.model_validate(body, context={"limits": limits})
    except ValidationError as exc:
        raise _validation_error(exc) from None
    model = submission.model or settings.default_model
    if model not in MODELS:
        raise ApiError(
            400, "unknown_model", f"unknown model {model!r}; available: {', '.join(MODELS)}",
            details={"available": list(MODELS)},
        )
    unfinished = await registry.unfinished_images()
    if unfinished + len(submission.urls) > settings.max_active_images:
        raise ApiError(
            429, "too_busy",
            f"the service already has {unfinished} unfinished images; retry later",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    top_k = submission.top_k or settings.default_top_k
    task = await registry.create(submission.urls, model, top_k, request_owner(request))
    request.app[DISPATCHER].submit(task)
    response = SubmitResponse(task_id=task.task_id, status=task.status, total=len(task.items))
    return _json(response, status=202, headers={"Location": f"/tasks/{task.task_id}"})


@routes.get("/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    query = request.query
    unknown = sorted(set(query) - {"status", "limit", "cursor"})
    if unknown:
        raise ApiError(400, "unknown_parameter", f"unknown query parameters: {', '.join(unknown)}")
    status = None
    if "status" in query:
        try:
            status = TaskStatus(query["status"])
        except ValueError:
            allowed = ", ".join(status.value for status in TaskStatus)
            raise ApiError(400, "invalid_status", f"status must be one of: {allowed}") from None
    limit = _parse_limit(query.get("limit"))
    try:
        page = await request.app[REGISTRY].list(status, limit, query.get("cursor"), request_owner(request))
    except InvalidCursor:
        raise ApiError(400, "invalid_cursor", "the cursor is not one this service issued") from None
    return _json(page)


@routes.get("/tasks/{task_id}")
async def get_task(request: web.Request) -> web.Response:
    body = await request.app[REGISTRY].get_json(_task_id(request), request_owner(request))
    if body is None:
        raise _not_found(request)
    return web.Response(body=body, content_type="application/json")


@routes.delete("/tasks/{task_id}")
async def delete_task(request: web.Request) -> web.Response:
    return _task_or_404(request, await request.app[DISPATCHER].remove(_task_id(request), request_owner(request)))


@routes.post("/tasks/{task_id}/cancel")
async def cancel_task(request: web.Request) -> web.Response:
    return _task_or_404(request, await request.app[DISPATCHER].cancel(_task_id(request), request_owner(request)))


async def _read_json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "the body must be JSON (Content-Type: application/json)")
    raw = await request.read()  # over client_max_size: aiohttp raises 413, rendered by the middleware
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    return body


def _validation_error(exc: ValidationError) -> ApiError:
    problems = [
        {
            "field": ".".join(str(part) for part in error["loc"]),
            "code": _error_code(error["type"]),
            "message": error["msg"],
        }
        for error in exc.errors(include_url=False, include_input=False)
    ]
    first = problems[0]
    return ApiError(400, first["code"], f"{first['field']}: {first['message']}", details=problems)


def _error_code(error_type: str) -> str:
    if error_type in _OWN_CODES:
        return error_type
    if error_type in _VALIDATION_CODES:
        return _VALIDATION_CODES[error_type]
    if error_type.endswith(("_type", "_parsing")):
        return "invalid_type"
    return "invalid_field"


def _parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise ApiError(400, "invalid_limit", f"limit must be an integer between 1 and {MAX_PAGE_SIZE}")
    return int(raw)


def _task_id(request: web.Request) -> str:
    return request.match_info["task_id"]


def _task_or_404(request: web.Request, task: TaskDetail | None) -> web.Response:
    if task is None:
        raise _not_found(request)
    return _json(task)


def _not_found(request: web.Request) -> ApiError:
    """Unknown ids and other keys' tasks look the same."""
    return ApiError(404, "task_not_found", f"no task {_task_id(request)!r}")
