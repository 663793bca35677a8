"""HTTP handlers: parse and validate the request, call the registry or dispatcher, answer JSON."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pydantic import BaseModel, ValidationError

from service.appkeys import (
    CATALOG,
    DISPATCHER,
    METRICS,
    POOL,
    REGISTRY,
    SETTINGS,
    SUBMIT_FORM,
    SUBMIT_REQUEST,
    UPLOAD_BUDGET,
)
from service.auth import request_owner
from service.catalog import ModelCatalog
from service.errors import ApiError, too_busy
from service.metrics import CONTENT_TYPE
from service.openapi import Reply, describe
from service.registry import InvalidCursor
from service.schemas import (
    Health,
    ModelList,
    SubmitResponse,
    TaskDetail,
    TaskListQuery,
    TaskPage,
    TaskQuery,
)
from service.uploads import TaskUploads, read_form

routes = web.RouteTableDef()

MULTIPART = "multipart/form-data"
EVENT_PING_SECONDS = 5.0  # a comment line on idle event streams; a failed one notices a gone watcher
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# pydantic's error types -> our error codes: first by (top-level field, type), then by type.
_FIELD_CODES = {
    ("urls", "too_long"): "too_many_urls",
    ("urls", "too_short"): "empty_urls",
    ("urls", "string_pattern_mismatch"): "invalid_url",
    ("urls", "string_too_long"): "invalid_url",
    ("urls", "invalid_url"): "invalid_url",
    ("top_k", "greater_than_equal"): "top_k_out_of_range",
    ("top_k", "less_than_equal"): "top_k_out_of_range",
}
_TYPE_CODES = {"missing": "missing_field", "extra_forbidden": "unknown_field"}
_QUERY_CODES = {
    "status": "invalid_status",
    "limit": "invalid_limit",
    "cursor": "invalid_cursor",
    "wait": "invalid_wait",
    "done": "invalid_done",
}

_TASK_NOT_FOUND = {404: "task_not_found"}


def _json(model: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(text=model.model_dump_json(), status=status, headers=headers)


@routes.get("/healthz")
@describe(summary="Liveness: the process and its event loop answer", tag="operations", public=True,
          replies={200: Reply("Alive", Health)})
async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return _json(Health(status="ok"))


@routes.get("/readyz")
@describe(summary="Readiness: every worker is up with the default model loaded", tag="operations", public=True,
          replies={200: Reply("Ready", Health)}, errors={503: "not_ready"})
async def readyz(request: web.Request) -> web.Response:
    """Ready when every inference worker is up with the default model loaded."""
    if not request.app[POOL].check_ready():
        raise ApiError(503, "not_ready", "the inference workers are starting or being replaced")
    return _json(Health(status="ready"))


@routes.get("/metrics")
@describe(summary="Prometheus metrics", tag="operations", replies={200: Reply("Prometheus text format", media_type="text/plain")})
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; current-state gauges are read at scrape time."""
    app = request.app
    app_metrics = app[METRICS]
    for status, count in (await app[REGISTRY].status_counts()).items():
        app_metrics.tasks.labels(status=status.value).set(count)
    app_metrics.queue_depth.set(app[DISPATCHER].queue_depth())
    app_metrics.upload_bytes.set(app[UPLOAD_BUDGET].used)
    app_metrics.worker_restarts.set(app[POOL].restarts)
    return web.Response(body=app_metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@routes.post("/submit")
@describe(
    summary="Submit a batch of images (URLs as JSON, or files and URLs as a form); answers at once with the "
    "new task's id",
    body=SUBMIT_REQUEST,
    form=SUBMIT_FORM,
    replies={202: Reply("Accepted", SubmitResponse, headers={"Location": "the task's URL"})},
    errors={
        400: "invalid_json, invalid_body, invalid_multipart, missing_field, unknown_field, invalid_type, "
        "invalid_field, field_too_large, empty_urls, too_many_urls, no_images, too_many_images, invalid_url, "
        "top_k_out_of_range, unknown_model, model_unavailable",
        413: "request_too_large, upload_too_large",
        415: "unsupported_media_type",
        429: "too_busy (see the Retry-After header)",
    },
)
async def submit(request: web.Request) -> web.Response:
    if request.content_type == MULTIPART:
        return await _submit_form(request)
    submission = _validate(request.app[SUBMIT_REQUEST], await _read_json_object(request), _body_error_code)
    return await _start_task(request, submission.urls, submission.top_k, submission.model)


async def _submit_form(request: web.Request) -> web.Response:
    app = request.app
    settings, budget = app[SETTINGS], app[UPLOAD_BUDGET]
    await _check_capacity(request, 1)  # before reading what may be megabytes of files
    form = await read_form(request, settings.max_urls_per_task, settings.max_image_bytes, budget)
    uploads = TaskUploads(form, budget)
    try:
        submission = _validate(app[SUBMIT_FORM], form.values(), _body_error_code)
        if not form.sources:
            raise ApiError(400, "no_images", "the form holds no files and no urls")
        return await _start_task(request, form.item_urls(), submission.top_k, submission.model, uploads)
    except BaseException:
        uploads.release()
        raise


async def _start_task(
    request: web.Request, urls: list[str], top_k: int | None, model: str | None, uploads: TaskUploads | None = None
) -> web.Response:
    """Create the task and hand it to the dispatcher (which then owns `uploads`)."""
    settings, registry = request.app[SETTINGS], request.app[REGISTRY]
    model = model or settings.default_model
    _check_model(request.app[CATALOG], model)
    await _check_capacity(request, len(urls))
    task = await registry.create(urls, model, top_k or settings.default_top_k, request_owner(request))
    request.app[DISPATCHER].submit(task, uploads)
    response = SubmitResponse(task_id=task.task_id, status=task.status, total=len(task.items))
    return _json(response, status=202, headers={"Location": f"/tasks/{task.task_id}"})


async def _check_capacity(request: web.Request, images: int) -> None:
    unfinished = await request.app[REGISTRY].unfinished_images()
    if unfinished + images > request.app[SETTINGS].max_active_images:
        raise too_busy(f"the service already has {unfinished} unfinished images; retry later")


@routes.get("/models")
@describe(summary="Every model this service knows, and whether its weights are on disk", tag="models",
          replies={200: Reply("The models", ModelList)})
async def list_models(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    return _json(ModelList(default=catalog.default, models=catalog.entries()))


@routes.get("/tasks")
@describe(
    summary="Task summaries, newest first, a page at a time",
    query=TaskListQuery,
    replies={200: Reply("A page of tasks", TaskPage)},
    errors={400: "unknown_parameter, invalid_status, invalid_limit, invalid_cursor"},
)
async def list_tasks(request: web.Request) -> web.Response:
    query = _validate(TaskListQuery, dict(request.query), _query_error_code)
    try:
        page = await request.app[REGISTRY].list(query.status, query.limit, query.cursor, request_owner(request))
    except InvalidCursor:
        raise ApiError(400, "invalid_cursor", "the cursor is not one this service issued") from None
    return _json(page)


@routes.get("/tasks/{task_id}")
@describe(
    summary="A task with every item's status and labels; with `wait`, a long poll",
    query=TaskQuery,
    replies={200: Reply("The task (after a change, or when `wait` ran out)", TaskDetail)},
    errors={**_TASK_NOT_FOUND, 400: "unknown_parameter, invalid_wait, invalid_done"},
)
async def get_task(request: web.Request) -> web.Response:
    query = _validate(TaskQuery, dict(request.query), _query_error_code)
    registry, owner, task_id = request.app[REGISTRY], request_owner(request), _task_id(request)
    if query.wait:
        try:
            async with asyncio.timeout(query.wait):
                await registry.follow(task_id, seen=query.done, owner=owner)
        except TimeoutError:
            pass  # no change in time: answer with the task as it is
    body = await registry.get_json(task_id, owner)
    if body is None:
        raise _not_found(request)
    return web.Response(body=body, content_type="application/json")


@routes.get("/tasks/{task_id}/events")
@describe(
    summary="Live progress as Server-Sent Events: `progress`, one `item` per result, then `end`",
    replies={200: Reply(
        "An event stream. `progress` carries the task's progress counts; `item` one item that reached a "
        "final state (in the order they did, each once); `end` the task summary at its final state, after "
        "which the server closes the stream. A watcher joining late first gets every result so far.",
        media_type="text/event-stream",
    )},
    errors=_TASK_NOT_FOUND,
)
async def task_events(request: web.Request) -> web.StreamResponse:
    registry, owner, task_id = request.app[REGISTRY], request_owner(request), _task_id(request)
    update = await registry.follow(task_id, seen=0, owner=owner, wait=False)
    if update is None:
        raise _not_found(request)
    gauge = request.app[METRICS].event_streams
    gauge.inc()
    stream = EventSourceResponse(ping_interval=EVENT_PING_SECONDS)
    try:
        await stream.prepare(request)
        async with stream:
            gone = asyncio.ensure_future(stream.wait())  # ends when a ping fails: the watcher left
            try:
                await stream.send(update.summary.progress.model_dump_json(), event="progress")
                seen = 0
                while update is not None:
                    for item in update.items:
                        await stream.send(item.model_dump_json(), event="item", id=str(seen))
                        seen += 1
                    if update.items:
                        await stream.send(update.summary.progress.model_dump_json(), event="progress")
                    if update.summary.status.is_final:
                        await stream.send(update.summary.model_dump_json(), event="end")
                        break
                    update = await _unless_gone(registry.follow(task_id, seen=seen, owner=owner), gone)
            finally:
                gone.cancel()
    except ConnectionResetError:
        pass  # the watcher left while we were writing
    finally:
        gauge.dec()
    return stream


async def _unless_gone(news: Awaitable[T], gone: asyncio.Future[None]) -> T | None:
    """`news`, or None (and `news` cancelled) if `gone` completes first."""
    waiting = asyncio.ensure_future(news)
    await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():
        waiting.cancel()
        return None
    return waiting.result()


@routes.delete("/tasks/{task_id}")
@describe(summary="Cancel the task if it is active, then forget it",
          replies={200: Reply("The task's final snapshot", TaskDetail)}, errors=_TASK_NOT_FOUND)
async def delete_task(request: web.Request) -> web.Response:
    return _task_or_404(request, await request.app[DISPATCHER].remove(_task_id(request), request_owner(request)))


@routes.post("/tasks/{task_id}/cancel")
@describe(summary="Cancel the task if it is active and keep it visible",
          replies={200: Reply("The task's final snapshot", TaskDetail)}, errors=_TASK_NOT_FOUND)
async def cancel_task(request: web.Request) -> web.Response:
    return _task_or_404(request, await request.app[DISPATCHER].cancel(_task_id(request), request_owner(request)))


def _check_model(catalog: ModelCatalog, name: str) -> None:
    info = catalog.get(name)
    if info is not None and info.weights_present():
        return
    available = catalog.available()
    if info is None:
        code, reason = "unknown_model", f"unknown model {name!r}"
    else:
        code, reason = "model_unavailable", f"the weights of model {name!r} are not on disk"
    raise ApiError(400, code, f"{reason}; available: {', '.join(available)}", details={"available": available})


async def _read_json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(
            415, "unsupported_media_type",
            f"the body must be JSON (Content-Type: application/json) or a form ({MULTIPART})",
        )
    raw = await request.read()  # over client_max_size: aiohttp raises 413, rendered by the middleware
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    return body


def _validate(model: type[M], data: dict[str, Any], code_of: Callable[[tuple[int | str, ...], str], str]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, code_of) from None


def _validation_error(exc: ValidationError, code_of: Callable[[tuple[int | str, ...], str], str]) -> ApiError:
    problems = [
        {
            "field": ".".join(str(part) for part in error["loc"]),
            "code": code_of(error["loc"], error["type"]),
            "message": error["msg"],
        }
        for error in exc.errors(include_url=False, include_input=False)
    ]
    first = problems[0]
    return ApiError(400, first["code"], f"{first['field']}: {first['message']}", details=problems)


def _body_error_code(loc: tuple[int | str, ...], error_type: str) -> str:
    field = str(loc[0]) if loc else ""
    if (field, error_type) in _FIELD_CODES:
        return _FIELD_CODES[(field, error_type)]
    if error_type in _TYPE_CODES:
        return _TYPE_CODES[error_type]
    if error_type.endswith(("_type", "_parsing")):
        return "invalid_type"
    return "invalid_field"


def _query_error_code(loc: tuple[int | str, ...], error_type: str) -> str:
    if error_type == "extra_forbidden":
        return "unknown_parameter"
    return _QUERY_CODES.get(str(loc[0]) if loc else "", "invalid_parameter")


def _task_id(request: web.Request) -> str:
    return request.match_info["task_id"]


def _task_or_404(request: web.Request, task: TaskDetail | None) -> web.Response:
    if task is None:
        raise _not_found(request)
    return _json(task)


def _not_found(request: web.Request) -> ApiError:
    """Unknown ids and other keys' tasks look the same."""
    return ApiError(404, "task_not_found", f"no task {_task_id(request)!r}")
