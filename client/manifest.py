"""The manifest beside a bulk job's results (`<output>.manifest`): which inputs went into
which task, so that an interrupted job collects its tasks instead of submitting them again.

Append-only JSON lines, flushed as written: a chunk of inputs is written before it is
submitted, with the idempotency key it is submitted with (so a submit that was accepted but
whose answer was lost is answered with the same task when it is sent again), then its task
id once accepted, then its end. A line cut off by a kill is ignored. Without an output file
the manifest is kept in memory only.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.appending import AppendFile


@dataclass
class Chunk:
    number: int
    key: str  # the submit's Idempotency-Key
    inputs: list[int]  # input indices, in the order of the task's items
    task_id: str | None = None


@dataclass
class Manifest:
    path: Path | None
    job: str = field(default_factory=lambda: uuid.uuid4().hex)
    pending: dict[int, Chunk] = field(default_factory=dict)  # chunks not yet finished
    next_number: int = 0
    _file: AppendFile | None = None

    @classmethod
    def open(cls, path: Path | None, resume: bool) -> Manifest:
        """A new manifest, or with `resume` the one an earlier run left (its pending chunks)."""
        manifest = cls(path)
        if path is not None and resume and path.exists():
            manifest._read_back(path)
        if path is not None:  # a new job starts a new manifest
            manifest._file = AppendFile(path, truncate=not resume)
            if manifest.next_number == 0:
                manifest._append({"job": manifest.job})
        return manifest

    def _read_back(self, path: Path) -> None:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # cut off by a kill: its chunk was not submitted, or is submitted again by key
                if "job" in entry:
                    self.job = entry["job"]
                    continue
                number = entry["chunk"]
                self.next_number = max(self.next_number, number + 1)
                if "inputs" in entry:
                    self.pending[number] = Chunk(number, entry["key"], entry["inputs"])
                elif "task_id" in entry and number in self.pending:
                    self.pending[number].task_id = entry["task_id"]
                elif entry.get("done") or entry.get("dropped"):
                    self.pending.pop(number, None)

    def planned(self, inputs: list[int]) -> Chunk:
        chunk = Chunk(self.next_number, f"{self.job}-{self.next_number}", inputs)
        self.next_number += 1
        self.pending[chunk.number] = chunk
        self._append({"chunk": chunk.number, "key": chunk.key, "inputs": inputs})
        return chunk

    def accepted(self, chunk: Chunk, task_id: str) -> None:
        chunk.task_id = task_id
        self._append({"chunk": chunk.number, "task_id": task_id})

    def finished(self, chunk: Chunk) -> None:
        """Every input of the chunk has its row."""
        self.pending.pop(chunk.number, None)
        self._append({"chunk": chunk.number, "done": True})

    def dropped(self, chunk: Chunk) -> None:
        """The chunk's task was cancelled: inputs without a row are submitted again later."""
        self.pending.pop(chunk.number, None)
        self._append({"chunk": chunk.number, "dropped": True})

    def pending_inputs(self) -> set[int]:
        return {index for chunk in self.pending.values() for index in chunk.inputs}

    def _append(self, entry: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.append(json.dumps(entry) + "\n")

    def close(self, complete: bool) -> None:
        """`complete`: every input has its row, so the manifest has nothing left to say."""
        if self._file is not None:
            self._file.close()
        if complete and self.path is not None:
            self.path.unlink(missing_ok=True)
