"""The inference pool: where batches of image bytes become labels.

`InferencePool` is the interface the dispatcher sees; `ProcessInferencePool` runs
`inference.worker` in a `ProcessPoolExecutor` (spawn context, model loaded once per process
by the initializer). A distributed executor can replace it behind the same interface.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Protocol

from inference import worker
from inference.protocol import Outcome, WorkerConfig

log = logging.getLogger(__name__)


class InferencePool(Protocol):
    async def classify(self, model: str, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        """One forward pass; raises inference.protocol.ModelLoadError if `model` cannot load."""
        ...


class ProcessInferencePool:
    def __init__(self, workers: int, config: WorkerConfig) -> None:
        self.workers = workers
        self._config = config
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init_worker,
            initargs=(self._config,),
        )

    async def check_started(self, timeout: float = 180.0) -> None:
        """Start every worker and wait until each has loaded the default model.

        Probes are sent until each worker process has answered one (a fast worker may take
        several probes of a round). A worker whose initializer fails breaks the pool, so a
        default model that cannot load fails start-up here, not every task later.
        """
        loop = asyncio.get_running_loop()
        ready: set[int] = set()
        async with asyncio.timeout(timeout):
            while len(ready) < self.workers:
                infos = await asyncio.gather(
                    *(loop.run_in_executor(self._executor, worker.worker_info) for _ in range(self.workers))
                )
                ready.update(pid for pid, _ in infos)
        log.info("%d inference workers ready (pids %s)", len(ready), sorted(ready))

    async def classify(self, model: str, images: list[bytes], top_k: list[int]) -> list[Outcome]:
        """Raises BrokenProcessPool if a worker died; the next call gets a fresh pool."""
        executor = self._executor
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, worker.classify_batch, model, images, top_k)
        except BrokenProcessPool:
            if self._executor is executor:  # the first caller to see the breakage replaces it
                log.error("an inference worker died; replacing the process pool")
                self._executor = self._new_executor()
                executor.shutdown(wait=False, cancel_futures=True)
            raise

    async def close(self) -> None:
        """Drop queued batches and wait, off the event loop, for the worker processes to exit."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._executor.shutdown, wait=True)
