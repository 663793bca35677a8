"""The consumers: batches from a source (the in-process queue, or the Redis stream) through
the inference pool, outcomes into the registry, then the batch is confirmed to its source.
This is where inference failures become error codes.

Two consumers per worker process (`CONSUMERS_PER_WORKER`): while one records its batch's
outcomes and takes and sends the next batch, the other's batch already waits at the pool,
so a worker goes from one batch straight to the next. A batch holds up to two forward passes
(`PASSES_PER_BATCH`; the worker runs them one after the other): what the web process spends
per batch (the pool's round trip, the hand-over file, one registry write) is then spread
over twice the images, while the forward pass keeps the size it runs fastest at. A result
for a task that is final by now (cancelled, say) is refused by the registry and dropped. A
consumer stopped mid-batch confirms nothing: a stream hands that batch to another worker.
"""

from __future__ import annotations

import asyncio
import logging
import time

from inference.protocol import ModelLoadError, Prediction
from service.metrics import Metrics
from service.pool import InferencePool, InferenceTimeout, WorkerCrashed
from service.pool.catalog import ModelCatalog
from service.tasks.fleet import WorkerStats
from service.tasks.queues import BatchSource, QueuedImage
from service.tasks.records import ErrorInfo, ItemStatus
from service.tasks.registry import ItemChange, TaskRegistry

log = logging.getLogger(__name__)

INTERNAL_ERROR = ErrorInfo(code="internal_error", message="internal error")

# Measured with one per worker: a worker waited a median 12 ms between batches of about
# 200 ms (outcomes recorded, next batch taken and sent); with two, 2-7 ms.
CONSUMERS_PER_WORKER = 2
# Measured (2 workers, OpenVINO bf16, passes of 8, 300 diverse photos per task): the web
# process's CPU per image 0.30-0.33 ms with two passes per batch, 0.40-0.47 ms with one; the
# service 2% faster. With four, 0.27-0.33 ms but 6% slower than two: the last batches of a
# task, twice as long, leave one worker idle longer while the other finishes.
PASSES_PER_BATCH = 2
PAUSE_SECONDS = 1.0  # after a consumer's turn failed, before the next


class Classifier:
    def __init__(
        self,
        registry: TaskRegistry,
        pool: InferencePool,
        catalog: ModelCatalog,
        source: BatchSource,
        metrics: Metrics,
        batch_size: int,
        batch_wait: float,
        stats: WorkerStats | None = None,
    ) -> None:
        """`batch_size`: images per forward pass (a batch holds up to `PASSES_PER_BATCH`);
        `stats` counts the batches classified (what a worker's heartbeat tells)."""
        self._registry = registry
        self.stats = stats or WorkerStats()
        self._pool = pool
        self._catalog = catalog
        self._source = source
        self._metrics = metrics
        self._batch_size = batch_size
        self._batch_wait = batch_wait

    async def consume(self) -> None:
        """Classify batches until cancelled. Whatever fails is logged and the consumer goes
        on: one that stopped would stall every task (a Redis that refuses a call, say)."""
        while True:
            try:
                await self._next()
            except Exception:
                log.exception("a consumer failed to take or finish a batch; going on in %gs", PAUSE_SECONDS)
                await asyncio.sleep(PAUSE_SECONDS)

    async def _next(self) -> None:
        batch = await self._source.next_batch(self._batch_size * PASSES_PER_BATCH, self._batch_wait)
        try:
            await self._classify(batch)
        except Exception:  # a bug: the batch fails, the consumer goes on
            log.exception("handling a batch of %d images failed", len(batch))
            await self._fail_jobs(batch, INTERNAL_ERROR)
        # Not reached if the outcomes could not be recorded: a stream hands the batch out again.
        await self._source.finished(batch)

    async def _classify(self, batch: list[QueuedImage], retried: bool = False) -> None:
        model = batch[0].model
        self._metrics.batch_size.observe(len(batch))
        try:
            with self._metrics.inference_seconds.time():
                outcomes = await self._pool.classify(
                    self._catalog.info(model), [job.data for job in batch], [job.top_k for job in batch]
                )
        except ModelLoadError as exc:
            log.error("model %s failed to load: %s", model, exc)
            error = ErrorInfo(code="model_load_failed", message=str(exc))
            self._metrics.inference_failures.labels(code=error.code).inc(len(batch))
            for task_id in {job.task_id for job in batch}:
                await self._registry.fail(task_id, error)  # its pipeline stops when the task is final
            return
        except WorkerCrashed:
            if not retried:
                log.warning("an inference worker died during a batch of %d images; retrying it once", len(batch))
                await self._classify(batch, retried=True)
                return
            log.error("an inference worker died again on a batch of %d images; failing them", len(batch))
            await self._fail_jobs(batch, ErrorInfo(code="worker_crashed", message="the inference worker crashed"))
            return
        except InferenceTimeout as exc:
            log.error("inference timed out for a batch of %d images", len(batch))
            await self._fail_jobs(batch, ErrorInfo(code="inference_timeout", message=str(exc)))
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("inference failed for a batch of %d images", len(batch))
            await self._fail_jobs(batch, ErrorInfo(code="inference_error", message="inference failed"))
            return
        changes = []
        for job, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Prediction):
                changes.append(ItemChange(job.task_id, job.index, ItemStatus.SUCCEEDED, labels=list(outcome.labels)))
                if outcome.refined:
                    self._metrics.refined_images.inc()
            else:
                error = ErrorInfo(code=outcome.code, message=outcome.message)
                changes.append(ItemChange(job.task_id, job.index, ItemStatus.FAILED, error=error))
        await self._registry.update_items(changes)  # one write for the batch
        self._observe_waits(batch)
        self.stats.batch_done(len(batch))

    def _observe_waits(self, batch: list[QueuedImage]) -> None:
        now = time.time()
        for job in batch:
            if job.queued_at:  # 0: queued by a version that did not say when
                self._metrics.queue_wait.labels(priority=job.priority.value).observe(max(0.0, now - job.queued_at))

    async def _fail_jobs(self, jobs: list[QueuedImage], error: ErrorInfo) -> None:
        self._metrics.inference_failures.labels(code=error.code).inc(len(jobs))
        await self._registry.update_items(
            [ItemChange(job.task_id, job.index, ItemStatus.FAILED, error=error) for job in jobs]
        )
