"""Files a bulk job appends to (its results and its manifest), a whole line at a time.

A line goes out in one `write` of its bytes; one that fails part-way (a full disk) is cut
back, so the file still ends with a whole line and `--resume` finds every row it reported.
The failure is one `ClientError` naming the file and the error (the CLI exits 2)."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from client.api import ClientError


class AppendFile:
    """`path` opened for appending (emptied first with `truncate`)."""

    def __init__(self, path: Path, truncate: bool = False) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        try:
            self._descriptor = os.open(path, flags, 0o644)
        except OSError as exc:
            raise write_error(path, exc) from None

    def size(self) -> int:
        return os.fstat(self._descriptor).st_size

    def append(self, line: str) -> None:
        """Write `line` (ending with a newline) whole, or leave the file as it was."""
        data = line.encode("utf-8", "surrogateescape")
        start = self.size()
        try:
            written = 0
            while written < len(data):
                written += os.write(self._descriptor, data[written:])
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._descriptor, start)
            raise write_error(self.path, exc) from None

    def close(self) -> None:
        os.close(self._descriptor)


def write_error(path: Path, exc: OSError) -> ClientError:
    name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    return ClientError(f"{path}: cannot write: {exc.strerror or exc}{f' ({name})' if name else ''}")
