"""The sending side of `inference.handover`: a few files in a private directory on a RAM
file system, one per batch in flight, reused from batch to batch.

A batch goes through the executor's pipe as before when there is no such file system or
when a file cannot be made or written (a full `/dev/shm`: Docker's is 64 MB unless
`--shm-size` says more). Files are only written and read, never mapped, so a full file
system is an error to fall back from, not a crash. A file that grew past `KEEP_BYTES` for a
batch of large images is emptied afterwards, so shared memory stays at a few MB per worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from inference.handover import SharedBatch

log = logging.getLogger(__name__)

SHARED_MEMORY = Path("/dev/shm")
PREFIX = "ics-batches-"
LOCK = "lock"  # held while the directory is in use; free once its process has ended
KEEP_BYTES = 8 * 1024 * 1024  # a file may stay this big between batches (16 photos: ~1.5 MB)


@dataclass
class _File:
    path: str
    descriptor: int
    size: int = 0


class BatchFiles:
    """Batch files in `directory` (created, private to this process, removed by `close`)."""

    def __init__(self, root: Path) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
        self._lock = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self._free: list[_File] = []
        self._lent: dict[str, _File] = {}
        self._count = 0
        self._warned = False

    @classmethod
    def on_shared_memory(cls) -> BatchFiles | None:
        """On `/dev/shm` where there is one (Linux); None elsewhere (batches use the pipe)."""
        try:
            return cls(SHARED_MEMORY) if SHARED_MEMORY.is_dir() else None
        except OSError as exc:
            log.warning("batches go to workers through the pipe: %s is not usable (%s)", SHARED_MEMORY, exc)
            return None

    def put(self, images: list[bytes]) -> SharedBatch | None:
        """The images written to a free file; None if that failed (send them as they are)."""
        try:
            file = self._free.pop() if self._free else self._new_file()
        except OSError as exc:
            self._fell_back(exc)
            return None
        spans = []
        offset = 0
        try:
            for image in images:
                if os.pwrite(file.descriptor, image, offset) != len(image):
                    raise OSError(f"short write to {file.path}")
                spans.append((offset, len(image)))
                offset += len(image)
        except OSError as exc:
            self._fell_back(exc)
            self._empty(file)
            self._free.append(file)
            return None
        file.size = max(file.size, offset)
        self._lent[file.path] = file
        return SharedBatch(file.path, tuple(spans))

    def release(self, batch: SharedBatch, reuse: bool) -> None:
        """The batch's file is free again. Without `reuse` (its call was abandoned, so a
        worker may still read it) the file is dropped instead."""
        file = self._lent.pop(batch.path, None)
        if file is None:  # closed meanwhile
            return
        if not reuse:
            self._drop(file)
            return
        if file.size > KEEP_BYTES:
            self._empty(file)
        self._free.append(file)

    def close(self) -> None:
        for file in [*self._free, *self._lent.values()]:
            self._drop(file)
        self._free.clear()
        self._lent.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
        os.close(self._lock)

    def _fell_back(self, error: OSError) -> None:
        if not self._warned:  # once: a full /dev/shm would say it for every batch
            log.warning("a batch goes to its worker through the pipe: %s", error)
            self._warned = True

    def _new_file(self) -> _File:
        self._count += 1
        path = str(self.directory / str(self._count))
        return _File(path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))

    @staticmethod
    def _empty(file: _File) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(file.descriptor, 0)
        file.size = 0

    def _drop(self, file: _File) -> None:
        # Emptied first: a worker that still has it open would otherwise keep its memory.
        self._empty(file)
        os.close(file.descriptor)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file.path)


def remove_orphans(root: Path, settle_seconds: float) -> int:
    """Directories left by processes that were killed: nobody holds their lock any more, or
    they have none and are older than `settle_seconds` (killed between making the directory
    and its lock). Returns how many went."""
    removed = 0
    for directory in root.glob(f"{PREFIX}*"):
        try:
            lock = os.open(directory / LOCK, os.O_RDWR)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - directory.stat().st_mtime > settle_seconds:
                    shutil.rmtree(directory, ignore_errors=True)
                    removed += 1
            continue
        except OSError:  # not ours
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # in use
        else:
            shutil.rmtree(directory, ignore_errors=True)
            removed += 1
        finally:
            os.close(lock)
    return removed
