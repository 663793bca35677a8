"""The published contract: `/openapi.json` is a valid OpenAPI 3.1 document built from the
same models the handlers use, Swagger UI is served offline at `/docs`, and schemathesis,
generating many requests for every operation against `run_service.py`, finds no 5xx and no
response that breaks the document."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.appkeys import OPENAPI
from service.api.openapi import build_openapi
from service.app import create_app
from service.settings import load_settings
from tests.conftest import ServiceFactory, started_service

# Under pytest-xdist schemathesis' per-operation tests collapse into one that runs nothing: the
# tests of the property run stay in one process, in order (the coverage test reads what it recorded).
SERIAL = pytest.mark.serial

EXAMPLES_PER_OPERATION = 60
# Every response check, and "a request the document forbids is refused". Not
# positive_data_acceptance: some requests the schema allows are still refused on purpose, for
# reasons a JSON schema cannot state (a URL without a host, a cursor this service never issued,
# an unknown model name); each such refusal is a documented 400.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


# Small limits, so generated tasks stay small and 429s show up.
FLAGS = [
    "--max-urls-per-task",
    "5",
    "--max-active-images",
    "40",
    "--connect-timeout",
    "1",
    "--download-timeout",
    "2",
    "--shutdown-grace",
    "0",
]
# The document the service started with FLAGS serves (a test checks they are the same). Built
# here, not fetched in a fixture: schemathesis' fixture loader does not run on pytest 9.
DOCUMENT = json.loads(create_app(load_settings(FLAGS))[OPENAPI])


@pytest.fixture(scope="module")
def service_url() -> Iterator[str]:
    """A real service (an e2e fixture: see `tests.conftest.E2E_FIXTURES`)."""
    with started_service(*FLAGS) as base:
        yield base


def events_as_schemathesis_reads_them(document: dict[str, Any]) -> dict[str, Any]:
    """The document with each event stream's `schema` replaced by its `x-event-schema`:
    before OpenAPI 3.2, schemathesis reads an event stream's `schema` as the schema of each
    event, and checks every event against it; the document keeps that schema in the extension,
    beside the string schema generated clients need."""
    adapted = copy.deepcopy(document)
    for operations in adapted["paths"].values():
        for operation in operations.values():
            for response in operation["responses"].values():
                for content in response.get("content", {}).values():
                    if "x-event-schema" in content:
                        content["schema"] = content.pop("x-event-schema")
    return adapted


schema = schemathesis.openapi.from_dict(events_as_schemathesis_reads_them(DOCUMENT))
schema.config.generation.update(max_examples=EXAMPLES_PER_OPERATION)
CALLS: dict[str, int] = {}


@SERIAL
@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_honours_the_document(case: Any, service_url: str) -> None:
    case.call_and_validate(base_url=service_url, checks=CHECKS, timeout=30)
    CALLS[case.operation.label] = CALLS.get(case.operation.label, 0) + 1


STATEFUL: list[tuple[str, int]] = []


@SERIAL
def test_a_stateful_walk_from_created_tasks_along_the_links_finds_no_error(service_url: str) -> None:
    """From `POST /submit` along its links (get, cancel, delete, events of the task it made)."""

    # The document's own links only, and requests it allows: a walk replays steps against a
    # service whose tasks changed meanwhile, and what it draws must not depend on that.
    walk = schemathesis.openapi.from_dict(events_as_schemathesis_reads_them(DOCUMENT))
    walk.config.phases.stateful.inference.algorithms = []
    walk.config.generation.update(modes=[GenerationMode.POSITIVE])
    walk.config.phases.stateful.generation.update(modes=[GenerationMode.POSITIVE])

    class Walk(walk.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": service_url, "timeout": 30}

        def after_call(self, response: Any, case: Any) -> None:
            STATEFUL.append((case.operation.label, response.status_code))

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any) -> None:
            checks = [check for check in CHECKS if check is not negative_data_rejection]
            case.validate_response(response, checks=checks, transport_kwargs=kwargs)

    # No shrinking: a replay meets a service whose tasks changed meanwhile, so it would not
    # replay; a failure is reported as first found.
    Walk.run(
        settings=settings(
            max_examples=60,
            stateful_step_count=6,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.generate],
        )
    )
    linked = {label for label, status in STATEFUL if status == 200}
    assert {"GET /tasks/{task_id}", "POST /tasks/{task_id}/cancel", "DELETE /tasks/{task_id}"} <= linked, STATEFUL
    assert "GET /tasks/{task_id}/events" in linked, STATEFUL


def test_submit_links_to_the_task_operations() -> None:
    links = DOCUMENT["paths"]["/submit"]["post"]["responses"]["202"]["links"]
    operations = {
        item[method]["operationId"]: f"{method.upper()} {path}"
        for path, item in DOCUMENT["paths"].items()
        for method in item
    }
    assert {name: operations[link["operationId"]] for name, link in links.items()} == {
        "GetTask": "GET /tasks/{task_id}",
        "CancelTask": "POST /tasks/{task_id}/cancel",
        "DeleteTask": "DELETE /tasks/{task_id}",
        "TaskEvents": "GET /tasks/{task_id}/events",
    }
    assert all(link["parameters"] == {"task_id": "$response.body#/task_id"} for link in links.values())
    header, prefer = [p for p in DOCUMENT["paths"]["/submit"]["post"]["parameters"] if p["in"] == "header"]
    assert header["name"] == "Idempotency-Key" and header["schema"]["maxLength"] == 255
    assert prefer["name"] == "Prefer" and "wait=N" in prefer["description"]
    finished = DOCUMENT["paths"]["/submit"]["post"]["responses"]["200"]
    assert finished["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/TaskDetail"}
    assert "Preference-Applied" in finished["headers"]
    submit = DOCUMENT["components"]["schemas"]["SubmitRequest"]["properties"]
    assert submit["callback_url"]["anyOf"][0]["maxLength"] == 2048


@SERIAL
@pytest.mark.e2e  # reads what the property run against the real service recorded
def test_the_property_run_covered_every_operation(request: pytest.FixtureRequest) -> None:
    if not any(item.name.startswith("test_every_operation_honours_the_document") for item in request.session.items):
        pytest.skip("reads what the property run records; it is not selected in this run")
    operations = {f"{method.upper()} {path}" for path, item in DOCUMENT["paths"].items() for method in item}
    assert set(CALLS) == operations
    assert min(CALLS.values()) >= 10, CALLS  # many generated requests per operation


def test_document_is_valid_and_describes_every_route(service_url: str) -> None:
    document = requests.get(f"{service_url}/openapi.json", timeout=10).json()
    assert document == DOCUMENT
    validate(document)  # OpenAPI 3.1 meta-schema
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/healthz",
        "/readyz",
        "/metrics",
        "/models",
        "/workers",
        "/submit",
        "/tasks",
        "/tasks/{task_id}",
        "/tasks/{task_id}/cancel",
        "/tasks/{task_id}/events",
        "/tasks/{task_id}/results",
    }  # not the page, the docs and this document: no generated client should offer them as operations
    submit = document["components"]["schemas"]["SubmitRequest"]["properties"]
    assert submit["urls"]["maxItems"] == 5  # the running service's own --max-urls-per-task
    assert submit["top_k"]["anyOf"][0]["maximum"] == 20


def test_the_event_stream_is_text_with_its_events_shape_beside() -> None:
    """A generated client reads the stream as text (a JSON schema made them parse it as one
    object and crash); the shape of each event is the `x-event-schema` extension."""
    (stream,) = DOCUMENT["paths"]["/tasks/{task_id}/events"]["get"]["responses"]["200"]["content"].items()
    media_type, content = stream
    assert media_type == "text/event-stream"
    assert content == {"schema": {"type": "string"}, "x-event-schema": {"$ref": "#/components/schemas/ServerEvent"}}
    assert "ServerEvent" in DOCUMENT["components"]["schemas"]
    results = DOCUMENT["paths"]["/tasks/{task_id}/results"]["get"]["responses"]["200"]["content"]
    assert set(results) == {"text/csv", "application/jsonl"}


def test_docs_page_works_offline(service_url: str) -> None:
    page = requests.get(f"{service_url}/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']https?://""", page.text), "the page must not load from a CDN"
    assets = re.findall(r"""(?:src|href)=["'](/docs/static/[^"']+)""", page.text)
    assert any(asset.endswith("swagger-ui-bundle.js") for asset in assets)
    for asset in assets:
        response = requests.get(service_url + asset, timeout=10)
        assert response.status_code == 200, asset
        assert len(response.content) > 1000, asset
    assert 'url: "/openapi.json"' in page.text


async def test_auth_adds_the_bearer_scheme_and_keeps_docs_public(make_service: ServiceFactory) -> None:
    client = await make_service(api_keys="k-123")
    response = await client.get("/openapi.json")
    assert response.status == 200  # public, like the probes
    document = await response.json()
    assert document["components"]["securitySchemes"]["apiKey"] == {"type": "http", "scheme": "bearer"}
    assert "401" in document["paths"]["/submit"]["post"]["responses"]
    assert "security" not in document["paths"]["/healthz"]["get"]
    assert (await client.get("/docs")).status == 200
    assert (await client.get("/docs/static/swagger-ui.css")).status == 200
    assert (await client.get("/tasks")).status == 401


def test_a_route_without_a_description_is_refused() -> None:
    from aiohttp import web

    app = web.Application()
    app[OPENAPI] = b""

    async def undocumented(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/undocumented", undocumented)
    with pytest.raises(RuntimeError, match="GET /undocumented has no OpenAPI description"):
        build_openapi(app, "t", "1", auth=False)
