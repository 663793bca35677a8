"""One connection to Redis, and what callers do while Redis is away: a request's call fails
at once with `StoreUnavailable` (the API answers 503 `store_unavailable`), background work
waits for Redis to come back (`patient`). Either way `healthy` says how the last call went,
which `/readyz` reports. Beside it, what the consumer groups of the job streams and of the
webhook stream share: making a group, knowing it lost, forgetting idle consumers that hold nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.tasks.registry import StoreOpenError, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
# Redis away, loading its data, full (noeviction) or a read-only replica after a failover:
# requests answer 503, background work waits for it.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, OutOfMemoryError, ReadOnlyError)
FAST_SECONDS = 2.0  # a request waits this long for Redis at most


class RedisUnreachable(StoreOpenError):
    """Redis did not answer at start-up (the message says where and why)."""


class RedisLink:
    """The client, and the health of the last call made through it."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._healthy = True
        self._healthy_since = float("-inf")  # it never went away

    @classmethod
    async def open(cls, url: str) -> RedisLink:
        """A client that gives up on an unreachable Redis within seconds (callers decide
        whether to wait for it; `socket_timeout` bounds a Redis that stopped answering);
        raises RedisUnreachable if Redis does not answer now."""
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=2.0,
            socket_timeout=10.0,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2),
            health_check_interval=15,
        )
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise RedisUnreachable(f"cannot reach Redis at {safe_url(url)}: {exc}") from None
        return cls(client)

    async def close(self) -> None:
        await self.client.aclose()

    def healthy(self) -> bool:
        """As of the last call to Redis (`check` makes one)."""
        return self._healthy

    def healthy_for(self) -> float:
        """Seconds since Redis last came back (or since this link was made)."""
        return time.monotonic() - self._healthy_since if self._healthy else 0.0

    async def check(self) -> bool:
        """Ask Redis now (readiness probes do): it answers, or it is away."""
        with contextlib.suppress(StoreUnavailable):
            await self.fast(self.client.ping())
        return self._healthy

    async def fast(self, call: Awaitable[T]) -> T:
        """A request's call: StoreUnavailable (503) if Redis is away, or does not answer
        within `FAST_SECONDS` (frozen, say: the client's own timeouts and retries would hold
        the request for half a minute). A write given up on that way may still be applied:
        retried with the same Idempotency-Key, a submit finds it."""
        try:
            async with asyncio.timeout(FAST_SECONDS):
                result = await call
        except TimeoutError:
            exc = RedisTimeoutError(f"no answer within {FAST_SECONDS:g} s")
            self._set_healthy(False, exc)
            raise StoreUnavailable(f"Redis is unreachable: {exc}") from None
        except UNREACHABLE as exc:
            self._set_healthy(False, exc)
            raise StoreUnavailable(f"Redis is unreachable: {exc}") from None
        self._set_healthy(True)
        return result

    async def patient(self, call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Background work's call, `call(*args, **kwargs)`: tried until Redis answers (or the
        caller is cancelled). A script that ran but whose answer was lost runs again: every
        script of the store is safe to repeat."""
        backoff = ExponentialWithJitterBackoff(base=0.1, cap=2.0)
        failures = 0
        while True:
            try:
                result = await call(*args, **kwargs)
            except UNREACHABLE as exc:
                self._set_healthy(False, exc)
                failures += 1
                await asyncio.sleep(backoff.compute(failures))
                continue
            self._set_healthy(True)
            return result

    def _set_healthy(self, healthy: bool, exc: BaseException | None = None) -> None:
        if healthy and not self._healthy:
            log.warning("Redis is reachable again")
            self._healthy_since = time.monotonic()
        elif not healthy and self._healthy:
            log.error("Redis is unreachable: %s", exc)
        self._healthy = healthy


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """The consumer group, made with the stream if need be (existing entries included)."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except RedisError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def group_gone(exc: ResponseError) -> bool:
    """What Redis answers once it has lost a stream and its group (restarted without its
    append-only file, or flushed), or, to a read blocked on it, when it lost it meanwhile:
    the group is made again and work goes on."""
    return str(exc).startswith(("NOGROUP", "UNBLOCKED"))


# Checked and deleted in one script, so that nothing reaches a consumer in between.
_FORGET_IDLE_CONSUMERS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local forgotten = {}
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local consumer = {}
  for i = 1, #fields, 2 do consumer[fields[i]] = fields[i + 1] end
  if consumer.pending == 0 and consumer.idle >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer.name)
    table.insert(forgotten, consumer.name)
  end
end
return forgotten
"""


async def forget_idle_consumers(client: aioredis.Redis, stream: str, group: str, idle: float) -> list[str]:
    """Delete the consumers of `group` that hold nothing and have been idle for `idle`
    seconds (Redis 7.0 counts from the last entry a consumer got, later versions from its
    last read); their names. Every process that reads joins under a name of its own and
    Redis keeps it until told, so without this each restart of a worker or replica would
    leave one behind for good. A consumer that holds nothing loses nothing, and a live one
    is made again by Redis when it next gets an entry."""
    names = await client.eval(_FORGET_IDLE_CONSUMERS, 1, stream, group, round(idle * 1000))
    return [name.decode() for name in names]


def safe_url(url: str) -> str:
    """A Redis URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
