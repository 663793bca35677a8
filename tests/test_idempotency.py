"""Idempotent submits: the same `Idempotency-Key` with the same request gets the original
task back, with another request a 422; concurrent duplicates make one task; keys are per API
key, expire, survive a restart of a durable store, and stay bounded in number."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.metrics import Metrics
from service.stores.redis.registry import RedisRegistry
from service.stores.sqlite.registry import SqliteRegistry
from service.tasks.idempotency import IdempotencyKey, SubmissionExists, SubmissionKeys
from testing.redis_server import RedisServer
from tests.conftest import PHOTOS_DIR, ImageServer, ServiceFactory, metric

KEY = "5f0c6a1e-3c1b-4f7e-9d6a-0b1c2d3e4f50"


def keyed(key: str = KEY, api_key: str | None = None) -> dict[str, str]:
    headers = {"Idempotency-Key": key}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


async def task_ids(client: Any, headers: dict[str, str] | None = None) -> list[str]:
    page = await (await client.get("/tasks", headers=headers or {})).json()
    return [task["task_id"] for task in page["tasks"]]


async def test_a_retried_submit_returns_the_original_task(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service()
    body = {"urls": [image_server.url("/photos/coffee")], "top_k": 2}
    first = await client.post("/submit", json=body, headers=keyed())
    assert first.status == 202 and "Idempotent-Replayed" not in first.headers
    original = await first.json()
    again = await client.post("/submit", json=body, headers=keyed())
    assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == original
    assert again.headers["Location"] == first.headers["Location"]
    assert await task_ids(client) == [original["task_id"]]
    assert image_server.total_hits() == 1  # downloaded once

    other = await client.post("/submit", json={**body, "top_k": 3}, headers=keyed())
    error = (await other.json())["error"]
    assert other.status == 422 and error["code"] == "idempotency_key_reused"
    assert error["details"] == {"task_id": original["task_id"]}
    fresh = await client.post("/submit", json=body, headers=keyed("another-key"))
    assert fresh.status == 202 and (await fresh.json())["task_id"] != original["task_id"]
    plain = await client.post("/submit", json=body)  # without a key: always a new task
    assert plain.status == 202 and len(await task_ids(client)) == 3


async def test_concurrent_duplicates_make_one_task(make_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_service(webhook_secret="s")
    # The callback's host name is resolved between the key's check and the task's creation: a
    # window a duplicate could slip through, were it not made to wait.
    body = {
        "urls": [image_server.url(f"/slow/coffee?delay=0.2&n={n}") for n in range(3)],
        "callback_url": "http://localhost:9/hook",
    }
    answers = await asyncio.gather(*(client.post("/submit", json=body, headers=keyed()) for _ in range(8)))
    assert [answer.status for answer in answers] == [202] * 8
    ids = {(await answer.json())["task_id"] for answer in answers}
    assert len(ids) == 1 and await task_ids(client) == list(ids)
    assert sum(answer.headers.get("Idempotent-Replayed") == "true" for answer in answers) == 7


async def test_keys_are_per_api_key(make_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_service(api_keys="key-alice,key-bob")
    body = {"urls": [image_server.url("/photos/coffee")]}
    alice = await client.post("/submit", json=body, headers=keyed(api_key="key-alice"))
    bob = await client.post("/submit", json=body, headers=keyed(api_key="key-bob"))
    assert alice.status == bob.status == 202
    assert (await alice.json())["task_id"] != (await bob.json())["task_id"]
    changed = await client.post("/submit", json={"urls": body["urls"] * 2}, headers=keyed(api_key="key-bob"))
    assert changed.status == 422  # bob's key, bob's request


async def test_a_key_expires_after_its_ttl(make_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_service(idempotency_ttl=0.5)
    url = image_server.url("/photos/coffee")
    first = await (await client.post("/submit", json={"urls": [url]}, headers=keyed())).json()
    await asyncio.sleep(0.7)
    later = await client.post("/submit", json={"urls": [url, url]}, headers=keyed())  # another request: fine now
    assert later.status == 202 and (await later.json())["task_id"] != first["task_id"]


async def test_a_form_submit_is_replayed_and_holds_no_upload(make_service: ServiceFactory) -> None:
    client = await make_service()

    def form(name: str) -> aiohttp.FormData:
        data = aiohttp.FormData(default_to_multipart=True)
        data.add_field("files", (PHOTOS_DIR / name).read_bytes(), filename=name)
        return data

    first = await client.post("/submit", data=form("coffee.jpg"), headers=keyed())
    again = await client.post("/submit", data=form("coffee.jpg"), headers=keyed())
    assert first.status == again.status == 202 and await first.json() == await again.json()
    other = await client.post("/submit", data=form("rocket.jpg"), headers=keyed())  # other bytes: another request
    assert other.status == 422
    async with asyncio.timeout(30):
        while await metric(client, "ics_upload_bytes") != 0:
            await asyncio.sleep(0.05)
    assert len(await task_ids(client)) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "with space", "caf\u00e9"])
async def test_a_malformed_key_is_refused(make_service: ServiceFactory, key: str) -> None:
    client = await make_service()
    headers = {"Idempotency-Key": key.encode().decode("latin-1")}
    response = await client.post("/submit", json={"urls": ["http://203.0.113.9/a.jpg"]}, headers=headers)
    assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_idempotency_key"
    assert await task_ids(client) == []


async def test_keys_survive_a_restart_and_expire_on_disk(tmp_path: Path) -> None:
    now = [1_000_000.0]
    registry = await SqliteRegistry.open(tmp_path, 3600, 100, Metrics(), clock=lambda: now[0], idempotency_ttl=60)
    task = await registry.create(["u"], "m", 1, "alice", idempotency=IdempotencyKey("k", "print"))
    await registry.close()

    reopened = await SqliteRegistry.open(tmp_path, 3600, 100, Metrics(), clock=lambda: now[0], idempotency_ttl=60)
    stored = await reopened.find_submission("alice", "k")
    assert stored is not None and (stored.task_id, stored.fingerprint, stored.total) == (task.task_id, "print", 1)
    assert await reopened.find_submission(None, "k") is None
    now[0] += 61
    assert await reopened.find_submission("alice", "k") is None
    await reopened.close()
    now[0] -= 30  # the row was deleted, not merely hidden
    again = await SqliteRegistry.open(tmp_path, 3600, 100, Metrics(), clock=lambda: now[0], idempotency_ttl=60)
    assert await again.find_submission("alice", "k") is None
    await again.close()


def test_keys_in_memory_are_bounded_oldest_first() -> None:
    keys = SubmissionKeys(ttl=60, max_keys=3, clock=lambda: 0.0)
    forgotten = []
    for n in range(5):
        forgotten += keys.add(None, IdempotencyKey(f"k{n}", "p"), f"t{n}", 1)[1]
    assert len(keys) == 3 and [submission.key for submission in forgotten] == ["k0", "k1"]
    assert keys.get(None, "k0") is None and keys.get(None, "k4") is not None


async def test_keys_in_redis_are_shared_bounded_oldest_first_and_taken_once(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Two replicas on one Redis: a key one of them took is the other's answer, and a
    submit racing with it on the other replica is told which task it stands for."""
    one = await RedisRegistry.open(redis_server.url, 3600, 100, prefix=redis_prefix, max_keys=3)
    other = await RedisRegistry.open(redis_server.url, 3600, 100, prefix=redis_prefix, max_keys=3)
    first = await one.create(["u"], "m", 1, owner="alice", idempotency=IdempotencyKey("k0", "p"))
    stored = await other.find_submission("alice", "k0")
    assert stored is not None and (stored.task_id, stored.fingerprint, stored.total) == (first.task_id, "p", 1)
    assert await other.find_submission("bob", "k0") is None
    with pytest.raises(SubmissionExists) as raced:
        await other.create(["u"], "m", 1, owner="alice", idempotency=IdempotencyKey("k0", "p"))
    assert raced.value.submission.task_id == first.task_id
    for n in range(1, 5):
        await one.create(["u"], "m", 1, owner="alice", idempotency=IdempotencyKey(f"k{n}", "p"))
    assert [await other.find_submission("alice", f"k{n}") is not None for n in range(5)] == [False] * 2 + [True] * 3
    await one.close()
    await other.close()
