"""A batch's image bytes handed to a worker process in a file on a RAM file system (tmpfs,
`/dev/shm` on Linux), so that the executor's pipe carries only the file's path and where
each image lies in it.

Through the pipe the web process pickled each batch (about 1.4 MB) and its feeder thread
wrote it in 64 KiB pieces while a busy worker drained them: 0.06-0.08 ms of the web
process's CPU per image. The sending side is `service.pool.handover`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Per-worker-process cache: a batch file's path -> a descriptor open for reading. The web
# process reuses its few batch files, so each worker opens each of them once.
_open_files: dict[str, int] = {}


class BatchFileUnreadable(Exception):
    """A batch file is gone or shorter than its batch: removed by someone else, or dropped
    by the web process for a call it gave up on."""


@dataclass(frozen=True)
class SharedBatch:
    """Where a batch's images are: one file, `(offset, length)` per image, in order."""

    path: str
    spans: tuple[tuple[int, int], ...]

    def read(self) -> list[bytes]:
        """The images (in a worker process); raises BatchFileUnreadable."""
        descriptor = _open_files.get(self.path)
        if descriptor is None:
            try:
                descriptor = _open_files[self.path] = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                raise BatchFileUnreadable(f"batch file {self.path} is gone") from None
        images = [os.pread(descriptor, length, offset) for offset, length in self.spans]
        if any(len(image) != length for image, (_, length) in zip(images, self.spans, strict=True)):
            raise BatchFileUnreadable(f"batch file {self.path} is shorter than its batch")
        return images


def images_of(batch: list[bytes] | SharedBatch) -> list[bytes]:
    return batch.read() if isinstance(batch, SharedBatch) else batch
