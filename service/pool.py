"""The inference pool: where batches of image bytes become labels.

`InferencePool` is the interface the dispatcher sees; `ProcessInferencePool` runs
`inference.worker` in a `ProcessPoolExecutor` (spawn context, model loaded once per process
by the initializer). A distributed executor can replace it behind the same interface.

A dead worker breaks a `ProcessPoolExecutor` for good, so the pool replaces the executor
once per breakage; a batch that overruns `batch_timeout` gets its workers killed and the
executor replaced the same way.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait as wait_for_any
from multiprocessing.process import BaseProcess
from typing import Protocol

from inference import worker
from inference.catalog import ModelInfo, ModelSpec
from inference.protocol import Outcome, WorkerConfig

log = logging.getLogger(__name__)


class DefaultModelError(RuntimeError):
    """The workers started but the default model did not load in them."""


class InferenceTimeout(Exception):
    """A batch ran longer than the batch timeout; its worker was recycled."""


class InferencePool(Protocol):
    restarts: int

    def check_ready(self) -> bool: ...

    async def describe(self, specs: list[ModelSpec]) -> list[ModelInfo]:
        """Facts about `specs` and the cached torchvision weights, found out by a worker
        (the web process does not import torch)."""
        ...

    async def classify(self, model: ModelSpec, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        """One forward pass. Raises inference.protocol.ModelLoadError if `model` cannot
        load, BrokenProcessPool if a worker died (the next call gets fresh workers), and
        InferenceTimeout if the batch overran."""
        ...


class ProcessInferencePool:
    def __init__(self, workers: int, config: WorkerConfig, batch_timeout: float) -> None:
        self.workers = workers
        self.restarts = 0
        self._config = config
        self._batch_timeout = batch_timeout
        self._executor = self._new_executor()
        self._starting: asyncio.Task[None] | None = None  # a replacement's start-up

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init_worker,
            initargs=(self._config,),
        )

    def check_ready(self) -> bool:
        """True when every worker is up with the default model loaded.

        A worker found dead here (say, killed while the pool was idle) gets the pool
        replaced now rather than at the next batch, so readiness recovers by itself."""
        starting = self._starting
        if starting is not None and not starting.done():
            return False
        processes = self._processes(self._executor)
        if len(processes) < self.workers or not all(process.is_alive() for process in processes):
            self._replace(self._executor, reason="an inference worker is gone")
            return False
        return starting is None or (not starting.cancelled() and starting.exception() is None)

    def worker_pids(self) -> list[int]:
        return [process.pid for process in self._processes(self._executor) if process.pid is not None]

    async def check_started(self) -> None:
        """Start every worker and wait until each has loaded the default model.

        A worker whose initializer fails breaks the pool, so a default model that cannot
        load fails start-up here, not every task later."""
        await self._wait_ready(self._executor)

    async def _wait_ready(self, executor: ProcessPoolExecutor, timeout: float = 180.0) -> None:
        # Probes are sent until each worker process has answered one (a fast worker may
        # take several probes of a round).
        loop = asyncio.get_running_loop()
        ready: set[int] = set()
        async with asyncio.timeout(timeout):
            while len(ready) < self.workers:
                infos = await asyncio.gather(
                    *(loop.run_in_executor(executor, worker.worker_info) for _ in range(self.workers))
                )
                for pid, _, error in infos:
                    if error:
                        raise DefaultModelError(f"the default model cannot load: {error}")
                    ready.add(pid)
        log.info("%d inference workers ready (pids %s)", len(ready), sorted(ready))

    async def describe(self, specs: list[ModelSpec]) -> list[ModelInfo]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, worker.describe_models, specs)

    async def classify(self, model: ModelSpec, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        executor, starting = self._executor, self._starting
        loop = asyncio.get_running_loop()
        try:
            if starting is not None:  # fresh workers: their start-up is not the batch's time
                await asyncio.shield(starting)
            call = loop.run_in_executor(executor, worker.classify_batch, model, images, top_k)
            return await asyncio.wait_for(call, self._batch_timeout)
        except BrokenProcessPool:
            self._replace(executor, reason="an inference worker died")
            raise
        except TimeoutError:
            self._replace(executor, reason=f"a batch ran over {self._batch_timeout:g}s", kill=True)
            raise InferenceTimeout(f"the batch ran over {self._batch_timeout:g}s") from None

    def _replace(self, executor: ProcessPoolExecutor, reason: str, kill: bool = False) -> None:
        """Swap in a fresh executor, once per broken one (concurrent callers all see it)."""
        if self._executor is not executor:
            return
        log.error("%s; replacing the inference workers", reason)
        self.restarts += 1
        if kill:
            for process in self._processes(executor):
                process.kill()
        executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()
        self._starting = asyncio.ensure_future(self._wait_ready(self._executor))
        self._starting.add_done_callback(_log_failed_start)

    async def close(self, timeout: float = 10.0) -> None:
        """Drop queued batches, give workers `timeout` to exit, then kill what is left.

        Waits off the event loop, and never leaves a worker process behind."""
        executor = self._executor
        if self._starting is not None:
            self._starting.cancel()
        processes = self._processes(executor)
        executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(_join_or_kill, processes, timeout)
        await asyncio.to_thread(executor.shutdown, wait=True)

    @staticmethod
    def _processes(executor: ProcessPoolExecutor) -> list[BaseProcess]:
        # The executor keeps its processes in a private dict; there is no public accessor.
        return list((executor._processes or {}).values())  # type: ignore[attr-defined]


def _log_failed_start(starting: asyncio.Task[None]) -> None:
    # Batches waiting on it see the error too; this also marks it as retrieved.
    if not starting.cancelled() and starting.exception() is not None:
        log.error("replacement inference workers failed to start: %r", starting.exception())


def _join_or_kill(processes: list[BaseProcess], timeout: float) -> None:
    """Wait on the processes' sentinels, not `join`: the executor's own thread reaps the
    same processes, and a process it reaped first would look alive to a second `join`."""
    pending = {process.sentinel: process for process in processes}
    deadline = time.monotonic() + timeout
    while pending and (remaining := deadline - time.monotonic()) > 0:
        for sentinel in wait_for_any(list(pending), remaining):
            del pending[sentinel]  # type: ignore[arg-type]
    for process in pending.values():
        log.warning("inference worker %s did not exit; killing it", process.pid)
        process.kill()
