"""A full disk under the data dir (issue 34, item 1), on a real file system that runs out of
space: a small tmpfs mounted for the test (it needs the right to mount, as root has; without
it the tests skip and say so). Every write that fails is `503 store_unavailable` with
`Retry-After`, never a 500, and leaves no partial file; what needs no write still answers;
a start on a full disk is one line naming the path and the errno."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.metrics import Metrics
from service.stores.sqlite.registry import SqliteRegistry
from tests.conftest import ImageServer, ServiceFactory, submit, wait_for_task
from tests.fakes import image
from tests.test_durable import start_on
from tests.test_uploads import form, post_form


class SmallDisk:
    """A tmpfs of a few MiB, and a file that can fill it up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = path / "filler"

    def fill(self) -> None:
        """Write until the file system refuses even one more byte (ENOSPC)."""
        descriptor = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (1 << 16, 1 << 9, 1):
                with contextlib.suppress(OSError):
                    while os.write(descriptor, b"\0" * chunk):
                        pass
            with pytest.raises(OSError, match="No space left"):
                os.write(descriptor, b"\0")
        finally:
            os.close(descriptor)

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full disk here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


async def test_a_full_disk_is_503_for_writes_and_leaves_no_partial_upload(
    make_service: ServiceFactory, image_server: ImageServer, small_disk: SmallDisk
) -> None:
    data_dir = small_disk.path / "data"
    client = await make_service(data_dir=data_dir)
    done = await wait_for_task(client, (await submit(client, [image_server.url("/photos/coffee")]))["task_id"])
    running = await submit(client, [image_server.url("/slow/coffee?delay=0.5")])
    small_disk.fill()
    try:
        # The running task's outcome comes while the disk is full: it waits, queued, to be written.
        await wait_for_task(client, running["task_id"])
        # An upload: its spool file cannot be written (it was 500 internal_error, and a 0-byte file stayed).
        response = await client.post("/submit", data=form(("files", image("espresso") * 20_000)))
        assert response.status == 503, await response.text()
        assert (await response.json())["error"]["code"] == "store_unavailable"
        assert response.headers["Retry-After"].isdigit()
        assert not any((data_dir / "uploads").glob("*/*")), list((data_dir / "uploads").glob("*/*"))
        # A task by URL: the journal cannot write.
        response = await client.post("/submit", json={"urls": [image_server.url("/photos/coffee")]})
        assert response.status == 503 and (await response.json())["error"]["code"] == "store_unavailable"
        # What needs no write answers: a cancel of a task final already (it was 503), reads.
        cancelled = await client.post(f"/tasks/{done['task_id']}/cancel")
        assert cancelled.status == 200 and (await cancelled.json())["status"] == "completed"
        assert (await client.get(f"/tasks/{done['task_id']}")).status == 200
        assert (await client.get("/tasks")).status == 200
    finally:
        small_disk.free()
    status, task = await post_form(client, form(("files", image("espresso"))))
    assert status == 202, task  # space again: uploads are taken (the store retried by itself)
    assert (await wait_for_task(client, task["task_id"]))["items"][0]["labels"][0]["label"] == "espresso"


@pytest.mark.e2e
@pytest.mark.parametrize("existing", [False, True], ids=["new data dir", "data dir with tasks"])
async def test_a_start_on_a_full_disk_is_one_line_naming_the_path_and_the_errno(
    small_disk: SmallDisk, existing: bool
) -> None:
    data_dir = small_disk.path / "data"
    if existing:
        registry = await SqliteRegistry.open(data_dir, 3600, 100, Metrics())
        await registry.create(["http://example.com/a"] * 100, "m", 1)
        await registry.close()
    small_disk.fill()
    result = await start_on(data_dir)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert str(data_dir) in line and ("ENOSPC" in line or "SQLITE_FULL" in line), line
