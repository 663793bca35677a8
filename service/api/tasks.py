"""Task handlers: submit (JSON or a form), list, read (with an optional long poll), cancel,
delete. Reads go to the registry; changes go through the task service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from service.api import idempotency, prefer
from service.api.appkeys import (
    CATALOG,
    CLOSING,
    ENGINE,
    REGISTRY,
    SETTINGS,
    SUBMIT_FORM,
    SUBMIT_KEYS,
    SUBMIT_REQUEST,
    UPLOAD_BUDGET,
    WEBHOOKS,
)
from service.api.auth import request_owner
from service.api.errors import STORE_UNAVAILABLE, ApiError, too_busy
from service.api.openapi import Reply, RequestHeader, documented
from service.api.schemas import SubmitResponse, TaskListQuery, TaskQuery
from service.api.submission import TaskRequest, read_task_request
from service.api.validation import MULTIPART, query_error_code, validate
from service.pool.catalog import ModelCatalog
from service.tasks.idempotency import IdempotencyKey, Submission, SubmissionExists
from service.tasks.records import Priority, TaskDetail, TaskPage
from service.tasks.registry import Admission, InvalidCursor, NoRoom
from service.webhooks.sender import CallbackRefused

routes = web.RouteTableDef()
T = TypeVar("T")

TASK_NOT_FOUND = {404: "task_not_found"}
IDEMPOTENCY_HEADER = RequestHeader(
    "a key of yours for this submit (a UUID): retried with the same key and request within --idempotency-ttl "
    "(24 h), the submit answers with the original task instead of making a second one",
    pattern=idempotency.KEY_PATTERN,
    max_length=idempotency.MAX_KEY_CHARS,
)
PREFER_HEADER = RequestHeader(
    "`wait=N` (RFC 7240): answer 200 with the task if it ends within N seconds (at most the service's --max-wait, "
    "60 by default), else 202 as without it; a malformed preference is ignored",
)
APPLIED_HEADER = "`wait=N` when `Prefer: wait` was honoured, with the seconds waited for at most"
# From a created task to what can be done with it (for clients and stateful contract tests).
TASK_LINKS = {
    "GetTask": "get_task",
    "CancelTask": "cancel_task",
    "DeleteTask": "delete_task",
    "TaskEvents": "task_events",
}


def json_response(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A pydantic model as the JSON body."""
    return web.json_response(text=model.model_dump_json(), status=status, headers=headers)


@routes.post("/submit")
@documented(
    summary="Submit a batch of images (URLs as JSON, or files and URLs as a form); answers at once with the "
    "new task's id",
    body=SUBMIT_REQUEST,
    form=SUBMIT_FORM,
    headers={idempotency.HEADER: IDEMPOTENCY_HEADER, prefer.PREFER: PREFER_HEADER},
    replies={
        200: Reply(
            "With `Prefer: wait=N`: the task ended within N seconds, and here it is as GET /tasks/<id> shows it",
            TaskDetail,
            headers={"Location": "the task's URL", prefer.APPLIED: APPLIED_HEADER},
        ),
        202: Reply(
            "Accepted (or, for an Idempotency-Key seen before with the same request, the original answer); with "
            "`Prefer: wait=N`, the task had not ended within N seconds",
            SubmitResponse,
            headers={
                "Location": "the task's URL",
                idempotency.REPLAYED: "`true` when this is the original answer to an earlier submit",
                prefer.APPLIED: APPLIED_HEADER,
            },
            links=TASK_LINKS,
        ),
    },
    errors={
        400: "invalid_json, invalid_body, invalid_multipart, missing_field, unknown_field, invalid_type, "
        "invalid_field, field_too_large, too_many_parts, empty_urls, too_many_urls, no_images, too_many_images, "
        "invalid_url, top_k_out_of_range, invalid_priority, unknown_model, model_unavailable, invalid_callback_url, "
        "callback_url_refused, webhooks_disabled, invalid_idempotency_key",
        413: "request_too_large, upload_too_large",
        415: "unsupported_media_type",
        422: "idempotency_key_reused",
        429: "too_busy, key_quota_exceeded (see the Retry-After header)",
        **STORE_UNAVAILABLE,
    },
)
async def submit(request: web.Request) -> web.Response:
    wait = prefer.wait_preference(request.headers.getall(prefer.PREFER, []), request.app[SETTINGS].max_wait)
    key = idempotency.key_of(request)
    if key is None:
        answer = await _submit(request, None)
    else:
        async with request.app[SUBMIT_KEYS].hold(request_owner(request), key):  # a concurrent duplicate waits here
            answer = await _submit(request, key)
    if wait is None:
        return answer
    return await _when_done(request, answer, wait)


