"""The results file of a bulk job: one row per input, appended in completion order as
results arrive (sort by `index` for input order): JSON Lines, or CSV for a `.csv` name. Rows
are flushed as they are written, so an interrupted job loses none it reported; `--resume`
reopens the file, drops a row cut off mid-line, and learns which inputs have their row."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from client.appending import AppendFile
from client.inputs import Source

FIELDS = ["index", "input", "status", "label", "score", "labels", "error_code", "error_message", "task_id"]


class Seen:
    """A set of input indices as a bitmap: 100,000 inputs take 12.5 KB."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self.count = 0

    def add(self, index: int) -> None:
        byte, bit = divmod(index, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(byte + 1 - len(self._bits)))
        if not self._bits[byte] & (1 << bit):
            self._bits[byte] |= 1 << bit
            self.count += 1

    def __contains__(self, index: int) -> bool:
        byte, bit = divmod(index, 8)
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << bit))


def row(source: Source, item: dict[str, Any], task_id: str) -> dict[str, Any]:
    labels = [{"label": label["label"], "score": label["score"]} for label in item.get("labels") or []]
    error = item.get("error") or {}
    return {
        "index": source.index,
        "input": source.value,
        "status": item["status"],
        "label": labels[0]["label"] if labels else None,
        "score": labels[0]["score"] if labels else None,
        "labels": labels,
        "error_code": error.get("code"),
        "error_message": error.get("message"),
        "task_id": task_id,
    }


class ResultsFile:
    """Rows out, as JSON Lines or CSV, to a file (each row appended whole: `AppendFile`) or
    to standard output; `written` holds the inputs that have theirs."""

    def __init__(self, path: Path | None, resume: bool) -> None:
        self.path = path
        self.written = Seen()
        self.failed_before = 0  # rows of earlier runs (`resume`) whose input was not classified
        self._csv = path is not None and path.suffix.lower() == ".csv"
        self._file: AppendFile | None = None
        if path is not None:
            if resume and path.exists():
                self._read_back(path)
            self._file = AppendFile(path)
            if self._csv and self._file.size() == 0:
                self._out(_csv_line(dict(zip(FIELDS, FIELDS, strict=True))))

    def _read_back(self, path: Path) -> None:
        _drop_partial_line(path)  # a row cut off by a kill: its input gets its row again
        with path.open(newline="", encoding="utf-8") as handle:
            records = csv.DictReader(handle) if self._csv else (json.loads(line) for line in handle if line.strip())
            for record in records:
                self.written.add(int(record["index"]))
                self.failed_before += record["status"] != "succeeded"

    def write(self, source: Source, item: dict[str, Any], task_id: str) -> None:
        if source.index in self.written:
            return
        record = row(source, item, task_id)
        if self._csv:
            self._out(_csv_line({**record, "labels": json.dumps(record["labels"])}))
        else:
            self._out(json.dumps(record) + "\n")
        self.written.add(source.index)

    def _out(self, line: str) -> None:
        """One row, on disk (or on its way down the pipe) as it arrives."""
        if self._file is not None:
            self._file.append(line)
        else:
            sys.stdout.write(line)
            sys.stdout.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        else:
            sys.stdout.flush()


def _csv_line(record: dict[str, Any]) -> str:
    buffer = io.StringIO()
    csv.DictWriter(buffer, FIELDS).writerow(record)
    return buffer.getvalue()


def _drop_partial_line(path: Path, block: int = 65_536) -> None:
    """Cut the file after its last newline, reading backwards a block at a time."""
    with path.open("r+b") as raw:
        end = raw.seek(0, 2)
        position = end
        while position > 0:
            start = max(0, position - block)
            raw.seek(start)
            chunk = raw.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                if start + newline + 1 < end:
                    raw.truncate(start + newline + 1)
                return
            position = start
        raw.truncate(0)  # not one whole line
