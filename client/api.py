"""The service's HTTP API as the command-line client uses it: submit (retried safely, under an
idempotency key of its own), follow the event stream, read and cancel a task. Any refusal
becomes a ClientError that carries the service's code."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
from tqdm import tqdm

STREAM_RETRIES = 5  # reconnections of the event stream before giving up
IDEMPOTENCY_KEY = "Idempotency-Key"


class ClientError(Exception):
    """The request could not be made or the service refused it."""


@dataclass(frozen=True)
class Inputs:
    urls: list[str]
    files: list[Path]


async def read_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs of a Server-Sent Events stream, until the server closes it."""
    name = "message"
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


@dataclass(frozen=True)
class Retries:
    """How a submit is retried: after a 429, as its Retry-After says (at most `max_wait`
    seconds); after a lost connection, `backoff` seconds doubling. Always with the same
    idempotency key, so a submit the service did get is not made twice."""

    attempts: int = 6
    max_wait: float = 60.0
    backoff: float = 1.0


async def submit(
    session: aiohttp.ClientSession,
    inputs: Inputs,
    model: str | None,
    top_k: int | None,
    callback_url: str | None = None,
    retries: Retries = Retries(),
    tell: Callable[[str], None] = lambda message: None,
) -> str:
    """The new task's id. URLs alone go as JSON; with files, everything goes as one form
    (the files are streamed from disk, not read whole). `tell` hears about each retry."""
    headers = {IDEMPOTENCY_KEY: uuid.uuid4().hex}
    fields = {"model": model, "top_k": top_k, "callback_url": callback_url}
    attempt = 1
    while True:
        more = attempt < retries.attempts
        try:
            with ExitStack() as open_files:
                body = _submit_body(inputs, fields, open_files)
                async with session.post("submit", headers=headers, **body) as response:
                    if response.status != 429 or not more:
                        return str((await _checked(response))["task_id"])
                    delay = min(_retry_after(response), retries.max_wait)
                    tell(f"the service is busy (429); retrying in {delay:g} s (attempt {attempt + 1})")
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            if not more:
                raise
            delay = retries.backoff * 2 ** (attempt - 1)
            tell(f"the submit was interrupted ({exc!r}); retrying in {delay:g} s (attempt {attempt + 1})")
        await asyncio.sleep(delay)
        attempt += 1


def _submit_body(inputs: Inputs, fields: dict[str, Any], open_files: ExitStack) -> dict[str, Any]:
    """`json=` or `data=` for one attempt (a form streams its files, so each attempt needs its own)."""
    given = {name: value for name, value in fields.items() if value is not None}
    if not inputs.files:
        return {"json": {"urls": inputs.urls, **given}}
    form = aiohttp.FormData(default_to_multipart=True)
    for path in inputs.files:
        handle = open_files.enter_context(path.open("rb"))
        form.add_field("files", handle, filename=path.name, content_type="application/octet-stream")
    for url in inputs.urls:
        form.add_field("urls", url)
    for name, value in given.items():
        form.add_field(name, str(value))
    return {"data": form}


def _retry_after(response: aiohttp.ClientResponse) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "1")))
    except ValueError:  # an HTTP date: not what this service sends
        return 1.0


async def watch(session: aiohttp.ClientSession, task_id: str, bar: tqdm[Any]) -> None:
    """Follow the event stream until the task's final event; reconnects if the stream drops
    (the service replays every result so far, so each is counted once)."""
    seen: set[int] = set()
    not_classified = 0
    for _ in range(STREAM_RETRIES + 1):
        try:
            async with session.get(f"tasks/{task_id}/events") as response:
                await _checked(response, expect_json=False)
                async for event, data in read_events(response):
                    if event == "end":
                        return
                    if event != "item":
                        continue
                    item = json.loads(data)
                    if item["index"] in seen:
                        continue
                    seen.add(item["index"])
                    if item["status"] != "succeeded":
                        not_classified += 1
                        bar.set_postfix(not_classified=not_classified, refresh=False)
                    bar.update(1)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            pass
        await asyncio.sleep(1)
    raise ClientError(f"lost the event stream of task {task_id}")


async def get_task(session: aiohttp.ClientSession, task_id: str) -> dict[str, Any]:
    async with session.get(f"tasks/{task_id}") as response:
        return cast(dict[str, Any], await _checked(response))


async def cancel_task(session: aiohttp.ClientSession, task_id: str) -> dict[str, Any]:
    async with session.post(f"tasks/{task_id}/cancel") as response:
        return cast(dict[str, Any], await _checked(response))


async def _checked(response: aiohttp.ClientResponse, expect_json: bool = True) -> Any:
    """The JSON body of a successful answer; a refusal becomes ClientError with its code."""
    if response.status >= 400:
        try:
            error = (await response.json())["error"]
            message = f"{error['code']}: {error['message']}"
        except (aiohttp.ContentTypeError, ValueError, KeyError, TypeError):
            message = f"HTTP {response.status}"
        if "Retry-After" in response.headers:
            message += f" (retry after {response.headers['Retry-After']} s)"
        raise ClientError(f"the service refused the request: {message}")
    return await response.json() if expect_json else None
