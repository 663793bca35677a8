"""`Prefer: wait=N` on POST /submit: the finished task (200) if it ends within N seconds,
else the usual 202; `Preference-Applied` says so; N is capped by `--max-wait`; a malformed
preference is ignored (RFC 7240)."""

from __future__ import annotations

import asyncio
import time

from tests.conftest import ImageServer, ServiceFactory
from tests.fakes import FakePool, image


async def test_a_task_that_ends_in_time_is_the_answer(make_service: ServiceFactory, image_server: ImageServer) -> None:
    image_server.files["cat"] = image("cat")
    client = await make_service()
    urls = [image_server.url("/file/cat"), image_server.url("/status/404")]
    response = await client.post("/submit", json={"urls": urls}, headers={"Prefer": "respond-async, wait=10"})
    assert response.status == 200
    assert response.headers["Preference-Applied"] == "wait=10"
    task = await response.json()
    assert response.headers["Location"] == f"/tasks/{task['task_id']}"
    assert task["status"] == "completed"
    assert [(item["status"], item["labels"][0]["label"] if item["labels"] else None) for item in task["items"]] == [
        ("succeeded", "cat"),
        ("failed", None),
    ]
    same = await (await client.get(f"/tasks/{task['task_id']}")).json()
    assert same == task  # as GET /tasks/<id> shows it


async def test_a_task_still_running_after_the_wait_gets_the_usual_202(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    image_server.files["cat"] = image("cat")
    pool = FakePool()
    pool.hold.clear()  # batches wait
    client = await make_service(pool=pool, max_wait=2)
    body = {"urls": [image_server.url("/file/cat")]}

    started = time.monotonic()
    response = await client.post("/submit", json=body, headers={"Prefer": "wait=1"})
    assert response.status == 202 and 1 <= time.monotonic() - started < 5
    assert response.headers["Preference-Applied"] == "wait=1"
    assert (await response.json())["status"] == "queued"

    started = time.monotonic()
    capped = await client.post("/submit", json=body, headers={"Prefer": "wait=3600"})  # above --max-wait
    assert capped.status == 202 and 2 <= time.monotonic() - started < 6
    assert capped.headers["Preference-Applied"] == "wait=2"

    for malformed in ("wait=soon", "wait=-1", "wait=1.5", "wait"):
        started = time.monotonic()
        ignored = await client.post("/submit", json=body, headers={"Prefer": malformed})
        assert ignored.status == 202 and time.monotonic() - started < 0.5, malformed
        assert "Preference-Applied" not in ignored.headers, malformed
    pool.hold.set()


async def test_the_wait_ends_when_the_task_does_and_applies_to_a_replayed_submit(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    image_server.files["cat"] = image("cat")
    pool = FakePool()
    pool.hold.clear()
    client = await make_service(pool=pool)
    headers = {"Prefer": "wait=30", "Idempotency-Key": "3f0c1a52-6f8e-4b0e-9a55-0d1c7b9e2a41"}
    body = {"urls": [image_server.url("/file/cat")]}
    waiting = asyncio.ensure_future(client.post("/submit", json=body, headers=headers))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    started = time.monotonic()
    pool.hold.set()
    response = await waiting
    assert response.status == 200 and time.monotonic() - started < 2  # at once, not after 30 s
    task = await response.json()

    replayed = await client.post("/submit", json=body, headers=headers)
    assert replayed.status == 200 and replayed.headers["Preference-Applied"] == "wait=30"
    assert (await replayed.json())["task_id"] == task["task_id"]


async def test_max_wait_zero_turns_the_preference_off(make_service: ServiceFactory, image_server: ImageServer) -> None:
    image_server.files["cat"] = image("cat")
    client = await make_service(max_wait=0)
    response = await client.post(
        "/submit", json={"urls": [image_server.url("/file/cat")]}, headers={"Prefer": "wait=5"}
    )
    assert response.status == 202 and "Preference-Applied" not in response.headers


async def test_a_real_photo_in_one_request(make_real_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_real_service()
    response = await client.post(
        "/submit", json={"urls": [image_server.url("/photos/coffee")]}, headers={"Prefer": "wait=60"}
    )
    assert response.status == 200
    assert (await response.json())["items"][0]["labels"][0]["label"] == "espresso"
