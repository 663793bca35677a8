"""API keys: required when configured, compared safely, and tasks are private to their key."""

from __future__ import annotations

import logging

import pytest
from aiohttp.test_utils import TestClient

from service.stores.memory.registry import InMemoryRegistry
from tests.conftest import ImageServer, ServiceFactory

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def submit_as(client: TestClient, key: str, url: str) -> str:
    response = await client.post("/submit", json={"urls": [url]}, headers=auth(key))
    assert response.status == 202
    return (await response.json())["task_id"]


async def test_every_endpoint_but_health_needs_a_valid_key(make_service: ServiceFactory) -> None:
    client = await make_service(api_keys=f"{ALICE},{BOB}")
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200  # probes carry no credentials
    for headers in [{}, auth("wrong"), {"Authorization": ALICE}, {"Authorization": f"Basic {ALICE}"}, auth("")]:
        for method, path in [
            ("POST", "/submit"),
            ("GET", "/tasks"),
            ("GET", "/tasks/x"),
            ("GET", "/metrics"),
            ("DELETE", "/tasks/x"),
            ("POST", "/tasks/x/cancel"),
            ("GET", "/tasks/x/events"),
            ("GET", "/workers"),
            ("GET", "/models"),
        ]:
            response = await client.request(method, path, headers=headers, json={"urls": ["http://example.com/a"]})
            assert response.status == 401, (method, path, headers)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await response.json())["error"]["code"] == "unauthorized"
    assert (await client.get("/tasks", headers=auth(BOB))).status == 200


async def test_tasks_are_invisible_to_other_keys(
    make_service: ServiceFactory, image_server: ImageServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await make_service(api_keys=f"{ALICE},{BOB}")
    alices = await submit_as(client, ALICE, image_server.url("/photos/coffee"))
    bobs = await submit_as(client, BOB, image_server.url("/photos/rocket"))

    alice_list = await (await client.get("/tasks", headers=auth(ALICE))).json()
    assert [task["task_id"] for task in alice_list["tasks"]] == [alices]
    assert (await client.get(f"/tasks/{alices}", headers=auth(ALICE))).status == 200
    for method, path in [
        ("GET", f"/tasks/{alices}"),
        ("POST", f"/tasks/{alices}/cancel"),
        ("GET", f"/tasks/{alices}/events"),
        ("DELETE", f"/tasks/{alices}"),
    ]:
        response = await client.request(method, path, headers=auth(BOB))
        assert response.status == 404, (method, path)
        assert (await response.json())["error"]["code"] == "task_not_found"
    # Bob's attempts changed nothing: Alice's task was neither cancelled nor removed.
    task = await (await client.get(f"/tasks/{alices}", headers=auth(ALICE))).json()
    assert task["status"] != "cancelled"
    bob_list = await (await client.get("/tasks", headers=auth(BOB))).json()
    assert [task["task_id"] for task in bob_list["tasks"]] == [bobs]

    assert ALICE not in caplog.text and BOB not in caplog.text  # keys are never logged


async def test_registry_owner_isolation_covers_cursor_pages() -> None:
    registry = InMemoryRegistry()
    mine = [(await registry.create([f"u{n}"], "m", 1, owner="a")).task_id for n in range(3)]
    await registry.create(["x"], "m", 1, owner="b")
    first = await registry.page(None, 2, None, owner="a")
    second = await registry.page(None, 2, first.next_cursor, owner="a")
    assert [task.task_id for task in first.tasks + second.tasks] == mine[::-1]
    assert await registry.remove(mine[0], owner="b") is None
    assert await registry.get(mine[0], owner="a") is not None
