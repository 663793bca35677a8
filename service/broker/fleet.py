"""Worker heartbeats in Redis: the fleet view, and how a dead worker's images are found fast.

Each worker writes `<prefix>worker:<id>` (its `WorkerEntry` as JSON) every `HEARTBEAT_SECONDS`
with a time to live of `MISSED` heartbeats, and records its id in the `<prefix>workers` zset
(score: the time of the beat). A worker whose key expired is gone: listed as `gone` until
`FORGET_SECONDS` have passed, then forgotten. The streams' consumers ask `gone_ids` every
heartbeat and claim at once the entries a gone worker held, instead of waiting for them to
be idle `--claim-idle` seconds. Only workers that beat are ever judged gone: a consumer of a
version without heartbeats (or a replica's own pool) is left to `--claim-idle`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import cast

from service.stores.redis.link import RedisLink
from service.tasks.fleet import WorkerEntry

HEARTBEAT_SECONDS = 2.0
MISSED = 3  # heartbeats a worker may miss before it is gone
FORGET_SECONDS = 600.0  # a gone worker is listed this long


class RedisFleet:
    def __init__(self, link: RedisLink, prefix: str) -> None:
        self._link = link
        self._prefix = prefix

    def _key(self, worker_id: str) -> str:
        return f"{self._prefix}worker:{worker_id}"

    @property
    def _index(self) -> str:
        return f"{self._prefix}workers"

    async def beat(self, entry: WorkerEntry) -> None:
        """This worker is alive, as `entry` describes it."""
        async with self._link.client.pipeline(transaction=True) as pipe:
            pipe.set(self._key(entry.id), entry.model_dump_json(), px=int(HEARTBEAT_SECONDS * MISSED * 1000))
            pipe.zadd(self._index, {entry.id: time.time()})
            await pipe.execute()

    async def leave(self, worker_id: str) -> None:
        """A worker that stops cleanly is gone at once (what it held is claimed at once)."""
        await self._link.client.delete(self._key(worker_id))

    async def workers(self) -> list[WorkerEntry]:
        """StoreUnavailable (503) if Redis is away."""
        return await self._link.fast(self._workers())

    async def _workers(self) -> list[WorkerEntry]:
        client = self._link.client
        await client.zremrangebyscore(self._index, "-inf", time.time() - FORGET_SECONDS)
        seen = cast(list[tuple[bytes, float]], await client.zrange(self._index, 0, -1, withscores=True))
        if not seen:
            return []
        beats = cast(list[bytes | None], await client.mget([self._key(worker_id.decode()) for worker_id, _ in seen]))
        return [
            WorkerEntry.model_validate_json(beat)
            if beat is not None
            else WorkerEntry.gone(worker_id.decode(), datetime.fromtimestamp(last, UTC))
            for (worker_id, last), beat in zip(seen, beats, strict=True)
        ]

    async def gone_ids(self) -> set[str]:
        """Workers listed (they beat in the last `FORGET_SECONDS`) whose heartbeat has expired."""
        client = self._link.client
        seen = [worker_id.decode() for worker_id in cast(list[bytes], await client.zrange(self._index, 0, -1))]
        if not seen:
            return set()
        async with client.pipeline(transaction=False) as pipe:
            for worker_id in seen:
                pipe.exists(self._key(worker_id))
            present = await pipe.execute()
        return {worker_id for worker_id, here in zip(seen, present, strict=True) if not here}
