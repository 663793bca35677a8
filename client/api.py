"""The service's HTTP API as the command-line client uses it: submit, follow the event stream,
read and cancel a task. Any refusal becomes a ClientError that carries the service's code."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
from tqdm import tqdm

STREAM_RETRIES = 5  # reconnections of the event stream before giving up


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


async def submit(session: aiohttp.ClientSession, inputs: Inputs, model: str | None, top_k: int | None) -> str:
    """The new task's id. URLs alone go as JSON; with files, everything goes as one form
    (the files are streamed from disk, not read whole)."""
    if not inputs.files:
        body: dict[str, Any] = {"urls": inputs.urls}
        body.update({key: value for key, value in (("model", model), ("top_k", top_k)) if value is not None})
        async with session.post("submit", json=body) as response:
            return str((await _checked(response))["task_id"])
    with ExitStack() as open_files:
        form = aiohttp.FormData(default_to_multipart=True)
        for path in inputs.files:
            handle = open_files.enter_context(path.open("rb"))
            form.add_field("files", handle, filename=path.name, content_type="application/octet-stream")
        for url in inputs.urls:
            form.add_field("urls", url)
        if model is not None:
            form.add_field("model", model)
        if top_k is not None:
            form.add_field("top_k", str(top_k))
        async with session.post("submit", data=form) as response:
            return str((await _checked(response))["task_id"])


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
