"""End to end through HTTP: real image server, real model, real process pool."""

from __future__ import annotations

import asyncio

from tests.conftest import ImageServer, ServiceFactory, submit, wait_for_task

CAT_LABELS = {"Egyptian cat", "tiger cat", "tabby"}


async def test_photos_get_correct_labels_in_submission_order(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service()
    urls = [
        image_server.url("/photos/coffee"),
        image_server.url("/photos/chelsea"),
        image_server.url("/photos/rocket"),
        image_server.url("/photos/coffee"),  # a duplicate stays a separate item
    ]
    response = await client.post("/submit", json={"urls": urls, "top_k": 3})
    assert response.status == 202
    accepted = await response.json()
    assert accepted["status"] == "queued"
    assert accepted["total"] == 4
    assert response.headers["Location"] == f"/tasks/{accepted['task_id']}"

    task = await wait_for_task(client, accepted["task_id"])

    assert task["status"] == "completed"
    assert task["model"] == "efficientnet_lite0"
    assert task["top_k"] == 3
    assert task["progress"] == {"total": 4, "done": 4, "succeeded": 4, "failed": 0, "cancelled": 0}
    assert task["created_at"] <= task["started_at"] <= task["finished_at"]
    assert task["finished_at"].endswith("Z")
    assert [item["index"] for item in task["items"]] == [0, 1, 2, 3]
    assert [item["url"] for item in task["items"]] == urls
    top1 = [item["labels"][0] for item in task["items"]]
    assert top1[0]["label"] == "espresso" and top1[0]["class_index"] == 967 and top1[0]["score"] > 0.8
    assert top1[1]["label"] in CAT_LABELS
    assert top1[2]["label"] == "missile"
    assert task["items"][3]["labels"] == task["items"][0]["labels"]
    for item in task["items"]:
        assert item["status"] == "succeeded" and item["error"] is None
        scores = [label["score"] for label in item["labels"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(0.0 <= score <= 1.0 for score in scores)


async def test_default_top_k_and_explicit_model(make_real_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_real_service(default_top_k=4)
    accepted = await submit(client, [image_server.url("/photos/coffee")], model="efficientnet_lite0")
    task = await wait_for_task(client, accepted["task_id"])
    assert task["top_k"] == 4
    assert len(task["items"][0]["labels"]) == 4


async def test_progress_is_visible_while_running(make_real_service: ServiceFactory, image_server: ImageServer) -> None:
    client = await make_real_service(download_concurrency=1)
    urls = [image_server.url("/slow/coffee?delay=0.3") for _ in range(4)]
    accepted = await submit(client, urls)
    seen_partial = False
    while True:
        task = await (await client.get(f"/tasks/{accepted['task_id']}")).json()
        progress = task["progress"]
        assert progress["done"] == progress["succeeded"] + progress["failed"] + progress["cancelled"]
        statuses = [item["status"] for item in task["items"]]
        assert progress["succeeded"] == statuses.count("succeeded")
        assert statuses.count("downloading") <= 1  # download_concurrency=1
        if task["status"] == "running" and 0 < progress["done"] < 4:
            seen_partial = True
        if task["status"] == "completed":
            break
        await asyncio.sleep(0.02)
    assert seen_partial
    assert progress == {"total": 4, "done": 4, "succeeded": 4, "failed": 0, "cancelled": 0}


async def test_item_failures_have_codes_and_the_task_still_completes(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service()
    cases = {
        image_server.url("/photos/coffee"): ("succeeded", None),
        image_server.url("/status/404"): ("failed", "http_error"),
        image_server.url("/status/503"): ("failed", "http_error"),
        "http://127.0.0.1:1/refused.jpg": ("failed", "connection_refused"),
        "http://no-such-host.invalid/photo.jpg": ("failed", "dns_error"),
        image_server.url("/text"): ("failed", "not_an_image"),
        image_server.url("/big"): ("failed", "download_too_large"),
        image_server.url("/big-stream"): ("failed", "download_too_large"),
        image_server.url("/gzip-bomb"): ("failed", "download_too_large"),
        image_server.url("/hang"): ("failed", "timeout"),
        image_server.url("/loop"): ("failed", "too_many_redirects"),
        image_server.url("/gzip/coffee"): ("succeeded", None),  # compressed on the wire
    }
    accepted = await submit(client, list(cases))
    task = await wait_for_task(client, accepted["task_id"])

    assert task["status"] == "completed"
    assert task["error"] is None
    assert task["progress"] == {"total": 12, "done": 12, "succeeded": 2, "failed": 10, "cancelled": 0}
    for item, (url, (status, code)) in zip(task["items"], cases.items(), strict=True):
        assert item["url"] == url
        assert item["status"] == status, item
        if code is None:
            assert item["labels"][0]["label"] == "espresso"
        else:
            assert item["labels"] is None
            assert item["error"]["code"] == code, item
            assert item["error"]["message"]
    http_statuses = [item["error"]["http_status"] for item in task["items"][1:3]]
    assert http_statuses == [404, 503]
    assert image_server.hits["/loop"] == 4  # the first request and max_redirects=3 more


async def test_images_from_concurrent_tasks_all_complete(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service(batch_size=4)
    names = ["coffee", "chelsea", "rocket"]
    tasks = [await submit(client, [image_server.url(f"/photos/{name}")] * 2) for name in names]
    for name, accepted in zip(names, tasks, strict=True):
        task = await wait_for_task(client, accepted["task_id"])
        assert task["progress"]["succeeded"] == 2
        expected = {"coffee": {"espresso"}, "chelsea": CAT_LABELS, "rocket": {"missile"}}[name]
        assert all(item["labels"][0]["label"] in expected for item in task["items"])
