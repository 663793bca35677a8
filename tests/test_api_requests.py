"""Every bad request gets a JSON error with a fitting status and a stable code."""

from __future__ import annotations

from typing import Any

from tests.conftest import ImageServer, ServiceFactory, submit, wait_for_task

GOOD_URL = "http://example.com/a.jpg"

# (description, request kwargs, expected status, expected code)
BAD_SUBMISSIONS: list[tuple[str, dict[str, Any], int, str]] = [
    ("malformed JSON", {"data": b'{"urls": [', "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
    ("not UTF-8", {"data": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
    (
        "nested too deeply for the decoder",
        {"data": b"[" * 100_000 + b"]" * 100_000, "headers": {"Content-Type": "application/json"}},
        400,
        "invalid_json",
    ),
    (
        "deep nesting inside a field",
        {
            "data": b'{"urls": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "headers": {"Content-Type": "application/json"},
        },
        400,
        "invalid_json",
    ),
    (
        "wrong content type",
        {"data": b"urls=x", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    ("no content type", {"data": b'{"urls": []}'}, 415, "unsupported_media_type"),
    ("body is a list", {"json": [GOOD_URL]}, 400, "invalid_body"),
    ("missing urls", {"json": {"top_k": 3}}, 400, "missing_field"),
    ("empty urls", {"json": {"urls": []}}, 400, "empty_urls"),
    ("urls is a string", {"json": {"urls": GOOD_URL}}, 400, "invalid_type"),
    ("non-string entry", {"json": {"urls": [GOOD_URL, 42]}}, 400, "invalid_type"),
    ("relative URL", {"json": {"urls": ["/a.jpg"]}}, 400, "invalid_url"),
    ("ftp URL", {"json": {"urls": ["ftp://example.com/a.jpg"]}}, 400, "invalid_url"),
    ("no host", {"json": {"urls": ["http:///a.jpg"]}}, 400, "invalid_url"),
    ("not a URL", {"json": {"urls": ["not a url"]}}, 400, "invalid_url"),
    ("credentials in URL", {"json": {"urls": ["http://user:pw@example.com/a.jpg"]}}, 400, "invalid_url"),
    ("space in the host", {"json": {"urls": ["http://exa mple.com/a.jpg"]}}, 400, "invalid_url"),
    ("NUL in the host", {"json": {"urls": ["http://exa\x00mple.com/a.jpg"]}}, 400, "invalid_url"),
    (
        "a lone surrogate (not text)",
        {"data": b'{"urls": ["http://example.com/\\udcff.jpg"]}', "headers": {"Content-Type": "application/json"}},
        400,
        "invalid_field",  # refused as a string already, before it is looked at as a URL
    ),
    ("URL too long", {"json": {"urls": ["http://example.com/" + "a" * 3000]}}, 400, "invalid_url"),
    ("too many URLs", {"json": {"urls": [GOOD_URL] * 11}}, 400, "too_many_urls"),
    ("top_k zero", {"json": {"urls": [GOOD_URL], "top_k": 0}}, 400, "top_k_out_of_range"),
    ("top_k too big", {"json": {"urls": [GOOD_URL], "top_k": 21}}, 400, "top_k_out_of_range"),
    ("top_k a string", {"json": {"urls": [GOOD_URL], "top_k": "5"}}, 400, "invalid_type"),
    ("top_k a float", {"json": {"urls": [GOOD_URL], "top_k": 2.5}}, 400, "invalid_type"),
    ("unknown field", {"json": {"urls": [GOOD_URL], "urgency": 1}}, 400, "unknown_field"),
    ("unknown priority", {"json": {"urls": [GOOD_URL], "priority": "urgent"}}, 400, "invalid_priority"),
    ("priority not a string", {"json": {"urls": [GOOD_URL], "priority": 1}}, 400, "invalid_priority"),
    ("unknown model", {"json": {"urls": [GOOD_URL], "model": "resnet9000"}}, 400, "unknown_model"),
    ("body too large", {"json": {"urls": ["http://example.com/" + "a" * 1000] * 2000}}, 413, "request_too_large"),
]


async def test_bad_submissions_get_json_errors(make_service: ServiceFactory) -> None:
    client = await make_service(max_urls_per_task=10)
    for description, kwargs, status, code in BAD_SUBMISSIONS:
        response = await client.post("/submit", **kwargs)
        assert response.status == status, description
        assert response.content_type == "application/json", description
        body = await response.json()
        assert body["error"]["code"] == code, (description, body)
        assert body["error"]["message"], description
    listing = await (await client.get("/tasks")).json()
    assert listing["tasks"] == []  # nothing bad was queued


async def test_validation_errors_list_every_problem(make_service: ServiceFactory) -> None:
    client = await make_service()
    response = await client.post("/submit", json={"urls": [GOOD_URL, "ftp://x/y"], "top_k": 0, "extra": True})
    assert response.status == 400
    details = (await response.json())["error"]["details"]
    assert {(problem["field"], problem["code"]) for problem in details} == {
        ("urls.1", "invalid_url"),  # the field names the offending entry
        ("top_k", "top_k_out_of_range"),
        ("extra", "unknown_field"),
    }


async def test_unknown_model_lists_available_ones(make_service: ServiceFactory) -> None:
    client = await make_service()
    response = await client.post("/submit", json={"urls": [GOOD_URL], "model": "nope"})
    body = await response.json()
    assert "efficientnet_lite0" in body["error"]["message"]
    assert body["error"]["details"] == {"available": ["efficientnet_lite0"]}


async def test_unknown_task_ids_and_routes_are_json_404s(make_service: ServiceFactory) -> None:
    client = await make_service()
    for method, path in [
        ("GET", "/tasks/nope"),
        ("DELETE", "/tasks/nope"),
        ("POST", "/tasks/nope/cancel"),
    ]:
        response = await client.request(method, path)
        assert response.status == 404, (method, path)
        assert (await response.json())["error"]["code"] == "task_not_found"
    response = await client.get("/no-such-route")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
    response = await client.put("/submit")
    assert response.status == 405
    assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_submit_is_refused_with_429_when_saturated(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service(max_active_images=3, download_concurrency=1)
    slow = await submit(client, [image_server.url("/slow/coffee?delay=0.5")] * 3)
    response = await client.post("/submit", json={"urls": [image_server.url("/photos/coffee")]})
    assert response.status == 429
    assert response.headers["Retry-After"].isdigit()
    assert (await response.json())["error"]["code"] == "too_busy"
    await wait_for_task(client, slow["task_id"])
    await submit(client, [image_server.url("/photos/coffee")])  # room again once it finished


async def test_list_filters_and_paginates_newest_first(make_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_service()
    finished = [await submit(client, ["http://127.0.0.1:1/refused.jpg"]) for _ in range(5)]
    for accepted in finished:
        await wait_for_task(client, accepted["task_id"])
    running = await submit(client, [image_server.url("/slow/coffee?delay=2")])

    seen: list[str] = []
    cursor = None
    while True:
        query = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await (await client.get("/tasks", params=query)).json()
        assert len(page["tasks"]) <= 2
        assert all("items" not in task for task in page["tasks"])
        seen += [task["task_id"] for task in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    newest_first = [running["task_id"]] + [accepted["task_id"] for accepted in reversed(finished)]
    assert seen == newest_first

    completed = await (await client.get("/tasks", params={"status": "completed"})).json()
    assert [task["task_id"] for task in completed["tasks"]] == newest_first[1:]
    assert completed["next_cursor"] is None
    active = await (await client.get("/tasks", params={"status": "running"})).json()
    assert [task["task_id"] for task in active["tasks"]] == [running["task_id"]]
    assert active["tasks"][0]["progress"]["total"] == 1

    for params, code in [
        ({"status": "bogus"}, "invalid_status"),
        ({"limit": "0"}, "invalid_limit"),
        ({"limit": "x"}, "invalid_limit"),
        ({"limit": "501"}, "invalid_limit"),
        ({"cursor": "garbage!"}, "invalid_cursor"),
        ({"page": "2"}, "unknown_parameter"),
    ]:
        response = await client.get("/tasks", params=params)
        assert response.status == 400, params
        assert (await response.json())["error"]["code"] == code, params
