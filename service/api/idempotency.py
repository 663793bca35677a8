"""The `Idempotency-Key` header of `POST /submit`, after Stripe's: a client that retries a
submit (a timeout, a lost connection) with the same key gets the original answer back, with
`Idempotent-Replayed: true`, instead of a second task. The key is remembered per API key for
`--idempotency-ttl` seconds, with a fingerprint of the request, so the same key with another
request is refused. Only accepted submits are remembered: a refused one may be retried as is.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from service.api.errors import ApiError
from service.api.schemas import SubmitResponse
from service.tasks.idempotency import IdempotencyKey, Submission
from service.tasks.records import TaskStatus

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"  # visible ASCII: what survives every proxy unchanged


def key_of(request: web.Request) -> str | None:
    """The request's idempotency key, if it has one; ApiError(400) for a malformed one."""
    values = request.headers.getall(HEADER, [])
    if not values:
        return None
    key = values[0]
    if len(values) > 1 or not key or len(key) > MAX_KEY_CHARS or not all("\x21" <= char <= "\x7e" for char in key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"{HEADER} must be given once, as 1 to {MAX_KEY_CHARS} visible ASCII characters (a UUID is a good one)",
        )
    return key


def fingerprint(
    urls: list[str],
    files: dict[int, bytes],
    model: str | None,
    top_k: int | None,
    callback_url: str | None,
    priority: str | None = None,
) -> str:
    """What makes two submits the same request: the items in order (files by their bytes'
    hash) and the options as given (a priority only when given: the fingerprints of keys
    stored before priorities existed stay as they were)."""
    request: dict[str, object] = {
        "urls": urls,
        "files": {str(index): hashlib.sha256(data).hexdigest() for index, data in files.items()},
        "model": model,
        "top_k": top_k,
        "callback_url": callback_url,
    }
    if priority is not None:
        request["priority"] = priority
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def replay(stored: Submission, key: IdempotencyKey) -> web.Response:
    """The original answer for a submit seen before, or ApiError(422) if the key came with
    another request then."""
    if stored.fingerprint != key.fingerprint:
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"this {HEADER} was used with a different request (task {stored.task_id}); use a new key for a new request",
            details={"task_id": stored.task_id},
        )
    body = SubmitResponse(task_id=stored.task_id, status=TaskStatus.QUEUED, total=stored.total)
    return web.json_response(
        text=body.model_dump_json(),
        status=202,
        headers={"Location": f"/tasks/{stored.task_id}", REPLAYED: "true"},
    )


class KeyLocks:
    """One submit at a time per (owner, key) in this process: a concurrent duplicate waits
    for the first one and then gets its answer, so two requests with one key make one task."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str | None, str], tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, owner: str | None, key: str) -> AsyncIterator[None]:
        name = (owner, key)
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)
