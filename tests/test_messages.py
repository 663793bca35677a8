"""Errors that say what to do: each limit a request or an image meets is named in MiB with
the flag that sets it, and a refused address names the flags that open private networks.
The exact messages are read here, so that a change of wording is a deliberate one."""

from __future__ import annotations

from typing import Any

from tests.conftest import ImageServer, ServiceFactory, submit, wait_for_task
from tests.test_uploads import form, post_form


async def error_of(response: Any) -> dict[str, Any]:
    body = await response.json()
    return dict(body["error"])


async def test_request_and_upload_limits_are_named_in_mib_with_their_flag(make_service: ServiceFactory) -> None:
    client = await make_service(max_image_bytes=1_048_576, max_upload_bytes=3 * 1_048_576)
    too_big = await client.post("/submit", json={"urls": ["http://example.com/" + "a" * 1000] * 2000})
    assert too_big.status == 413
    assert (await error_of(too_big))["message"] == "the request body is larger than 1 MiB (--max-request-bytes)"

    status, body = await post_form(client, form(("files", b"\xff" * 1_048_577), filename="huge.jpg"))
    assert (status, body["error"]["message"]) == (413, "huge.jpg: larger than 1 MiB (--max-image-bytes)")

    parts = [("files", b"\xff" * 1_000_000)] * 4  # each under the image limit, together over the budget
    status, body = await post_form(client, form(*parts))
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert body["error"]["message"] == "uploads are limited to 3 MiB in all (--max-upload-bytes)"

    text = [("urls", "http://example.com/" + "a" * 60_000)] * 20
    status, body = await post_form(client, form(*text))
    assert body["error"]["message"] == "the form's text parts exceed 1 MiB in all (--max-request-bytes)"


async def test_a_download_over_the_limit_names_the_flag(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service(max_image_bytes=1_572_864)  # the image server's /big is 2,000,000 bytes
    task = await wait_for_task(client, (await submit(client, [image_server.url("/big")]))["task_id"])
    assert task["items"][0]["error"] == {
        "code": "download_too_large",
        "message": "the image is larger than 1.5 MiB (--max-image-bytes)",
        "http_status": None,
    }


async def test_a_blocked_address_names_the_flags_that_allow_it(
    make_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_service(allow_private_networks=False)
    task = await wait_for_task(client, (await submit(client, [image_server.url("/photos/coffee")]))["task_id"])
    assert task["items"][0]["error"] == {
        "code": "blocked_address",
        "message": "connecting to 127.0.0.1 is not allowed: not a public address (to reach private networks, start "
        "the service with --allow-private-networks, or --allowed-networks CIDR,...)",
        "http_status": None,
    }
    assert image_server.total_hits() == 0
