"""Uploaded image bytes held by the service, under one service-wide budget.

Every uploaded byte the service holds, from the moment it is read off the socket until its
image is queued for the model, counts against `--max-upload-bytes`: however many clients
upload at once, what is held stays bounded. The API reserves bytes while it reads a form
(`service.api.forms`); a task's uploads give them back as its images are queued, or all at
once when the task ends. With a durable store the bytes are spooled to the data dir before
the task is accepted (`UploadSpool`), so a restart can still classify them; each file goes
once its item is final.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from service.tasks.registry import StoreUnavailable

log = logging.getLogger(__name__)

UPLOAD_PREFIX = "upload:"  # an uploaded file's item has url `upload:<file name>`


class UploadBudget:
    """Bytes of uploaded images held by the whole service."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size

    def hold(self, size: int) -> None:
        """Count bytes the service already holds (resumed uploads), even past the limit."""
        self.used += size


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes

    @property
    def url(self) -> str:
        """What the task's item shows in place of a URL."""
        return UPLOAD_PREFIX + self.filename


class TaskUploads(Protocol):
    """One task's uploaded images, by item index, until they are queued."""

    def __contains__(self, index: int) -> bool: ...

    async def take(self, index: int) -> bytes:
        """The image's bytes, to be queued (they leave the budget)."""
        ...

    def discard(self, indices: Iterable[int]) -> None:
        """These items are final: their bytes are no longer needed."""
        ...

    def release(self) -> None:
        """The task ended: give back and delete whatever is left (idempotent)."""
        ...

    def close(self) -> None:
        """The service stops before the task ended: give back the budget; spooled files stay
        for the next start."""
        ...


class HeldUploads:
    """Uploads kept in memory (the in-memory store: they go with the process anyway)."""

    def __init__(self, files: dict[int, bytes], budget: UploadBudget) -> None:
        self._files = dict(files)
        self._budget = budget

    def __contains__(self, index: int) -> bool:
        return index in self._files

    async def take(self, index: int) -> bytes:
        data = self._files.pop(index)
        self._budget.release(len(data))
        return data

    def discard(self, indices: Iterable[int]) -> None:
        pass  # taken (and so dropped) before they could be final

    def release(self) -> None:
        self._budget.release(sum(len(data) for data in self._files.values()))
        self._files.clear()

    def close(self) -> None:
        self.release()


class SpooledUploads:
    """Uploads in a task's directory of the spool, one file per item index."""

    def __init__(self, directory: Path, sizes: dict[int, int], budget: UploadBudget) -> None:
        self._directory = directory
        self._held = dict(sizes)  # index -> bytes still counted in the budget (not yet queued)
        self._files = set(sizes)  # indices whose file is still on disk
        self._budget = budget

    def __contains__(self, index: int) -> bool:
        return index in self._held

    async def take(self, index: int) -> bytes:
        data = await asyncio.to_thread(self._path(index).read_bytes)
        self._budget.release(self._held.pop(index))
        return data

    def discard(self, indices: Iterable[int]) -> None:
        for index in indices:
            if index in self._files:
                self._files.discard(index)
                self._path(index).unlink(missing_ok=True)

    def release(self) -> None:
        self.close()
        self._files.clear()
        shutil.rmtree(self._directory, ignore_errors=True)

    def close(self) -> None:
        self._budget.release(sum(self._held.values()))
        self._held.clear()

    def _path(self, index: int) -> Path:
        return self._directory / str(index)


class UploadSpool:
    """`<data dir>/uploads/<task id>/<item index>`: uploaded bytes kept until their item is final."""

    def __init__(self, directory: Path, budget: UploadBudget) -> None:
        self.directory = directory
        self._budget = budget

    async def save(self, task_id: str, files: dict[int, bytes]) -> SpooledUploads:
        """Write the files (and fsync them) before the task that holds them is accepted.
        Raises StoreUnavailable when they cannot be (a full disk, say), leaving none of them."""
        directory = self.directory / task_id
        try:
            await asyncio.to_thread(_write_files, directory, files)
        except OSError as exc:
            await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)
            raise StoreUnavailable(f"cannot spool the uploads to {directory}: {exc.strerror or exc}") from None
        return SpooledUploads(directory, {index: len(data) for index, data in files.items()}, self._budget)

    def resume(self, task_id: str, indices: Iterable[int]) -> SpooledUploads:
        """A resumed task's files that are still there (their bytes count in the budget again)."""
        directory = self.directory / task_id
        sizes = {}
        for index in indices:
            path = directory / str(index)
            if path.is_file():
                sizes[index] = path.stat().st_size
        self._budget.hold(sum(sizes.values()))
        return SpooledUploads(directory, sizes, self._budget)

    def sweep(self, keep: set[str]) -> None:
        """Delete the spool directories of tasks that no longer exist (a crash between
        writing the files and committing the task, or a task deleted meanwhile)."""
        if not self.directory.is_dir():
            return
        for directory in self.directory.iterdir():
            if directory.name not in keep:
                shutil.rmtree(directory, ignore_errors=True)
                log.info("removed the orphaned upload spool %s", directory.name)


def _write_files(directory: Path, files: dict[int, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for index, data in files.items():
        with (directory / str(index)).open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
