"""Live progress: `GET /tasks/<id>/events` as Server-Sent Events, from the registry's
completion order. A watcher joining late first gets every result so far; one that leaves
is noticed at the next ping and costs nothing after that."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from service.api.appkeys import CLOSING, METRICS, REGISTRY
from service.api.auth import request_owner
from service.api.errors import STORE_UNAVAILABLE
from service.api.openapi import Reply, documented
from service.api.schemas import ProgressEvent, ServerEvent
from service.api.tasks import TASK_NOT_FOUND, task_id_of, task_not_found, unless

routes = web.RouteTableDef()

EVENT_PING_SECONDS = 5.0  # a comment line on idle event streams; a failed one notices a gone watcher


@routes.get("/tasks/{task_id}/events")
@documented(
    summary="Live progress as Server-Sent Events: `progress`, one `item` per result, then `end` (or `shutdown`)",
    replies={
        200: Reply(
            "An event stream. `progress` carries the task's `status` and its progress counts (`total`, `done`, "
            "`succeeded`, `failed`, `cancelled`), first on connecting, then after each batch of results and when "
            "the task starts running; `item` one item that reached a "
            "final state (in the order they did, each once); `end` the task summary at its final state, after "
            "which the server closes the stream; `shutdown` the task summary when the service shuts down first "
            "(the task resumes after a restart: reconnect). A watcher joining late first gets every result so far.",
            ServerEvent,
            media_type="text/event-stream",
        )
    },
    errors={**TASK_NOT_FOUND, **STORE_UNAVAILABLE},
)
async def task_events(request: web.Request) -> web.StreamResponse:
    registry, owner, task_id = request.app[REGISTRY], request_owner(request), task_id_of(request)
    update = await registry.follow(task_id, seen=0, owner=owner, wait=False)
    if update is None:
        raise task_not_found(request)
    gauge, closing = request.app[METRICS].event_streams, request.app[CLOSING]
    gauge.inc()
    stream = EventSourceResponse(ping_interval=EVENT_PING_SECONDS)
    try:
        await stream.prepare(request)
        async with stream:
            gone = asyncio.ensure_future(stream.wait())  # ends when a ping fails: the watcher left
            shutdown = asyncio.ensure_future(closing.wait())
            try:
                await stream.send(ProgressEvent.of(update.summary).model_dump_json(), event="progress")
                seen, status = 0, update.summary.status
                while update is not None:
                    for item in update.items:
                        await stream.send(item.model_dump_json(), event="item", id=str(seen))
                        seen += 1
                    if update.items or update.summary.status != status:  # results, or the task started
                        await stream.send(ProgressEvent.of(update.summary).model_dump_json(), event="progress")
                    status = update.summary.status
                    if status.is_final:
                        await stream.send(update.summary.model_dump_json(), event="end")
                        break
                    if closing.is_set():  # the task goes on after a restart: reconnect then
                        await stream.send(update.summary.model_dump_json(), event="shutdown")
                        break
                    news = registry.follow(task_id, seen=seen, owner=owner, status=status)
                    update = await unless(news, gone, shutdown)
                    if update is None and closing.is_set():  # what arrived meanwhile, then `shutdown`
                        update = await registry.follow(task_id, seen=seen, owner=owner, wait=False)
            finally:
                gone.cancel()
                shutdown.cancel()
    except ConnectionResetError:
        pass  # the watcher left while we were writing
    finally:
        gauge.dec()
    return stream
