"""Bulk jobs: any number of inputs, sent in tasks of at most the service's own limit with
`concurrency` tasks in flight, each result written as a row as soon as it arrives
(`client.results`), and every task recorded in a manifest (`client.manifest`) so that an
interrupted job, run again with `--resume`, collects the tasks it had rather than submitting
them again and submits only what never got a row.

Inputs are read once, in order, and never held all at once: a chunk is planned when it is
full, and planning waits for a free slot. An input the service cannot take (a line that is
not an http(s) URL, a URL it refuses, a file that is too large or unreadable) gets a failed
row of its own; the rest of its chunk goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from client.api import ClientError, Inputs, follow, submit
from client.inputs import Source
from client.manifest import Chunk, Manifest
from client.results import ResultsFile


@dataclass
class Counts:
    classified: int = 0
    failed: int = 0  # failed or cancelled
    started: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return self.classified + self.failed


@dataclass(frozen=True)
class Options:
    model: str | None
    top_k: int | None
    callback_url: str | None
    concurrency: int
    priority: str = "batch"  # a bulk job's tasks run in the capacity interactive work leaves


class BulkJob:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        options: Options,
        results: ResultsFile,
        manifest: Manifest,
        bar: tqdm[Any],
        tell: Callable[[str], None],
    ) -> None:
        self._session = session
        self._options = options
        self._results = results
        self._manifest = manifest
        self._bar = bar
        self._tell = tell
        self._slots = asyncio.Semaphore(options.concurrency)
        self.counts = Counts()

    async def run(self, sources: Iterator[Source], limit: int) -> Counts:
        """Every input gets its row (or the job fails: ClientError, aiohttp.ClientError)."""
        try:
            await self._feed(sources, limit)
        except ExceptionGroup as failures:  # the first failure says why the job stopped
            raise failures.exceptions[0] from None
        return self.counts

    async def _feed(self, sources: Iterator[Source], limit: int) -> None:
        """Read the inputs once: chunks of a resumed job start once all their inputs are
        seen; the rest, without a row yet, go into new chunks of `limit`."""
        resumed = {chunk.number: chunk for chunk in self._manifest.pending.values()}
        waiting: dict[int, Chunk] = {}  # input index -> the resumed chunk that holds it
        for chunk in resumed.values():
            waiting.update(dict.fromkeys(chunk.inputs, chunk))
        known: dict[int, dict[int, Source]] = {number: {} for number in resumed}  # resumed chunks' sources
        batch: list[Source] = []
        async with asyncio.TaskGroup() as tasks:
            for source in sources:
                if source.index in self._results.written:
                    self._bar.update(1)
                if source.index in waiting:  # a resumed chunk starts once all its inputs are seen
                    chunk = waiting.pop(source.index)
                    known[chunk.number][source.index] = source
                    if len(known[chunk.number]) == len(chunk.inputs):
                        await self._start(tasks, chunk, known.pop(chunk.number))
                    continue
                if source.index in self._results.written:
                    continue
                if source.kind == "invalid":
                    self._fail(source, "invalid_input", source.problem)
                    continue
                batch.append(source)
                if len(batch) == limit:
                    await self._plan(tasks, batch)
                    batch = []
            if batch:
                await self._plan(tasks, batch)
            for number, chunk_sources in known.items():  # inputs gone from the list since: dropped
                self._manifest.dropped(resumed[number])
                if chunk_sources:
                    await self._plan(tasks, list(chunk_sources.values()))

    async def _plan(self, tasks: asyncio.TaskGroup, sources: list[Source]) -> None:
        """A new chunk: files first, then URLs, the order the service numbers a form's items."""
        ordered = [source for source in sources if not source.is_url] + [source for source in sources if source.is_url]
        await self._start(tasks, None, {source.index: source for source in ordered})

    async def _start(self, tasks: asyncio.TaskGroup, chunk: Chunk | None, sources: dict[int, Source]) -> None:
        await self._slots.acquire()  # reading the inputs waits here while `concurrency` tasks run
        if chunk is None:
            chunk = self._manifest.planned(list(sources))
        running = tasks.create_task(self._run_chunk(chunk, sources))
        running.add_done_callback(lambda _: self._slots.release())

    async def _run_chunk(self, chunk: Chunk, sources: dict[int, Source]) -> None:
        ordered = [sources[index] for index in chunk.inputs]
        if chunk.task_id is None:
            try:
                task_id = await submit(
                    self._session,
                    Inputs([s.value for s in ordered if s.is_url], [Path(s.value) for s in ordered if not s.is_url]),
                    self._options.model,
                    self._options.top_k,
                    self._options.callback_url,
                    tell=self._tell,
                    key=chunk.key,
                    priority=self._options.priority,
                )
            except ClientError as exc:
                if exc.code == "idempotency_key_reused" and isinstance(exc.details, dict):
                    # Sent before with other options (the command changed): that task is the chunk's.
                    task_id = str(exc.details["task_id"])
                elif await self._refused_inputs(chunk, ordered, exc):
                    return
                else:
                    raise
            except OSError as exc:  # a file gone or unreadable since it was listed
                bad = next((s for s in ordered if not s.is_url and not _readable(Path(s.value))), None)
                if bad is None:
                    raise
                self._fail(bad, "unreadable_file", exc.strerror or str(exc))
                await self._replan(chunk, [s for s in ordered if s is not bad])
                return
            self._manifest.accepted(chunk, task_id)
        assert chunk.task_id is not None
        try:
            async for item in follow(self._session, chunk.task_id):
                if "task_id" in item:
                    break  # the final summary: every item came before it
                self._write(ordered[item["index"]], item, chunk.task_id)
        except ClientError as exc:
            if exc.code != "task_not_found":
                raise
            self._tell(f"task {chunk.task_id} is gone from the service; its images without a row are sent again")
            await self._replan(chunk, [s for s in ordered if s.index not in self._results.written])
            return
        self._manifest.finished(chunk)  # after its rows: each is flushed as it is written

    async def _refused_inputs(self, chunk: Chunk, ordered: list[Source], exc: ClientError) -> bool:
        """A refusal that names the inputs at fault: those get failed rows and the rest is
        sent again as a new chunk (a changed request needs a new idempotency key)."""
        urls = [source for source in ordered if source.is_url]
        files = [source for source in ordered if not source.is_url]
        bad: dict[int, tuple[Source, str]] = {}
        for detail in exc.details if isinstance(exc.details, list) else []:
            if not isinstance(detail, dict):
                continue
            field_name = str(detail.get("field", ""))
            if exc.code == "invalid_url" and field_name.startswith("urls."):
                position = int(field_name.split(".")[1])
                if position < len(urls):
                    bad[urls[position].index] = (urls[position], str(detail.get("message", "invalid URL")))
            elif exc.code == "upload_too_large" and field_name == "files":
                for source in files:
                    if Path(source.value).name == detail.get("filename"):
                        bad[source.index] = (source, f"larger than the service takes: {exc}")
        if not bad:
            return False
        for source, message in bad.values():
            self._fail(source, exc.code or "refused", message)
        await self._replan(chunk, [source for source in ordered if source.index not in bad])
        return True

    async def _replan(self, chunk: Chunk, rest: list[Source]) -> None:
        self._manifest.dropped(chunk)
        if rest:
            new = self._manifest.planned([source.index for source in rest])
            await self._run_chunk(new, {source.index: source for source in rest})

    def _write(self, source: Source, item: dict[str, Any], task_id: str) -> None:
        if source.index in self._results.written:
            return
        self._results.write(source, item, task_id)
        if item["status"] == "succeeded":
            self.counts.classified += 1
        else:
            self.counts.failed += 1
            self._bar.set_postfix(failed=self.counts.failed, refresh=False)
        self._bar.update(1)

    def _fail(self, source: Source, code: str, message: str) -> None:
        self._write(source, {"status": "failed", "error": {"code": code, "message": message}}, "")

    async def cancel_in_flight(self) -> int:
        """Cancel the tasks of the chunks not finished (Ctrl-C with `--cancel`); how many."""
        cancelled = 0
        for chunk in list(self._manifest.pending.values()):
            if chunk.task_id is not None:
                async with self._session.post(f"tasks/{chunk.task_id}/cancel") as response:
                    cancelled += response.status == 200
            self._manifest.dropped(chunk)
        return cancelled


def _readable(path: Path) -> bool:
    try:
        with path.open("rb"):
            return True
    except OSError:
        return False
