"""The registry contract, on every backend (memory, SQLite in a temporary data dir, and a real
Redis under a key prefix of its own): transitions, sticky final states, listing and
pagination, expiry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic_core import PydanticSerializationError

from service.metrics import Metrics
from service.stores.memory.registry import InMemoryRegistry
from service.stores.redis.registry import RedisRegistry
from service.stores.sqlite.registry import SqliteRegistry
from service.tasks.deliveries import payload
from service.tasks.records import ErrorInfo, ItemStatus, Label, Priority, TaskStatus, Webhook, WebhookStatus
from service.tasks.registry import Admission, InvalidCursor, ItemChange, NoRoom, TaskRegistry
from testing.redis_server import RedisServer

LABELS = [Label(label="espresso", class_index=967, score=0.9)]

MakeRegistry = Callable[..., Awaitable[TaskRegistry]]


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.e2e)])
async def make_registry(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeRegistry]:
    """`await make_registry(finished_ttl=..., max_finished=..., clock=..., metrics=...)` on this
    backend; with Redis, `store="name"` opens another replica on the store of that name."""
    opened: list[SqliteRegistry | RedisRegistry] = []

    async def make(**options: Any) -> TaskRegistry:
        options = {"finished_ttl": 3600.0, "max_finished": 10_000, **options}
        store = options.pop("store", len(opened))
        registry: SqliteRegistry | RedisRegistry
        if request.param == "memory":
            return InMemoryRegistry(**options)
        if request.param == "sqlite":
            options.setdefault("metrics", Metrics())
            registry = await SqliteRegistry.open(tmp_path / f"data{len(opened)}", **options)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            prefix = f"{request.getfixturevalue('redis_prefix')}{store}:"
            registry = await RedisRegistry.open(server.url, prefix=prefix, **options)
        opened.append(registry)
        return registry

    yield make
    for registry in opened:
        await registry.close()


async def test_create_gives_a_queued_task_with_pending_items(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    task = await registry.create(["http://a/1", "http://a/1"], "m", 5)
    assert task.status is TaskStatus.QUEUED
    assert task.started_at is None and task.finished_at is None
    assert [(item.index, item.url, item.status) for item in task.items] == [
        (0, "http://a/1", ItemStatus.PENDING),
        (1, "http://a/1", ItemStatus.PENDING),
    ]
    assert await registry.unfinished_images() == 2
    assert await registry.get(task.task_id) == task
    assert await registry.get("nope") is None


async def test_items_move_on_and_the_task_completes_when_all_are_final(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    task = await registry.create(["u0", "u1"], "m", 1)
    assert await registry.update_item(task.task_id, 0, ItemStatus.DOWNLOADING)
    running = await registry.get(task.task_id)
    assert running.status is TaskStatus.RUNNING and running.started_at is not None
    assert await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=LABELS)
    error = ErrorInfo(code="http_error", message="404", http_status=404)
    assert await registry.update_item(task.task_id, 1, ItemStatus.FAILED, error=error)

    done = await registry.get(task.task_id)
    assert done.status is TaskStatus.COMPLETED
    assert done.finished_at is not None
    assert done.progress.model_dump() == {"total": 2, "done": 2, "succeeded": 1, "failed": 1, "cancelled": 0}
    assert done.items[0].labels == LABELS and done.items[1].error == error
    assert await registry.unfinished_images() == 0


async def test_final_states_are_sticky(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    task = await registry.create(["u0", "u1"], "m", 1)
    await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=LABELS)
    assert not await registry.update_item(task.task_id, 0, ItemStatus.FAILED)

    cancelled = await registry.cancel(task.task_id)
    assert cancelled.status is TaskStatus.CANCELLED
    assert [item.status for item in cancelled.items] == [ItemStatus.SUCCEEDED, ItemStatus.CANCELLED]
    # A batch that was already in a worker reports back after the cancel: refused.
    assert not await registry.update_item(task.task_id, 1, ItemStatus.SUCCEEDED, labels=LABELS)
    assert await registry.get(task.task_id) == cancelled
    assert await registry.cancel(task.task_id) == cancelled  # cancelling twice changes nothing
    assert await registry.unfinished_images() == 0


async def test_snapshots_do_not_change_under_later_updates(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    task = await registry.create(["u0"], "m", 1)
    await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=LABELS)
    assert task.items[0].status is ItemStatus.PENDING
    assert task.status is TaskStatus.QUEUED


async def test_fail_closes_unfinished_items_with_the_task_error(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    task = await registry.create(["u0", "u1"], "m", 1)
    await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=LABELS)
    error = ErrorInfo(code="model_unavailable", message="no weights")
    assert await registry.fail(task.task_id, error)
    failed = await registry.get(task.task_id)
    assert failed.status is TaskStatus.FAILED and failed.error == error
    assert failed.items[1].status is ItemStatus.FAILED and failed.items[1].error == error
    assert failed.items[0].status is ItemStatus.SUCCEEDED
    assert not await registry.fail(task.task_id, error)
    assert (await registry.cancel(task.task_id)).status is TaskStatus.FAILED


async def test_every_outcome_is_counted_once_for_the_replica_running_the_task(make_registry: MakeRegistry) -> None:
    """`ics_images_total` counts each image once, whichever process wrote its outcome: with
    Redis, a worker's outcomes (another registry on the same Redis) count for the replica that
    runs the task, which exports them at scrape time (`observe`); the worker exports none."""
    owner_metrics, writer_metrics = Metrics(), Metrics()
    registry = await make_registry(metrics=owner_metrics, store="shared")
    writer = registry
    if isinstance(registry, RedisRegistry):
        writer = await make_registry(metrics=writer_metrics, store="shared")
    first = await registry.create(["u0", "u1", "u2"], "m", 1)
    second = await registry.create(["u0", "u1"], "m", 1)
    not_an_image = ErrorInfo(code="not_an_image", message="no")
    await writer.update_items(
        [
            ItemChange(first.task_id, 0, ItemStatus.SUCCEEDED, labels=LABELS),
            ItemChange(first.task_id, 1, ItemStatus.FAILED, error=not_an_image),
        ]
    )
    assert not await writer.update_item(first.task_id, 1, ItemStatus.SUCCEEDED, labels=LABELS)  # final already
    await registry.cancel(first.task_id)
    assert await writer.fail(second.task_id, ErrorInfo(code="worker_crashed", message="gone"))
    for _ in range(2):  # a second scrape finds nothing new
        await registry.observe()
        await writer.observe()
    assert images_total(owner_metrics) == {
        ("succeeded", ""): 1,
        ("failed", "not_an_image"): 1,
        ("cancelled", ""): 1,
        ("failed", "worker_crashed"): 2,
    }
    if writer is not registry:
        assert images_total(writer_metrics) == {}


def test_totals_counted_elsewhere_move_the_counter_on_and_a_restart_of_them_does_not_take_it_back() -> None:
    metrics = Metrics()
    metrics.images_final_totals({("succeeded", ""): 5})
    metrics.images_final_totals({("succeeded", ""): 7, ("failed", "http_error"): 1})
    assert images_total(metrics) == {("succeeded", ""): 7, ("failed", "http_error"): 1}
    metrics.images_final_totals({("succeeded", ""): 2})  # Redis's count started again (its key expired)
    assert images_total(metrics) == {("succeeded", ""): 9, ("failed", "http_error"): 1}


def images_total(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {
        (sample.labels["outcome"], sample.labels["code"]): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "ics_images_total"
    }


async def test_text_json_cannot_carry_is_replaced_and_a_change_that_cannot_be_read_is_refused(
    make_registry: MakeRegistry,
) -> None:
    """Issue 14, item 3: a file name that was not UTF-8 (a lone surrogate once decoded) made a
    task that answered 500 for good. Records replace such text; a change that still cannot
    be serialised raises and changes nothing, so every task stays readable."""
    registry = await make_registry()
    task = await registry.create(["upload:\udcff\udcfe.jpg", "u1", "u2"], "m", 1)
    assert task.items[0].url == "upload:\ufffd\ufffd.jpg"
    bad_label = [Label(label="caf\udce9", class_index=1, score=0.5)]  # not a Record: unchecked
    with pytest.raises(PydanticSerializationError):
        await registry.update_item(task.task_id, 1, ItemStatus.SUCCEEDED, labels=bad_label)
    detail = json.loads(await registry.get_json(task.task_id) or b"")
    assert detail["items"][1]["status"] == "pending" and detail["progress"]["done"] == 0
    error = ErrorInfo(code="download_failed", message="no such host: \udcff")
    assert error.message == "no such host: \ufffd"
    assert await registry.update_item(task.task_id, 1, ItemStatus.FAILED, error=error)
    assert await registry.fail(task.task_id, ErrorInfo(code="model_unavailable", message="\ud800"))
    detail = json.loads(await registry.get_json(task.task_id) or b"")
    assert detail["status"] == "failed" and detail["error"]["message"] == "\ufffd"


async def test_remove_cancels_and_forgets(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    task = await registry.create(["u0"], "m", 1)
    removed = await registry.remove(task.task_id)
    assert removed.status is TaskStatus.CANCELLED
    assert await registry.get(task.task_id) is None
    assert await registry.remove(task.task_id) is None
    assert await registry.unfinished_images() == 0


async def test_list_is_newest_first_with_filter_and_cursor(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    ids = [(await registry.create([f"u{n}"], "m", 1)).task_id for n in range(5)]
    await registry.cancel(ids[1])
    await registry.cancel(ids[3])

    first = await registry.page(None, 2, None)
    assert [task.task_id for task in first.tasks] == [ids[4], ids[3]]
    second = await registry.page(None, 2, first.next_cursor)
    assert [task.task_id for task in second.tasks] == [ids[2], ids[1]]
    third = await registry.page(None, 2, second.next_cursor)
    assert [task.task_id for task in third.tasks] == [ids[0]]
    assert third.next_cursor is None

    cancelled = await registry.page(TaskStatus.CANCELLED, 1, None)
    assert [task.task_id for task in cancelled.tasks] == [ids[3]]
    rest = await registry.page(TaskStatus.CANCELLED, 1, cancelled.next_cursor)
    assert [task.task_id for task in rest.tasks] == [ids[1]]
    assert rest.next_cursor is None

    # A cursor stays valid when the task it points at is removed meanwhile.
    await registry.remove(ids[3])
    assert [task.task_id for task in (await registry.page(None, 10, first.next_cursor)).tasks] == ids[2::-1]


@pytest.mark.parametrize("cursor", ["=", "!!!", "c2VxOng", "bm9wZTox", "//79"])  # ..., "seq:x", "nope:1", bytes
async def test_foreign_cursors_are_rejected(cursor: str, make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    with pytest.raises(InvalidCursor):
        await registry.page(None, 10, cursor)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_finished_tasks_expire_after_the_ttl(make_registry: MakeRegistry) -> None:
    clock = FakeClock()
    registry = await make_registry(finished_ttl=60, max_finished=100, clock=clock)
    done = await registry.create(["u0"], "m", 1)
    active = await registry.create(["u1"], "m", 1)
    await registry.update_item(done.task_id, 0, ItemStatus.SUCCEEDED, labels=LABELS)
    clock.now += 59
    assert await registry.get(done.task_id) is not None
    clock.now += 2
    assert await registry.get(done.task_id) is None
    assert [task.task_id for task in (await registry.page(None, 10, None)).tasks] == [active.task_id]
    clock.now += 10_000
    assert await registry.get(active.task_id) is not None  # unfinished tasks never expire


async def test_at_most_max_finished_tasks_are_kept_oldest_finished_first(make_registry: MakeRegistry) -> None:
    registry = await make_registry(finished_ttl=3600, max_finished=2, clock=FakeClock())
    ids = [(await registry.create([f"u{n}"], "m", 1)).task_id for n in range(4)]
    for task_id in (ids[2], ids[0], ids[3]):  # finish order: 2, 0, 3
        await registry.cancel(task_id)
    remaining = {task.task_id for task in (await registry.page(None, 10, None)).tasks}
    assert remaining == {ids[0], ids[3], ids[1]}  # 2 finished first, so it went; 1 is still active


async def test_finished_tasks_are_kept_as_one_serialised_snapshot(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    task = await registry.create(["u0", "u1"], "m", 1)
    await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=LABELS)
    running_json = await registry.get_json(task.task_id)
    assert running_json == (await registry.get(task.task_id)).model_dump_json().encode()

    await registry.update_item(task.task_id, 1, ItemStatus.FAILED, error=ErrorInfo(code="timeout", message="slow"))
    done = await registry.get(task.task_id)
    assert done.status is TaskStatus.COMPLETED
    assert [item.status for item in done.items] == [ItemStatus.SUCCEEDED, ItemStatus.FAILED]
    assert done.items[0].labels == LABELS
    assert await registry.get_json(task.task_id) == done.model_dump_json().encode()
    if isinstance(registry, InMemoryRegistry):
        assert registry._tasks[task.task_id].items == []  # no per-item objects left to walk
    assert await registry.get_json(task.task_id, owner="someone else") is None


async def test_a_running_tasks_json_follows_every_change(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    task = await registry.create([f"u{n}" for n in range(4)], "m", 1, owner="a")
    changes = [
        (0, ItemStatus.DOWNLOADING, None, None),
        (0, ItemStatus.SUCCEEDED, LABELS, None),
        (1, ItemStatus.FAILED, None, ErrorInfo(code="timeout", message='slow "and" late', http_status=None)),
        (2, ItemStatus.CLASSIFYING, None, None),
    ]
    for index, status, labels, error in changes:
        await registry.update_item(task.task_id, index, status, labels=labels, error=error)
        detail = await registry.get(task.task_id, owner="a")
        assert detail is not None
        assert await registry.get_json(task.task_id, owner="a") == detail.model_dump_json().encode()
        assert detail.items[index].status is status


async def test_a_finished_task_with_a_callback_hands_over_one_delivery(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    task = await registry.create(["u0"], "m", 1, callback_url="http://hooks.example/done")
    await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=LABELS)
    delivery = await asyncio.wait_for(registry.next_delivery(), 5)
    summary = (await registry.page(None, 1, None)).tasks[0]
    assert (delivery.task_id, delivery.url, delivery.attempts) == (task.task_id, "http://hooks.example/done", 0)
    assert delivery.body == payload(summary)
    delivered = Webhook(url=delivery.url, status=WebhookStatus.DELIVERED, attempts=1)
    await registry.record_delivery(delivery, delivered, None)
    done = await registry.get(task.task_id)
    assert done is not None and done.webhook == delivered
    with pytest.raises(TimeoutError):  # delivered: nothing more to try
        await asyncio.wait_for(registry.next_delivery(), 1.5)


async def test_a_task_keeps_its_priority_and_lists_filter_by_it(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    bulk = await registry.create(["http://a/1"], "m", 1, "alice", priority=Priority.BATCH)
    photo = await registry.create(["http://a/2"], "m", 1, "alice")
    assert (bulk.priority, photo.priority) == (Priority.BATCH, Priority.INTERACTIVE)
    got = await registry.get(bulk.task_id, "alice")
    assert got is not None and got.priority is Priority.BATCH
    assert json.loads(await registry.get_json(bulk.task_id, "alice") or b"")["priority"] == "batch"
    batch_page = await registry.page(None, 10, None, "alice", Priority.BATCH)
    assert [task.task_id for task in batch_page.tasks] == [bulk.task_id]
    interactive_page = await registry.page(TaskStatus.QUEUED, 10, None, "alice", Priority.INTERACTIVE)
    assert [task.task_id for task in interactive_page.tasks] == [photo.task_id]
    await registry.cancel(bulk.task_id, "alice")
    finished = await registry.get(bulk.task_id, "alice")
    assert finished is not None and finished.priority is Priority.BATCH  # the final snapshot keeps it


async def test_admission_limits_each_owner_and_the_service_in_the_same_step(make_registry: MakeRegistry) -> None:
    registry = await make_registry()
    limits = Admission(max_images=10, max_images_per_owner=3)
    first = await registry.create(["http://a/1", "http://a/2"], "m", 1, "alice", admission=limits)
    with pytest.raises(NoRoom) as refused:
        await registry.create(["http://a/3", "http://a/4"], "m", 1, "alice", admission=limits)
    assert (refused.value.scope, refused.value.unfinished, refused.value.limit) == ("owner", 2, 3)
    assert [task.task_id for task in (await registry.page(None, 10, None, "alice")).tasks] == [first.task_id]
    await registry.create(["http://a/3"], "m", 1, "alice", admission=limits)  # exactly the quota
    await registry.create(["http://b/1"] * 3, "m", 1, "bob", admission=limits)  # another key is admitted
    await registry.create(["http://c/1"] * 3, "m", 1, None, admission=limits)  # so are anonymous callers, together
    with pytest.raises(NoRoom) as anonymous:
        await registry.create(["http://c/2"], "m", 1, None, admission=limits)
    assert anonymous.value.scope == "owner"
    with pytest.raises(NoRoom) as full:
        await registry.create(["http://d/1"] * 2, "m", 1, "carol", admission=limits)  # 9 unfinished of 10
    assert (full.value.scope, full.value.unfinished, full.value.limit) == ("service", 9, 10)

    # Room comes back as images finish, and all of a task's at once when it is cancelled.
    assert await registry.update_item(first.task_id, 0, ItemStatus.SUCCEEDED, labels=LABELS)
    await registry.create(["http://a/5"], "m", 1, "alice", admission=limits)
    with pytest.raises(NoRoom):
        await registry.create(["http://a/6"], "m", 1, "alice", admission=limits)
    await registry.cancel(first.task_id, "alice")
    await registry.create(["http://a/6"], "m", 1, "alice", admission=limits)
    assert await registry.unfinished_images() == 9
