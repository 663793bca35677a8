"""The shared batch queue: full batches at once, partial ones after the wait, per model; and
a worker's forward passes over the batch it is handed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from bench.images import make_images
from inference.engine import Engine
from inference.models import LoadedModel
from inference.preprocess import preprocess
from inference.protocol import Prediction, Rejection, WorkerConfig
from inference.specs import EMBEDDED, local_info
from service.broker.local import BatchQueue
from service.tasks.queues import QueuedImage


def job(task: str, index: int, model: str = "m") -> QueuedImage:
    return QueuedImage(task_id=task, index=index, model=model, top_k=1, data=b"")


async def test_a_full_batch_leaves_at_once_and_mixes_tasks() -> None:
    queue = BatchQueue(capacity=10)
    for n in range(3):
        await queue.put(job("a", n))
        await queue.put(job("b", n))
    batch = await asyncio.wait_for(queue.next_batch(max_size=4, max_wait=60), 1)
    assert [(j.task_id, j.index) for j in batch] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert len(queue) == 2


async def test_a_partial_batch_leaves_after_the_wait() -> None:
    queue = BatchQueue(capacity=10)
    await queue.put(job("a", 0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    batch = await queue.next_batch(max_size=4, max_wait=0.05)
    assert [j.index for j in batch] == [0]
    assert 0.04 <= loop.time() - started < 1


async def test_images_arriving_during_the_wait_join_the_batch() -> None:
    queue = BatchQueue(capacity=10)
    await queue.put(job("a", 0))
    pending = asyncio.create_task(queue.next_batch(max_size=2, max_wait=5))
    await asyncio.sleep(0.01)
    await queue.put(job("b", 0))
    batch = await asyncio.wait_for(pending, 1)
    assert [j.task_id for j in batch] == ["a", "b"]


async def test_batches_hold_one_model() -> None:
    queue = BatchQueue(capacity=10)
    for j in [job("a", 0, "x"), job("a", 1, "y"), job("b", 0, "x")]:
        await queue.put(j)
    first = await queue.next_batch(max_size=4, max_wait=0)
    assert [(j.task_id, j.model) for j in first] == [("a", "x"), ("b", "x")]
    second = await queue.next_batch(max_size=4, max_wait=0)
    assert [(j.task_id, j.model) for j in second] == [("a", "y")]


async def test_put_waits_while_full_and_drop_task_frees_room() -> None:
    queue = BatchQueue(capacity=2)
    await queue.put(job("a", 0))
    await queue.put(job("a", 1))
    blocked = asyncio.create_task(queue.put(job("b", 0)))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    assert await queue.drop_task("a") == 2
    await asyncio.wait_for(blocked, 1)
    batch = await queue.next_batch(max_size=4, max_wait=0)
    assert [j.task_id for j in batch] == ["b"]


async def test_a_put_cancelled_while_waiting_leaves_its_room_to_the_next() -> None:
    queue = BatchQueue(capacity=1)
    await queue.put(job("a", 0))
    cancelled = asyncio.create_task(queue.put(job("b", 0)))
    waiting = asyncio.create_task(queue.put(job("c", 0)))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    assert [j.task_id for j in await queue.next_batch(max_size=4, max_wait=0)] == ["a"]
    await asyncio.wait_for(waiting, 1)
    assert cancelled.cancelled()
    assert [j.task_id for j in await queue.next_batch(max_size=4, max_wait=0)] == ["c"]


async def test_a_batch_taken_lets_in_as_many_waiting_puts_as_it_made_room_for() -> None:
    queue = BatchQueue(capacity=3)
    for n in range(3):
        await queue.put(job("a", n))
    waiting = [asyncio.create_task(queue.put(job("b", n))) for n in range(3)]
    await asyncio.sleep(0.01)
    await queue.next_batch(max_size=2, max_wait=0)
    await asyncio.sleep(0.01)
    assert [task.done() for task in waiting] == [True, True, False]
    assert len(queue) == 3
    await queue.next_batch(max_size=1, max_wait=0)
    await asyncio.wait_for(waiting[2], 1)


def test_a_worker_runs_a_batch_in_forward_passes_of_its_batch_size(tmp_path: Path) -> None:
    """The service hands a worker up to two passes' worth of images: they run in passes of
    the model's size, each row's label and refine flag in its own slot (an undecodable
    image takes one too), the unsure rows of the whole batch refined together."""
    info = local_info(EMBEDDED)
    passes: list[int] = []
    refines: list[int] = []

    def fast(pixels: np.ndarray) -> np.ndarray:
        passes.append(len(pixels))
        sure = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]], dtype=np.float32)
        unsure = np.array([[1.0, 1.0, 0.0]], dtype=np.float32)
        return np.stack([unsure[0] if int(row.mean()) % 3 == 0 else sure[int(row.mean()) % 2] for row in pixels])

    def exact(pixels: np.ndarray) -> np.ndarray:
        refines.append(len(pixels))
        return np.tile(np.array([0.0, 0.0, 5.0], dtype=np.float32), (len(pixels), 1))

    engine = Engine(WorkerConfig(info, "openvino", 1, 10**8, tmp_path, batch_size=4))
    categories = ("a", "b", "c")
    engine.models[info.name] = LoadedModel(info, fast, categories, "bf16", exact, refine_margin=0.5, pass_size=4)
    images = make_images(9)
    images.insert(5, b"not an image")
    outcomes = engine.classify(info, images, [1] * len(images))

    assert passes == [4, 4, 1]  # nine decodable images
    assert refines == [2]  # the unsure ones of the first and the last pass, in one pass
    assert isinstance(outcomes[5], Rejection)
    for data, outcome in zip(images, outcomes, strict=True):
        if data == b"not an image":
            continue
        mean = int(preprocess(data, info.preprocessing, 10**8).mean())
        assert isinstance(outcome, Prediction)
        expected = "c" if mean % 3 == 0 else categories[mean % 2]
        assert (outcome.labels[0].label, outcome.refined) == (expected, mean % 3 == 0)


def test_more_unsure_images_than_a_pass_holds_are_refined_in_passes() -> None:
    """Every count up to the pass size is warmed at load, none above: so neither pass runs more."""
    calls: list[tuple[str, int]] = []

    def fast(pixels: np.ndarray) -> np.ndarray:
        calls.append(("fast", len(pixels)))
        return np.ones((len(pixels), 3), dtype=np.float32)  # a tie everywhere: every row unsure

    def exact(pixels: np.ndarray) -> np.ndarray:
        calls.append(("exact", len(pixels)))
        return pixels[:, :3].astype(np.float32)

    model = LoadedModel(local_info(EMBEDDED), fast, ("a", "b", "c"), "bf16", exact, refine_margin=0.5, pass_size=2)
    pixels = np.repeat(np.arange(5, dtype=np.uint8)[:, None], 3, axis=1)
    logits, refined = model.forward(pixels)
    assert calls == [("fast", 2), ("fast", 2), ("fast", 1), ("exact", 2), ("exact", 2), ("exact", 1)]
    assert refined.tolist() == [0, 1, 2, 3, 4] and logits[:, 0].tolist() == [0, 1, 2, 3, 4]
