"""Prometheus metrics, kept in a registry of the app's own (no process-global state).

Counters and histograms are updated where the events happen (the dispatcher); gauges
that describe current state (tasks by status, queue depth, uploads held, worker restarts) are read from
their owners when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._totals_seen: dict[tuple[str, str], int] = {}  # see images_final_totals
        self.tasks = Gauge("ics_tasks", "Tasks in the registry, by status", ["status"], registry=self.registry)
        self.images = Counter(
            "ics_images",
            "Images that reached a final state, by outcome and error code",
            ["outcome", "code"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "ics_queue_depth",
            "Downloaded images not yet classified, by model and priority: in this process's queue, or with Redis "
            "fleet-wide in the job streams (those a worker holds included): the backlog to scale workers on",
            ["model", "priority"],
            registry=self.registry,
        )
        self.queue_oldest = Gauge(
            "ics_queue_oldest_seconds",
            "How long the oldest image waiting for the model has waited, by model and priority",
            ["model", "priority"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "ics_queue_wait_seconds",
            "Seconds from an image downloaded (and queued) to its outcome recorded, by priority",
            ["priority"],
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ics_batch_size",
            "Images per batch handed to a worker (up to two forward passes)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.download_seconds = Histogram(
            "ics_download_seconds", "Seconds per image download, failed ones included", registry=self.registry
        )
        self.inference_seconds = Histogram(
            "ics_inference_seconds", "Seconds per batch in the inference pool", registry=self.registry
        )
        self.workers = Gauge(
            "ics_workers",
            "Workers (inference pools): this process's own, and with Redis every worker by its heartbeat; by state",
            ["state"],
            registry=self.registry,
        )
        self.worker_restarts = Gauge(
            "ics_worker_restarts", "Times the inference workers were replaced", registry=self.registry
        )
        self.model_loads = Gauge(
            "ics_model_loads",
            "Models loaded by the inference workers (each one's default model at its start included): "
            "more than workers and restarts explain means --max-loaded-models is too small for the models in use",
            registry=self.registry,
        )
        self.inference_failures = Counter(
            "ics_inference_failures",
            "Images this process's workers failed instead of classifying them, by code: worker_crashed (a worker "
            "died on them twice, or they were handed out --max-deliveries times), inference_timeout, "
            "inference_error, model_load_failed, internal_error",
            ["code"],
            registry=self.registry,
        )
        self.refined_images = Counter(
            "ics_refined_images",
            "Images this process's workers classified again in fp32 because bf16 was unsure of them (their two best "
            "logits within --refine-margin); against ics_batch_size_sum, the share refined",
            registry=self.registry,
        )
        self.claimed = Counter(
            "ics_claimed_images",
            "Images this worker took over from another that held them without an outcome (each one a "
            "redelivery), by reason: gone (its heartbeat stopped) or idle (held longer than --claim-idle)",
            ["reason"],
            registry=self.registry,
        )

        self.upload_bytes = Gauge(
            "ics_upload_bytes", "Uploaded image bytes held, not yet queued for the model", registry=self.registry
        )
        self.event_streams = Gauge("ics_event_streams", "Open GET /tasks/<id>/events streams", registry=self.registry)
        self.store_write_seconds = Histogram(
            "ics_store_write_seconds",
            "Seconds per batch of task changes written to the store",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.store_write_errors = Counter(
            "ics_store_write_errors", "Batches of task changes the store failed to write", registry=self.registry
        )
        self.store_pending = Gauge(
            "ics_store_pending_changes", "Task changes queued for the store, not yet written", registry=self.registry
        )
        self.store_bytes = Gauge("ics_store_bytes", "Size of the task store on disk", registry=self.registry)

        self.connections_open = Gauge("ics_connections_open", "Open client connections", registry=self.registry)
        self.connections_closed = Counter(
            "ics_connections_closed",
            "Client connections the service closed itself: refused (too many open) or timed out (by phase)",
            ["reason"],
            registry=self.registry,
        )

        self.webhook_deliveries = Counter(
            "ics_webhook_deliveries",
            "Completion webhook attempts, by outcome: delivered, retry (failed, tried again later), failed (given up)",
            ["outcome"],
            registry=self.registry,
        )
        self.webhook_latency = Histogram(
            "ics_webhook_latency_seconds",
            "Seconds from a task's end to its webhook delivered (retries included)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=self.registry,
        )
        self.webhooks_pending = Gauge(
            "ics_webhooks_pending", "Completion webhooks not yet delivered or given up", registry=self.registry
        )

    def image_final(self, outcome: str, code: str, count: int = 1) -> None:
        """`count` images reached a final state (succeeded, failed with `code`, or cancelled)."""
        self.images.labels(outcome=outcome, code=code).inc(count)

    def images_final_totals(self, totals: dict[tuple[str, str], int]) -> None:
        """The images made final so far, by (outcome, code), as a store elsewhere counted them:
        the counter moves on by what is new. A total below the last one seen started again
        from zero (its key expired while this process was stopped, say): all of it is new."""
        for labels, total in totals.items():
            seen = self._totals_seen.get(labels, 0)
            self.image_final(*labels, total - seen if total >= seen else total)
            self._totals_seen[labels] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