async def _when_done(request: web.Request, accepted: web.Response, seconds: int) -> web.Response:
    """The task as GET /tasks/<id> shows it (200) if it ends within `seconds`, else the
    202 `accepted` as it was; both say that the wait was applied."""
    accepted.headers.update(prefer.applied(seconds))
    assert accepted.text is not None
    task_id = SubmitResponse.model_validate_json(accepted.text).task_id
    registry = request.app[REGISTRY]
    closing = asyncio.ensure_future(request.app[CLOSING].wait())  # shutdown answers at once
    try:
        async with asyncio.timeout(seconds):
            await unless(registry.wait_final(task_id), closing)
    except TimeoutError:
        return accepted
    finally:
        closing.cancel()
    task = await registry.get(task_id, request_owner(request))
    if task is None or not task.status.is_final:
        return accepted  # forgotten meanwhile, or the service is stopping
    return json_response(task, headers={"Location": f"/tasks/{task_id}", **prefer.applied(seconds)})


async def _submit(request: web.Request, key: str | None) -> web.Response:
    """Read the request into one value, then replay it (a key seen before) or admit it
    (callback URL, model), then start its task (if the service and the caller have room)."""
    stored = await _stored(request, key)
    if stored is None and request.content_type == MULTIPART:
        await _check_room(request)  # before reading what may be megabytes of files
    asked = await read_task_request(request)
    handed_over = False  # once the task is being made, it owns the reserved upload bytes
    try:
        request_key = asked.idempotency_key(key)
        if stored is not None and request_key is not None:
            return idempotency.replay(stored, request_key)
        callback_url = await _check_callback(request, asked.callback_url)
        model = _admit(request, asked.model)
        handed_over = True
        return await _start_task(request, asked, model, callback_url, request_key)
    finally:
        if not handed_over:
            request.app[UPLOAD_BUDGET].release(asked.reserved)


async def _stored(request: web.Request, key: str | None) -> Submission | None:
    """What the request's idempotency key already stands for, if anything."""
    if key is None:
        return None
    return await request.app[REGISTRY].find_submission(request_owner(request), key)


async def _check_callback(request: web.Request, url: str | None) -> str | None:
    """`url`, if the service will call it back."""
    if url is None:
        return None
    sender = request.app.get(WEBHOOKS)
    if sender is None:
        raise ApiError(
            400,
            "webhooks_disabled",
            "callback_url needs the service to be started with a webhook secret (--webhook-secret or "
            "ICS_WEBHOOK_SECRET) to sign its webhooks",
        )
    try:
        await sender.check_url(url, request.app[SETTINGS].max_url_length)
    except CallbackRefused as exc:
        raise ApiError(400, "callback_url_refused", f"callback_url: {exc}") from None
    return url


def _admit(request: web.Request, model: str | None) -> str:
    """The model the task will use, if it is available."""
    model = model or request.app[SETTINGS].default_model
    _check_model(request.app[CATALOG], model)
    return model


async def _start_task(
    request: web.Request,
    asked: TaskRequest,
    model: str,
    callback_url: str | None,
    key: IdempotencyKey | None,
) -> web.Response:
    """Create the task (which then owns the reserved bytes of the request's files) and answer
    202; the store refuses it in the same step if it does not fit the limits (429)."""
    settings = request.app[SETTINGS]
    try:
        task = await request.app[ENGINE].create(
            asked.urls,
            model,
            asked.top_k or settings.default_top_k,
            request_owner(request),
            asked.files or None,
            callback_url=callback_url,
            idempotency=key,
            priority=asked.priority or Priority.INTERACTIVE,
            admission=Admission(settings.max_active_images, settings.max_active_images_per_key),
        )
    except SubmissionExists as exc:  # a replica beside this one took the key a moment ago
        assert key is not None
        return idempotency.replay(exc.submission, key)
    except NoRoom as exc:
        raise _no_room(exc, len(asked.urls)) from None
    response = SubmitResponse(task_id=task.task_id, status=task.status, total=len(task.items))
    return json_response(response, status=202, headers={"Location": f"/tasks/{task.task_id}"})


async def _check_room(request: web.Request) -> None:
    """429 if the service is full already (the store checks again, for the task's every image)."""
    unfinished = await request.app[REGISTRY].unfinished_images()
    if unfinished >= request.app[SETTINGS].max_active_images:
        raise _no_room(NoRoom("service", unfinished, request.app[SETTINGS].max_active_images), 1)


