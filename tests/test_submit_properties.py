"""Property test: random multipart forms, file names and JSON bodies through `POST /submit` of a
real service. Every answer is JSON, 202 or 4xx, and every accepted task can be read, watched,
cancelled and deleted (a file name or URL that broke its task for good once got a 202)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import started_service

BOUNDARY = "property-boundary-9f8e7d"

# Text made of any code point, lone surrogates included (as a JSON \udcff escape sends them).
ANY_TEXT = st.text(st.characters(codec=None), max_size=40)
URLS = st.one_of(
    st.builds(lambda path: f"http://example.com/{path}", st.text(alphabet="abc/.-_%?=", max_size=20)),
    st.builds(lambda path: f"http://example.com/{path}", ANY_TEXT),
    st.builds(lambda host: f"http://{host}/a.jpg", ANY_TEXT),
    ANY_TEXT,
)
RAW_NAMES = st.binary(max_size=30).filter(lambda name: b'"' not in name and b"\r" not in name and b"\n" not in name)
FILE_PARTS = st.tuples(st.just("files"), RAW_NAMES, st.binary(min_size=1, max_size=200))
URL_PARTS = st.tuples(
    st.just("urls"),
    st.none(),
    st.one_of(URLS.map(lambda url: url.encode("utf-8", "surrogatepass")), st.binary(max_size=60)),
)
OTHER_PARTS = st.tuples(
    st.sampled_from(["files", "urls", "top_k", "model", "other"]),
    st.one_of(st.none(), RAW_NAMES),
    st.binary(max_size=60),
)

pytestmark = pytest.mark.e2e  # schemathesis against a real service
PARTS = st.lists(st.one_of(FILE_PARTS, FILE_PARTS, URL_PARTS, OTHER_PARTS), max_size=8)
JSON_BODIES = st.one_of(
    st.fixed_dictionaries(
        {"urls": st.lists(URLS, max_size=5)},
        optional={"top_k": st.one_of(st.integers(-5, 50), ANY_TEXT), "model": ANY_TEXT, "other": st.none()},
    ),
    st.recursive(st.none() | st.booleans() | st.integers() | ANY_TEXT, lambda inner: st.lists(inner, max_size=3)),
)


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    # Private networks stay blocked: URLs fail fast at the address policy, tasks end quickly.
    with started_service("--max-urls-per-task", "8") as url:
        yield url


def multipart(parts: list[tuple[str, bytes | None, bytes]]) -> bytes:
    body = bytearray()
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'.encode()
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        body += f"--{BOUNDARY}\r\n".encode() + b"Content-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n"
    return bytes(body + f"--{BOUNDARY}--\r\n".encode())


def check(base: str, response: requests.Response) -> None:
    """A JSON answer, 202 or 4xx; an accepted task can be read, watched, cancelled and deleted."""
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    body: Any = response.json()
    event(f"{response.status_code} {body['error']['code'] if 'error' in body else 'accepted'}")
    assert response.status_code == 202 or 400 <= response.status_code < 500, (response.status_code, body)
    if response.status_code != 202:
        assert isinstance(body["error"]["code"], str)
        return
    task = f"{base}/tasks/{body['task_id']}"
    assert requests.get(task, timeout=10).status_code == 200
    assert requests.get(f"{task}?wait=0.2", timeout=10).status_code == 200
    with requests.get(f"{task}/events", stream=True, timeout=10) as events:
        assert events.status_code == 200
        first = next(events.iter_lines())
        assert first.startswith(b"event:"), first
    assert requests.get(f"{base}/tasks", timeout=10).status_code == 200
    assert requests.post(f"{task}/cancel", timeout=10).status_code == 200
    assert json.loads(requests.get(task, timeout=10).content)["status"] in ("completed", "failed", "cancelled")
    assert requests.delete(task, timeout=10).status_code == 200
    assert requests.get(task, timeout=10).status_code == 404


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=PARTS)
def test_any_multipart_form(base: str, parts: list[tuple[str, bytes | None, bytes]]) -> None:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    check(base, requests.post(f"{base}/submit", data=multipart(parts), headers=headers, timeout=30))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=JSON_BODIES)
def test_any_json_body(base: str, body: Any) -> None:
    data = json.dumps(body).encode()  # lone surrogates go out as \\udcxx escapes, as any client may send
    headers = {"Content-Type": "application/json"}
    check(base, requests.post(f"{base}/submit", data=data, headers=headers, timeout=30))
