"""Every status the API answers is in its OpenAPI document (issue 34, item 7): each operation
is called in the situations that make it fail (its task unknown, no API key, the task store
away) and every answer's status must be one the document declares for that operation. The
property run (`test_openapi.py`) covers what generated requests can reach; a store that is
away is not among them, and `GET /tasks` answered an undeclared 503 in Redis mode."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from service.api.appkeys import OPENAPI
from testing.redis_server import RedisServer
from tests.conftest import ImageServer, ServiceFactory, submit, wait_for_task

UNKNOWN = "0" * 32


def requests_for(task_id: str, image_url: str) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """One well-formed request per operation, by its label in the document."""
    return {
        "GET /healthz": ("GET", "/healthz", {}),
        "GET /readyz": ("GET", "/readyz", {}),
        "GET /metrics": ("GET", "/metrics", {}),
        "GET /workers": ("GET", "/workers", {}),
        "GET /models": ("GET", "/models", {}),
        "POST /submit": ("POST", "/submit", {"json": {"urls": [image_url]}}),
        "GET /tasks": ("GET", "/tasks", {}),
        "GET /tasks/{task_id}": ("GET", f"/tasks/{task_id}", {}),
        "DELETE /tasks/{task_id}": ("DELETE", f"/tasks/{task_id}", {}),
        "POST /tasks/{task_id}/cancel": ("POST", f"/tasks/{task_id}/cancel", {}),
        "GET /tasks/{task_id}/events": ("GET", f"/tasks/{task_id}/events", {}),
        "GET /tasks/{task_id}/results": ("GET", f"/tasks/{task_id}/results", {"params": {"format": "csv"}}),
    }  # not /, /docs and /openapi.json: served, but not operations of the document


async def walk(client: TestClient, task_id: str, image_url: str, headers: dict[str, str] | None = None) -> None:
    """Call every operation; each status must be declared by the document for it."""
    document = json.loads(client.server.app[OPENAPI])
    declared = {
        f"{method.upper()} {path}": set(operation["responses"])
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    calls = requests_for(task_id, image_url)
    assert set(calls) == set(declared)  # a new operation needs its request here
    undeclared = {}
    for label, (method, path, options) in calls.items():
        async with client.request(method, path, headers=headers, **options) as response:
            await response.read()
            if str(response.status) not in declared[label]:
                undeclared[label] = response.status
    assert not undeclared, undeclared


@pytest.mark.e2e  # a real redis-server, stopped under the service
async def test_with_the_store_away_every_answer_is_declared(
    make_service: ServiceFactory, image_server: ImageServer, redis: RedisServer
) -> None:
    client = await make_service(redis=redis.url)
    task = await wait_for_task(client, (await submit(client, [image_server.url("/photos/coffee")]))["task_id"])
    await walk(client, task["task_id"], image_server.url("/photos/coffee"))  # all well
    redis.stop()
    response = await client.get("/tasks")
    assert response.status == 503 and (await response.json())["error"]["code"] == "store_unavailable"
    await walk(client, task["task_id"], image_server.url("/photos/coffee"))


async def test_unknown_tasks_and_missing_keys_are_declared(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service()
    await walk(client, UNKNOWN, image_server.url("/photos/coffee"))
    keyed = await make_service(api_keys="alice-key-0123456789")
    await walk(keyed, UNKNOWN, image_server.url("/photos/coffee"))  # no key: 401 where one is needed
    await walk(keyed, UNKNOWN, image_server.url("/photos/coffee"), {"Authorization": "Bearer wrong-key-0123456789"})