def _no_room(refused: NoRoom, images: int) -> ApiError:
    details = {"unfinished": refused.unfinished, "limit": refused.limit, "images": images}
    if refused.scope == "owner":
        return too_busy(
            f"your API key already has {refused.unfinished} unfinished images and may have {refused.limit} "
            f"(--max-active-images-per-key); this task holds {images}: wait for your tasks to finish, or "
            "cancel some, then retry",
            code="key_quota_exceeded",
            details=details,
        )
    return too_busy(
        f"the service already has {refused.unfinished} unfinished images and takes {refused.limit}; retry later",
        details=details,
    )


def _check_model(catalog: ModelCatalog, name: str) -> None:
    info = catalog.get(name)
    if info is not None and info.weights_present():
        return
    available = catalog.available()
    if info is None:
        code, reason = "unknown_model", f"unknown model {name!r}"
    else:
        code, reason = "model_unavailable", info.missing_weights()
    raise ApiError(400, code, f"{reason}; available: {', '.join(available)}", details={"available": available})


@routes.get("/tasks")
@documented(
    summary="Task summaries, newest first, a page at a time",
    query=TaskListQuery,
    replies={200: Reply("A page of tasks", TaskPage)},
    errors={
        400: "unknown_parameter, invalid_status, invalid_priority, invalid_limit, invalid_cursor",
        **STORE_UNAVAILABLE,
    },
)
async def list_tasks(request: web.Request) -> web.Response:
    query = validate(TaskListQuery, request.query, query_error_code)
    try:
        page = await request.app[REGISTRY].page(
            query.status, query.limit, query.cursor, request_owner(request), query.priority
        )
    except InvalidCursor:
        raise ApiError(400, "invalid_cursor", "the cursor is not one this service issued") from None
    return json_response(page)


@routes.get("/tasks/{task_id}")
@documented(
    summary="A task with every item's status and labels; with `wait`, a long poll",
    query=TaskQuery,
    replies={200: Reply("The task (after a change, or when `wait` ran out)", TaskDetail)},
    errors={**TASK_NOT_FOUND, 400: "unknown_parameter, invalid_wait, invalid_done", **STORE_UNAVAILABLE},
)
async def get_task(request: web.Request) -> web.Response:
    query = validate(TaskQuery, request.query, query_error_code)
    registry, owner, task_id = request.app[REGISTRY], request_owner(request), task_id_of(request)
    if query.wait:
        closing = asyncio.ensure_future(request.app[CLOSING].wait())  # shutdown answers at once
        try:
            async with asyncio.timeout(query.wait):
                await unless(registry.follow(task_id, seen=query.done, owner=owner), closing)
        except TimeoutError:
            pass  # no change in time: answer with the task as it is
        finally:
            closing.cancel()
    body = await registry.get_json(task_id, owner)
    if body is None:
        raise task_not_found(request)
    return web.Response(body=body, content_type="application/json")


async def unless(news: Awaitable[T], *stops: asyncio.Future[Any]) -> T | None:
    """`news`, or None (and `news` cancelled) if one of `stops` completes first."""
    waiting = asyncio.ensure_future(news)
    try:
        await asyncio.wait({waiting, *stops}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not waiting.done():
            waiting.cancel()
    return waiting.result() if waiting.done() and not waiting.cancelled() else None


@routes.delete("/tasks/{task_id}")
@documented(
    summary="Cancel the task if it is active, then forget it",
    replies={200: Reply("The task's final snapshot", TaskDetail)},
    errors={**TASK_NOT_FOUND, **STORE_UNAVAILABLE},
)
async def delete_task(request: web.Request) -> web.Response:
    return _task_or_404(request, await request.app[ENGINE].remove(task_id_of(request), request_owner(request)))


@routes.post("/tasks/{task_id}/cancel")
@documented(
    summary="Cancel the task if it is active and keep it visible",
    replies={200: Reply("The task's final snapshot", TaskDetail)},
    errors={**TASK_NOT_FOUND, **STORE_UNAVAILABLE},
)
async def cancel_task(request: web.Request) -> web.Response:
    return _task_or_404(request, await request.app[ENGINE].cancel(task_id_of(request), request_owner(request)))


def task_id_of(request: web.Request) -> str:
    return request.match_info["task_id"]


def task_not_found(request: web.Request) -> ApiError:
    """Unknown ids and other keys' tasks look the same."""
    return ApiError(404, "task_not_found", f"no task {task_id_of(request)!r}")


def _task_or_404(request: web.Request, task: TaskDetail | None) -> web.Response:
    if task is None:
        raise task_not_found(request)
    return json_response(task)
