"""Completion webhooks with Redis: the deliveries waiting to be tried, shared by every replica.

The script that makes a task final adds its delivery to the stream `<prefix>webhooks`; each
replica's webhook sender reads from it through one consumer group, so each delivery goes to
one replica, which holds it (pending) until it is delivered or given up. The replica renews
what it holds with its lease (`renew`); a delivery idle for three leases belongs to a replica
that is gone, and the next replica that looks takes it over (XAUTOCLAIM). Idle consumers
that hold nothing are forgotten by the group, and a group Redis lost is made again.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from redis.exceptions import ResponseError
from redis.typing import StreamIdT

from service.stores.redis.codec import entries_of, summary_of
from service.stores.redis.link import RedisLink, ensure_group, forget_idle_consumers, group_gone
from service.tasks.deliveries import Delivery, payload
from service.tasks.records import Webhook

log = logging.getLogger(__name__)

GROUP = "senders"
FORGET_AFTER = 10  # a consumer holding nothing is forgotten after this many `abandoned_after` idle

# Set a hash field only if the hash still exists (a forgotten task stays forgotten).
SET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
"""


class RedisOutbox:
    def __init__(self, link: RedisLink, prefix: str, consumer: str, abandoned_after: float) -> None:
        self._link = link
        self._prefix = prefix
        self._stream = f"{prefix}webhooks"
        self._consumer = consumer
        self._abandoned_ms = int(abandoned_after * 1000)
        self._held: dict[str, bytes] = {}  # delivery id -> its stream entry, while this replica tries it
        self._swept = 0.0  # when idle consumers were last forgotten (monotonic)

    async def pending(self) -> int:
        """Deliveries in the stream: new, or held by a replica (each is deleted once done)."""
        return int(await self._link.fast(self._link.client.xlen(self._stream)))

    async def next(self) -> Delivery:
        """The next delivery to try: one a gone replica held, else a new one."""
        client = self._link.client
        await self._link.patient(ensure_group, client, self._stream, GROUP)
        while True:
            try:
                entries = await self._entries()
            except ResponseError as exc:
                if not group_gone(exc):
                    raise
                log.warning("the webhook stream's consumer group is gone (Redis lost its data?); making it again")
                await self._link.patient(ensure_group, client, self._stream, GROUP)
                continue
            for entry_id, fields in entries:
                delivery = await self._delivery(entry_id, fields)
                if delivery is not None:
                    return delivery

    async def _entries(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Deliveries a gone replica held, else up to one new one (waiting a second for it)."""
        client = self._link.client
        if time.monotonic() - self._swept >= self._abandoned_ms / 1000:
            self._swept = time.monotonic()
            idle = FORGET_AFTER * self._abandoned_ms / 1000
            await self._link.patient(forget_idle_consumers, client, self._stream, GROUP, idle)
        found = await self._link.patient(
            client.xautoclaim, self._stream, GROUP, self._consumer, self._abandoned_ms, count=10
        )
        entries = entries_of(found[1]) if found else []
        if not entries:
            read = await self._link.patient(
                client.xreadgroup, GROUP, self._consumer, {self._stream: ">"}, count=1, block=1000
            )
            entries = [entry for _, messages in cast(Any, read) or [] for entry in entries_of(messages)]
        return entries

    async def record(self, delivery: Delivery, webhook: Webhook, retry: Delivery | None) -> None:
        """The task's webhook is now `webhook`; without a retry, the delivery is done."""
        entry = self._held.get(delivery.delivery_id)
        task_key = f"{self._prefix}task:{delivery.task_id}"

        async def write() -> None:
            async with self._link.client.pipeline(transaction=True) as pipe:
                pipe.eval(SET_IF_EXISTS, 1, task_key, "webhook", webhook.model_dump_json())
                if entry is not None and retry is None:
                    pipe.xack(self._stream, GROUP, entry)
                    pipe.xdel(self._stream, entry)
                await pipe.execute()

        await self._link.patient(write)
        if retry is None:
            self._held.pop(delivery.delivery_id, None)

    async def renew(self) -> None:
        """Keep the deliveries this replica holds from looking abandoned."""
        if self._held:
            entries: list[StreamIdT] = list(self._held.values())
            await self._link.client.xclaim(self._stream, GROUP, self._consumer, 0, entries, justid=True)

    async def _delivery(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Delivery | None:
        """The delivery an entry stands for; None (and the entry gone) if its task was
        forgotten meanwhile. The body is the task's summary as it is, which no longer changes
        but for the webhook field it leaves out: the same bytes on every attempt."""
        task_id = fields[b"task"].decode()
        task = cast(
            dict[bytes, bytes], await self._link.patient(self._link.client.hgetall, f"{self._prefix}task:{task_id}")
        )
        if not task:

            async def drop() -> None:
                async with self._link.client.pipeline(transaction=True) as pipe:
                    pipe.xack(self._stream, GROUP, entry_id)
                    pipe.xdel(self._stream, entry_id)
                    await pipe.execute()

            await self._link.patient(drop)
            return None
        summary = summary_of(task_id, task)
        delivery = Delivery(
            delivery_id=fields[b"delivery"].decode(),
            task_id=task_id,
            url=fields[b"url"].decode(),
            body=payload(summary),
            finished=float(fields[b"finished"]),
            attempts=summary.webhook.attempts if summary.webhook is not None else 0,
        )
        self._held[delivery.delivery_id] = entry_id
        return delivery
