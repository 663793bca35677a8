"""The service's HTTP API as the command-line client uses it: submit (retried safely, under an
idempotency key of its own), follow the event stream, read and cancel a task. Any refusal
becomes a ClientError that carries the service's code."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
from tqdm import tqdm

STREAM_PATIENCE = 120.0  # seconds an event stream may stay lost (a restarting service) before giving up
IDEMPOTENCY_KEY = "Idempotency-Key"


class ClientError(Exception):
    """The request could not be made or the service refused it (then with its error code
    and details)."""

    def __init__(self, message: str, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


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
    key: str | None = None,
    priority: str | None = None,
) -> str:
    """The new task's id. URLs alone go as JSON; with files, everything goes as one form
    (the files are streamed from disk, not read whole). `tell` hears about each retry
    (429 answers, busy or over the key's quota, are retried); `key` is the idempotency key
    (default: a new one); `priority`: interactive or batch (default: the service's, interactive)."""
    headers = {IDEMPOTENCY_KEY: key or uuid.uuid4().hex}
    fields = {"model": model, "top_k": top_k, "callback_url": callback_url, "priority": priority}
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


async def follow(session: aiohttp.ClientSession, task_id: str, patience: float = STREAM_PATIENCE) -> AsyncIterator[Any]:
    """Each item of the task as it reaches a final state (each once), then the task's final
    summary (a dict with `task_id` and `progress`). A dropped stream is opened again (the
    service replays every result so far) for up to `patience` seconds in a row, so a service
    that restarts meanwhile is waited for."""
    seen: set[int] = set()
    deadline = asyncio.get_running_loop().time() + patience
    pause = 0.5
    while True:
        try:
            async with session.get(f"tasks/{task_id}/events") as response:
                await _checked(response, expect_json=False)
                async for event, data in read_events(response):
                    if event == "end":
                        yield json.loads(data)
                        return
                    if event == "item" and (item := json.loads(data))["index"] not in seen:
                        seen.add(item["index"])
                        deadline = asyncio.get_running_loop().time() + patience  # it is alive
                        yield item
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
            pass
        if asyncio.get_running_loop().time() >= deadline:
            raise ClientError(f"lost the event stream of task {task_id}")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 5.0)


async def watch(session: aiohttp.ClientSession, task_id: str, bar: tqdm[Any], skip: int = 0) -> None:
    """Follow the task to its end on a progress bar (which shows `skip` items done already:
    the stream replays them first)."""
    not_classified = 0
    async for item in follow(session, task_id):
        if "task_id" in item:  # the final summary
            return
        if item["status"] != "succeeded":
            not_classified += 1
            bar.set_postfix(not_classified=not_classified, refresh=False)
        if skip:
            skip -= 1
        else:
            bar.update(1)


async def task_limit(session: aiohttp.ClientSession) -> int:
    """How many images one task may hold on this service (its own `--max-urls-per-task`, as
    its OpenAPI document publishes it)."""
    async with session.get("openapi.json") as response:
        document = await _checked(response)
    return int(document["components"]["schemas"]["SubmitRequest"]["properties"]["urls"]["maxItems"])


async def get_task(session: aiohttp.ClientSession, task_id: str) -> dict[str, Any]:
    async with session.get(f"tasks/{task_id}") as response:
        return cast(dict[str, Any], await _checked(response))


async def download_results(session: aiohttp.ClientSession, task_id: str, output: Path | None, csv: bool) -> None:
    """The task's results file (`GET /tasks/<id>/results`) into `output` (None: standard
    output), as it streams in; a file appears whole, under its name, only when complete."""
    fmt = "csv" if csv else "jsonl"
    async with session.get(f"tasks/{task_id}/results", params={"format": fmt}) as response:
        await _checked(response, expect_json=False)
        if output is None:
            async for block in response.content.iter_chunked(1 << 16):
                sys.stdout.buffer.write(block)
            sys.stdout.flush()
            return
        partial = output.with_name(output.name + ".part")
        try:
            with partial.open("wb") as handle:
                async for block in response.content.iter_chunked(1 << 16):
                    handle.write(block)
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)


async def cancel_task(session: aiohttp.ClientSession, task_id: str) -> dict[str, Any]:
    async with session.post(f"tasks/{task_id}/cancel") as response:
        return cast(dict[str, Any], await _checked(response))


async def _checked(response: aiohttp.ClientResponse, expect_json: bool = True) -> Any:
    """The JSON body of a successful answer; a refusal becomes ClientError with its code."""
    if response.status >= 400:
        code, details = None, None
        try:
            error = (await response.json())["error"]
            code, details = str(error["code"]), error.get("details")
            message = f"{code}: {error['message']}"
        except (aiohttp.ContentTypeError, ValueError, KeyError, TypeError):
            message = f"HTTP {response.status}"
        if "Retry-After" in response.headers:
            message += f" (retry after {response.headers['Retry-After']} s)"
        if response.status == 401:
            message += " (set the environment variable ICS_API_KEY to one of the service's API keys)"
        raise ClientError(f"the service refused the request: {message}", code, details)
    return await response.json() if expect_json else None
