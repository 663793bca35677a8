"""The process pool: `inference.worker` in a `ProcessPoolExecutor` (spawn context, the default
model loaded once per process by the initializer).

Workers are supervised through what they report: each answers a start-up probe with its pid,
and the pool watches a pidfd per worker (Linux), so a worker that dies, even while the pool
is idle, is noticed at once by the event loop. A dead worker breaks a `ProcessPoolExecutor`
for good, so the pool then replaces the whole executor, in one place (`_replace`), once per
breakage; a batch that overruns `batch_timeout` gets its workers killed and replaced the same
way.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from inference import worker
from inference.handover import BatchFileUnreadable
from inference.lifetime import Heartbeat
from inference.protocol import Outcome, WorkerConfig
from inference.specs import ModelInfo, ModelSpec
from service.pool import DefaultModelError, InferenceTimeout, WorkerCrashed
from service.pool.handover import BatchFiles
from service.pool.leftovers import remove_leftovers

log = logging.getLogger(__name__)

START_TIMEOUT = 180.0  # seconds for every worker to load the default model
SILENT_SECONDS = 5.0  # a worker without a heartbeat this long is frozen: the workers are replaced


async def describe_models(specs: list[ModelSpec]) -> list[ModelInfo]:
    """Facts about `specs` and the torchvision weights in the cache. When torchvision is
    involved, found out in a process of its own that then exits: it imports torch, and neither
    the web process nor a worker should carry that (~1 GB); otherwise read here, at once."""
    if not worker.needs_torch(specs):
        return worker.model_infos(specs)
    executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, worker.model_infos, specs)
    finally:
        await asyncio.to_thread(executor.shutdown)


class _Workers:
    """One executor and its worker processes, known by the pids they reported."""

    def __init__(self, count: int, config: WorkerConfig) -> None:
        self.count = count
        context = multiprocessing.get_context("spawn")
        self.heartbeat = Heartbeat(count, context)
        self.executor = ProcessPoolExecutor(
            max_workers=count,
            mp_context=context,
            initializer=worker.init_worker,
            initargs=(config, self.heartbeat),
        )
        self.exited: dict[int, asyncio.Future[None]] = {}  # pid -> done when that process has ended
        self._pidfds: dict[int, int] = {}  # pid -> pidfd, while the process lives
        self.ready: asyncio.Task[None] = asyncio.ensure_future(self._probe())

    @property
    def pids(self) -> list[int]:
        return [pid for pid, exited in self.exited.items() if not exited.done()]

    def healthy(self) -> bool:
        """Started, every worker answered, none has died since."""
        ready = self.ready
        if not ready.done() or ready.cancelled() or ready.exception() is not None:
            return False
        return not any(exited.done() for exited in self.exited.values()) and not self.silent()

    def silent(self) -> list[int]:
        """Workers that stopped beating (stopped with SIGSTOP, say): a batch would wait forever."""
        return [pid for pid in self.heartbeat.silent(SILENT_SECONDS) if pid in self.exited]

    async def _probe(self) -> None:
        # Probes go out until each worker process has answered one (a fast worker may take
        # several probes of a round). A default model that cannot load fails start-up here.
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(START_TIMEOUT):
            while len(self.exited) < self.count:
                infos = await asyncio.gather(
                    *(loop.run_in_executor(self.executor, worker.worker_info) for _ in range(self.count))
                )
                for pid, _, error in infos:
                    if error:
                        raise DefaultModelError(f"the default model cannot load: {error}")
                    if pid not in self.exited:
                        self._watch(pid)
        log.info("%d inference workers ready (pids %s)", self.count, sorted(self.exited))

    def _watch(self, pid: int) -> None:
        loop = asyncio.get_running_loop()
        self.exited[pid] = loop.create_future()
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # it died right after answering
            self.exited[pid].set_result(None)
            return
        self._pidfds[pid] = pidfd
        loop.add_reader(pidfd, self._ended, pid)  # a pidfd turns readable when its process ends

    def _ended(self, pid: int) -> None:
        pidfd = self._pidfds.pop(pid)
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        if not self.exited[pid].done():
            self.exited[pid].set_result(None)

    def kill(self) -> None:
        for pidfd in self._pidfds.values():
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    async def close(self, timeout: float) -> None:
        """Drop queued work, give the workers `timeout` seconds to exit, then kill the rest."""
        self.ready.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.exited:
            _, alive = await asyncio.wait(self.exited.values(), timeout=timeout)
            if alive:
                log.warning("inference workers %s did not exit; killing them", self.pids)
                self.kill()
        await asyncio.to_thread(self.executor.shutdown, wait=True)
        for pid in list(self._pidfds):
            self._ended(pid)


class ProcessInferencePool:
    def __init__(self, workers: int, config: WorkerConfig, batch_timeout: float) -> None:
        self.workers = workers
        self._restarts = 0
        self._loads_before = 0  # models loaded by the workers replaced so far
        self._config = config
        self._batch_timeout = batch_timeout
        self._closing = False
        self._watch: asyncio.Task[None] | None = None
        remove_leftovers()  # what processes killed before left in /dev/shm
        self._files = BatchFiles.on_shared_memory()
        self._current = self._start_workers()

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def model_loads(self) -> int:
        return self._loads_before + self._current.heartbeat.model_loads

    @property
    def batch_directory(self) -> Path | None:
        """Where batches are handed to the workers (`service.pool.handover`); None: they go
        through the executor's pipe."""
        return self._files.directory if self._files is not None else None

    def _start_workers(self) -> _Workers:
        workers = _Workers(self.workers, self._config)
        workers.ready.add_done_callback(lambda ready: self._supervise(workers, ready))
        return workers

    def _supervise(self, workers: _Workers, ready: asyncio.Task[None]) -> None:
        if ready.cancelled():
            return
        if ready.exception() is not None:  # batches waiting on it see the error too
            log.error("inference workers failed to start: %r", ready.exception())
            return
        for exited in workers.exited.values():
            exited.add_done_callback(lambda _: self._replace(workers, reason="an inference worker is gone"))

    async def start(self) -> None:
        """Start every worker and wait until each has loaded the default model; raises
        DefaultModelError if it cannot load. From then on, frozen workers are replaced."""
        await asyncio.shield(self._current.ready)
        self._watch = asyncio.ensure_future(self._watch_heartbeats())

    async def _watch_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            workers = self._current
            if workers.ready.done() and (silent := workers.silent()):
                self._replace(
                    workers,
                    reason=f"inference workers {silent} are frozen (no heartbeat for {SILENT_SECONDS:g}s)",
                    kill=True,
                )

    def check_ready(self) -> bool:
        return self._current.healthy()

    def worker_pids(self) -> list[int]:
        return self._current.pids

    async def classify(self, model: ModelInfo, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        workers = self._current
        try:
            await asyncio.shield(workers.ready)  # fresh workers: their start-up is not the batch's time
            try:
                return await self._run(workers, model, images, top_k)
            except BatchFileUnreadable as exc:  # a cleaner of /dev/shm removed them, say
                if self._files is not None:
                    log.warning("%s; batches go to the workers through the pipe from now on", exc)
                    self._files.close()
                    self._files = None
                return await self._run(workers, model, images, top_k)
        except BrokenProcessPool:
            self._replace(workers, reason="an inference worker died")
            raise WorkerCrashed("an inference worker died during the batch") from None
        except TimeoutError:
            self._replace(workers, reason=f"a batch ran over {self._batch_timeout:g}s", kill=True)
            raise InferenceTimeout(f"the batch ran over {self._batch_timeout:g}s") from None

    async def _run(self, workers: _Workers, model: ModelInfo, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        """One batch on `workers`, its images in a batch file where there is one."""
        files = self._files
        shared = files.put(images) if files is not None else None
        call: asyncio.Future[list[Outcome]] | None = None
        try:
            call = asyncio.get_running_loop().run_in_executor(
                workers.executor, worker.classify_batch, model, shared or images, top_k
            )
            return await asyncio.wait_for(call, self._batch_timeout)
        finally:
            if files is not None and shared is not None:
                # A call given up on (timed out, cancelled) may still be read by a worker.
                files.release(shared, reuse=call is None or (call.done() and not call.cancelled()))

    def _replace(self, workers: _Workers, reason: str, kill: bool = False) -> None:
        """Swap in fresh workers, once per broken set (every caller that saw it break ends here)."""
        if self._current is not workers or self._closing:
            return
        log.error("%s; replacing the inference workers", reason)
        self._restarts += 1
        self._loads_before += workers.heartbeat.model_loads
        if kill:
            workers.kill()
        workers.executor.shutdown(wait=False, cancel_futures=True)
        self._current = self._start_workers()

    async def close(self, timeout: float = 10.0) -> None:
        """Drop queued batches, give workers `timeout` to exit, then kill what is left; never
        leaves a worker process behind."""
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
        await self._current.close(timeout)
        if self._files is not None:
            self._files.close()
