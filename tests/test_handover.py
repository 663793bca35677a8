"""Batches reach the workers through files in shared memory, and through the pipe when that fails."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from inference.handover import BatchFileUnreadable, SharedBatch, images_of
from service.api.appkeys import POOL
from service.pool.handover import KEEP_BYTES, LOCK, PREFIX, BatchFiles
from service.pool.leftovers import remove_leftovers
from tests.conftest import ImageServer, ServiceFactory, submit, wait_for_task


@pytest.fixture
def files(tmp_path: Path) -> BatchFiles:
    return BatchFiles(tmp_path)


def test_a_batch_reads_back_as_it_was_written(files: BatchFiles) -> None:
    images = [b"first image", b"", os.urandom(100_000)]
    shared = files.put(images)
    assert shared is not None
    assert images_of(shared) == images
    assert images_of(images) is images  # a batch sent through the pipe is used as it is


def test_a_file_is_reused_and_a_large_one_emptied_after_its_batch(files: BatchFiles) -> None:
    first = files.put([b"a" * 1000])
    assert first is not None
    files.release(first, reuse=True)
    second = files.put([b"b" * 10, b"c" * 20])
    assert second is not None and second.path == first.path  # no new file per batch
    assert second.read() == [b"b" * 10, b"c" * 20]
    files.release(second, reuse=True)

    large = files.put([b"x" * (KEEP_BYTES + 1)])
    assert large is not None
    files.release(large, reuse=True)
    assert Path(large.path).stat().st_size == 0  # shared memory is not held for a rare batch


def test_an_abandoned_batch_file_is_dropped(files: BatchFiles) -> None:
    """A worker may still read the batch of a call given up on: its file is not reused."""
    shared = files.put([b"image"])
    assert shared is not None
    files.release(shared, reuse=False)
    assert not Path(shared.path).exists()
    with pytest.raises(BatchFileUnreadable):
        SharedBatch(shared.path, shared.spans).read()
    assert files.put([b"next"]) is not None


def test_close_removes_the_directory(files: BatchFiles) -> None:
    lent = files.put([b"lent"])
    free = files.put([b"free"])
    assert lent is not None and free is not None
    files.release(free, reuse=True)
    files.close()
    assert not files.directory.exists()


def test_directories_of_ended_services_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    orphan = tmp_path / f"{PREFIX}orphan"
    orphan.mkdir()
    (orphan / LOCK).touch()
    (orphan / "1").write_bytes(b"left by a killed service")
    unrelated = tmp_path / "someone-else"
    unrelated.mkdir()
    live = BatchFiles(tmp_path)

    remove_leftovers(tmp_path)  # as a pool does when it starts
    assert not orphan.exists()
    assert live.directory.exists() and unrelated.exists()
    with open(live.directory / LOCK) as lock, pytest.raises(BlockingIOError):
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # still held by its owner


def test_no_file_can_be_made_falls_back_to_the_pipe(files: BatchFiles) -> None:
    shutil.rmtree(files.directory)  # removed by someone else
    assert files.put([b"image"]) is None


@pytest.mark.e2e
def test_a_failed_write_falls_back_to_the_pipe(tmp_path: Path) -> None:
    """A full file system (here: a file size limit) makes `put` return None, not raise."""
    script = textwrap.dedent(
        f"""
        import resource, signal
        from pathlib import Path
        from service.pool.handover import BatchFiles

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        files = BatchFiles(Path({str(tmp_path)!r}))
        assert files.put([b"x" * 600_000, b"y" * 600_000]) is None
        small = files.put([b"z" * 1000])
        assert small is not None and small.read() == [b"z" * 1000]
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path.cwd())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "through the pipe" in result.stderr  # said once, as a warning


async def test_the_service_hands_batches_over_in_shared_memory(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    client = await make_real_service(batch_size=4)
    directory = client.server.app[POOL].batch_directory
    assert directory is not None and directory.parent == Path("/dev/shm")
    urls = [image_server.url("/photos/coffee"), image_server.url("/photos/rocket")] * 3
    task = await wait_for_task(client, (await submit(client, urls))["task_id"])
    assert [item["labels"][0]["label"] for item in task["items"]] == ["espresso", "missile"] * 3
    written = [path for path in directory.iterdir() if path.name != LOCK]
    assert written and all(path.stat().st_size > 0 for path in written)  # kept for the next batches


async def test_batch_files_removed_under_the_service_turn_it_to_the_pipe(
    make_real_service: ServiceFactory, image_server: ImageServer
) -> None:
    """A cleaner of /dev/shm that removes the files: fresh workers cannot open them, and the
    batch is sent again through the pipe, as every later one."""
    client = await make_real_service(batch_size=2)
    pool = client.server.app[POOL]
    urls = [image_server.url("/photos/coffee"), image_server.url("/photos/rocket")]
    await wait_for_task(client, (await submit(client, urls))["task_id"])
    directory = pool.batch_directory
    assert directory is not None
    shutil.rmtree(directory)
    (victim,) = pool.worker_pids()
    os.kill(victim, signal.SIGKILL)  # its successor has not opened the files yet
    async with asyncio.timeout(60):
        while pool.restarts == 0 or not pool.check_ready():
            await asyncio.sleep(0.05)

    task = await wait_for_task(client, (await submit(client, urls * 2))["task_id"])
    assert [item["labels"][0]["label"] for item in task["items"]] == ["espresso", "missile"] * 2
    assert pool.batch_directory is None
