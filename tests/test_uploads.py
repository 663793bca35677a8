"""Uploads: POST /submit as multipart/form-data, with files and URLs, under the download limits
and one service-wide byte budget that every upload gives back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import ImageServer, ServiceFactory, metric, submit, wait_for_task

BOUNDARY = "test-boundary-7MA4YWxkTrZu0gW"


def form(*parts: tuple[str, Any], filename: str | None = None) -> aiohttp.FormData:
    """A form whose parts are (name, value): bytes become files named `filename` or `<name>.jpg`."""
    data = aiohttp.FormData(quote_fields=False, default_to_multipart=True)
    for index, (name, value) in enumerate(parts):
        if isinstance(value, bytes):
            data.add_field(name, value, filename=filename or f"image-{index}.jpg", content_type="image/jpeg")
        else:
            data.add_field(name, value)
    return data


async def post_form(client: TestClient, data: aiohttp.FormData) -> tuple[int, dict[str, Any]]:
    response = await client.post("/submit", data=data)
    return response.status, await response.json()


async def labels_of(task: dict[str, Any]) -> list[list[tuple[str, float]]]:
    return [[(label["label"], label["score"]) for label in item["labels"]] for item in task["items"]]


async def test_uploaded_photos_get_the_labels_their_urls_get(
    make_real_service: ServiceFactory, image_server: ImageServer, photos: dict[str, bytes]
) -> None:
    client = await make_real_service()
    names = ["coffee", "chelsea", "rocket"]
    by_url = await wait_for_task(
        client, (await submit(client, [image_server.url(f"/photos/{name}") for name in names]))["task_id"]
    )

    data = aiohttp.FormData()
    for name in names[:2]:
        data.add_field("files", photos[name], filename=f"{name}.jpg", content_type="image/jpeg")
    data.add_field("urls", image_server.url("/photos/rocket"))  # files and URLs mix, in part order
    data.add_field("top_k", "5")
    status, accepted = await post_form(client, data)
    assert status == 202, accepted
    assert accepted["total"] == 3
    uploaded = await wait_for_task(client, accepted["task_id"])

    assert uploaded["status"] == "completed"
    assert [item["url"] for item in uploaded["items"]] == [
        "upload:coffee.jpg",
        "upload:chelsea.jpg",
        image_server.url("/photos/rocket"),
    ]
    assert uploaded["items"][0]["labels"][0]["label"] == "espresso"
    for got, expected in zip(await labels_of(uploaded), await labels_of(by_url), strict=True):
        assert [label for label, _ in got] == [label for label, _ in expected]
        assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=1e-4)
    assert image_server.hits["/photos/coffee"] == 1  # the uploaded ones were not downloaded
    assert await metric(client, "ics_upload_bytes") == 0


# (description, form parts, expected status, expected code)
BAD_FORMS: list[tuple[str, list[tuple[str, Any]], int, str]] = [
    ("no files and no urls", [("top_k", "3")], 400, "no_images"),
    ("too many images", [("files", b"x")] * 2 + [("urls", "http://example.com/a.jpg")], 400, "too_many_images"),
    ("unknown field", [("files", b"x"), ("urgency", "1")], 400, "unknown_field"),
    ("unknown priority", [("files", b"x"), ("priority", "urgent")], 400, "invalid_priority"),
    ("files as text", [("files", "{}")], 400, "invalid_type"),
    ("file under another name", [("image", b"x")], 400, "unknown_field"),
    ("invalid url", [("urls", "ftp://example.com/a.jpg")], 400, "invalid_url"),
    ("top_k not a number", [("files", b"x"), ("top_k", "many")], 400, "invalid_type"),
    ("top_k too big", [("files", b"x"), ("top_k", "21")], 400, "top_k_out_of_range"),
    ("top_k twice", [("files", b"x"), ("top_k", "1"), ("top_k", "2")], 400, "invalid_field"),
    ("unknown model", [("files", b"x"), ("model", "resnet9000")], 400, "unknown_model"),
    ("file too large", [("files", b"\xff" * 1_000_001)], 413, "upload_too_large"),
]


async def test_bad_forms_get_json_errors_and_hold_nothing(make_service: ServiceFactory) -> None:
    client = await make_service(max_urls_per_task=2)
    for description, parts, expected_status, expected_code in BAD_FORMS:
        status, body = await post_form(client, form(*parts))
        assert (status, body["error"]["code"]) == (expected_status, expected_code), description
    malformed = await client.post(
        "/submit", data=b"--other\r\nnot a part", headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    )
    assert malformed.status == 400
    assert (await malformed.json())["error"]["code"] == "invalid_multipart"
    no_boundary = await client.post("/submit", data=b"x", headers={"Content-Type": "multipart/form-data"})
    assert no_boundary.status == 400
    assert (await no_boundary.json())["error"]["code"] == "invalid_multipart"
    assert await metric(client, "ics_upload_bytes") == 0
    assert (await (await client.get("/tasks")).json())["tasks"] == []


async def test_an_empty_file_input_is_ignored(make_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_service()
    data = aiohttp.FormData()
    data.add_field("files", b"", filename="", content_type="application/octet-stream")  # a browser's empty input
    data.add_field("urls", image_server.url("/photos/coffee"))
    status, accepted = await post_form(client, data)
    assert status == 202 and accepted["total"] == 1


def slow_upload(size: int, hold: asyncio.Event) -> AsyncIterator[bytes]:
    """A multipart body with one `size`-byte file that stops before its end until `hold` is set."""

    async def body() -> AsyncIterator[bytes]:
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="big.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        yield b"\xff" * size
        await hold.wait()
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    return body()


async def test_the_upload_budget_bounds_bytes_held_across_requests(
    make_service: ServiceFactory, photos: dict[str, bytes]
) -> None:
    client = await make_service(max_upload_bytes=170_000)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    hold = asyncio.Event()
    first = asyncio.ensure_future(client.post("/submit", data=slow_upload(150_000, hold), headers=headers))
    async with asyncio.timeout(10):  # the first upload is being read (the reader keeps back a tail)
        while (held := await metric(client, "ics_upload_bytes")) < 120_000:
            await asyncio.sleep(0.05)

    status, body = await post_form(client, form(("files", photos["coffee"])))  # 120,000+ plus 56,809 > 170,000
    assert (status, body["error"]["code"]) == (429, "too_busy")
    assert await metric(client, "ics_upload_bytes") == held  # the refused request gave its bytes back

    hold.set()
    response = await first
    assert response.status == 202
    task = await wait_for_task(client, (await response.json())["task_id"])
    assert task["items"][0]["error"]["code"] == "not_an_image"  # not a JPEG, though named one
    assert await metric(client, "ics_upload_bytes") == 0

    status, body = await post_form(client, form(("files", b"\xff" * 200_000)))  # alone over the budget
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    streamed = await client.post("/submit", data=slow_upload(200_000, asyncio.Event()), headers=headers)
    assert streamed.status == 413  # no Content-Length: refused once the bytes read pass the budget
    assert (await streamed.json())["error"]["code"] == "request_too_large"
    assert await metric(client, "ics_upload_bytes") == 0


async def test_a_full_service_refuses_uploads_and_cancelling_gives_back_uploads_not_yet_queued(
    make_service: ServiceFactory, image_server: ImageServer, photos: dict[str, bytes]
) -> None:
    client = await make_service(download_concurrency=1, max_active_images=3)
    data = aiohttp.FormData()
    data.add_field("urls", image_server.url("/slow/chelsea?delay=30"))  # holds the only download slot
    data.add_field("urls", image_server.url("/photos/rocket"))  # so the pipeline waits here
    data.add_field("files", photos["coffee"], filename="coffee.jpg")
    status, accepted = await post_form(client, data)
    assert status == 202
    assert await metric(client, "ics_upload_bytes") == len(photos["coffee"])
    # 3 of 3 active images are taken: an upload is refused before its body is read (this one never ends)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with asyncio.timeout(10):
        refused = await client.post("/submit", data=slow_upload(10_000, asyncio.Event()), headers=headers)
    assert (refused.status, (await refused.json())["error"]["code"]) == (429, "too_busy")
    assert await metric(client, "ics_upload_bytes") == len(photos["coffee"])
    cancelled = await (await client.post(f"/tasks/{accepted['task_id']}/cancel")).json()
    assert [item["status"] for item in cancelled["items"]] == ["cancelled"] * 3
    async with asyncio.timeout(5):
        while await metric(client, "ics_upload_bytes"):
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("raw_name", "stored"),
    [
        (b"\xff\xfe.jpg", "\ufffd\ufffd.jpg"),  # not UTF-8: once broke its task for good (500 on every read)
        ("caf\u00e9.jpg".encode(), "caf\u00e9.jpg"),  # UTF-8 stays as it is
        (b"dir/a\tb.jpg", "a_b.jpg"),  # a path and a control character
    ],
)
async def test_any_file_name_leaves_a_task_that_can_be_read_watched_and_deleted(
    make_real_service: ServiceFactory, photos: dict[str, bytes], raw_name: bytes, stored: str
) -> None:
    client = await make_real_service()
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="'.encode()
        + raw_name
        + b'"\r\nContent-Type: image/jpeg\r\n\r\n'
        + photos["coffee"]
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    response = await client.post(
        "/submit", data=body, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    )
    assert response.status == 202, await response.text()
    task = await wait_for_task(client, (await response.json())["task_id"])
    assert task["status"] == "completed"
    assert task["items"][0]["url"] == f"upload:{stored}"
    assert task["items"][0]["labels"][0]["label"] == "espresso"
    events = await client.get(f"/tasks/{task['task_id']}/events")
    assert events.status == 200 and "event: end" in await events.text()
    assert (await client.get("/tasks")).status == 200
    assert (await client.delete(f"/tasks/{task['task_id']}")).status == 200


def raw_form(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    """A multipart body of (field name, file name or None, bytes) parts."""
    body = bytearray()
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return bytes(body + f"--{BOUNDARY}--\r\n".encode())


@pytest.mark.parametrize(
    ("parts", "status", "code"),
    [
        # Empty file inputs counted against nothing: 300,000 of them blocked the loop for 26 s.
        ([("files", "", b"")] * 50_000 + [("urls", None, b"http://example.com/a.jpg")], 400, "too_many_parts"),
        # Text parts of 60 KiB each, 1.2 MB together: each under its own limit, not all of them.
        ([("urls", None, b"http://example.com/" + b"a" * 60_000)] * 20, 413, "request_too_large"),
    ],
    ids=["empty-file-parts", "text-parts"],
)
async def test_every_part_and_byte_of_a_form_counts(
    make_service: ServiceFactory, parts: list[tuple[str, str | None, bytes]], status: int, code: str
) -> None:
    client = await make_service()
    loop = asyncio.get_running_loop()
    started = loop.time()
    probes: list[float] = []

    async def probe_health() -> None:  # the event loop stays responsive meanwhile
        while True:
            begun = loop.time()
            await client.get("/healthz")
            probes.append(loop.time() - begun)
            await asyncio.sleep(0.01)

    prober = asyncio.ensure_future(probe_health())
    try:
        response = await client.post(
            "/submit", data=raw_form(parts), headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        )
        assert response.status == status
        assert (await response.json())["error"]["code"] == code
    finally:
        prober.cancel()
    assert loop.time() - started < 5
    assert max(probes, default=0) < 0.5
    assert await metric(client, "ics_upload_bytes") == 0
    assert (await (await client.get("/tasks")).json())["tasks"] == []
