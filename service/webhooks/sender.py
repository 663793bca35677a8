"""Delivering completion webhooks: each finished task's summary is POSTed to its
`callback_url`, signed (`service.webhooks.signing`); a non-2xx answer, a timeout or a
connection error is tried again after an exponential backoff with jitter (about 1 s, doubling
up to 5 minutes) until `--webhook-retry-for` seconds after the task ended, then given up.

Deliveries come from the registry (`next_delivery`), which makes one in the same step that
makes a task final and, when durable, keeps it until it is delivered or given up: a delivery
pending at a crash is tried again after the restart. That makes delivery at least once: an
attempt the receiver got just before a crash is sent again, with the same delivery id.
Callbacks reach only what the address policy allows, checked at submit (`check_url`) and
again at every connection (DNS may change meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import aiohttp
from yarl import URL

from service.fetch.policy import (
    NOT_PUBLIC,
    AddressPolicy,
    BlockedAddressError,
    PolicyResolver,
    policy_connector,
    url_problem,
)
from service.metrics import Metrics
from service.tasks.deliveries import Delivery
from service.tasks.records import Webhook, WebhookStatus, utcnow
from service.tasks.registry import TaskRegistry
from service.webhooks import signing

log = logging.getLogger(__name__)

FIRST_RETRY = 1.0  # seconds before the second attempt (with jitter); doubles each time
MAX_RETRY = 300.0
CONCURRENCY = 32  # attempts in flight at once
PER_HOST = 4  # attempts in flight to one receiver (scheme, host, port): a hanging one holds no more
USER_AGENT = "image-classification-service-webhooks/1.0"


def backoff(attempts: int) -> float:
    """Seconds to wait after `attempts` failed attempts: exponential, capped, with "equal
    jitter" (half fixed, half random), so receivers coming back are not hit all at once."""
    ceiling = min(MAX_RETRY, FIRST_RETRY * 2.0 ** (attempts - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class Failure:
    reason: str
    final: bool = False  # not worth trying again


class HostSlots:
    """Attempts in flight: `total` at most, and `per_host` to any one receiver, so a receiver
    that hangs holds a few slots, not all (200 deliveries to one made five others' wait a
    minute). Waiters of one host queue on its own semaphore before the shared one, whose
    waiters are served in turn: hosts share it fairly. A host's entry goes with its last user."""

    def __init__(self, total: int, per_host: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_host = per_host
        self._hosts: dict[tuple[str, str, int | None], _Host] = {}

    @contextlib.asynccontextmanager
    async def taken(self, url: str) -> AsyncIterator[None]:
        parsed = URL(url)
        key = (parsed.scheme, parsed.host or "", parsed.port)
        host = self._hosts.setdefault(key, _Host(asyncio.Semaphore(self._per_host)))
        host.users += 1
        try:
            async with host.slots, self._total:
                yield
        finally:
            host.users -= 1
            if not host.users:
                del self._hosts[key]


@dataclass
class _Host:
    slots: asyncio.Semaphore
    users: int = 0  # attempts holding or waiting for its slots


class CallbackRefused(Exception):
    """A callback URL the service will not call; the message says why."""


class WebhookSender:
    """Its own client session (webhooks never wait behind image downloads); `close` it."""

    def __init__(
        self,
        registry: TaskRegistry,
        policy: AddressPolicy,
        secret: str,
        timeout: float,
        retry_for: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._policy = policy
        self._resolver = PolicyResolver(aiohttp.AsyncResolver(), policy)
        self._session = aiohttp.ClientSession(
            connector=policy_connector(policy, self._resolver, CONCURRENCY),
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # a receiver's cookie must not reach another's
        )
        self._secret = secret
        self._key = signing.standard_key(secret)  # checked when the settings were read
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retry_for = retry_for
        self._metrics = metrics
        self._clock = clock
        self._slots = HostSlots(CONCURRENCY, PER_HOST)

    async def check_url(self, url: str, max_length: int) -> None:
        """Raise CallbackRefused unless `url` is one the sender may call: an absolute http(s)
        URL whose host is (or resolves to) an address the policy allows."""
        problem = url_problem(url, max_length)
        if problem:
            raise CallbackRefused(problem)
        host = URL(url).raw_host or ""
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:  # a name: what it resolves to now
            try:
                async with asyncio.timeout(self._timeout.total):
                    await self._resolver.resolve(host, 0, socket.AF_UNSPEC)
            except BlockedAddressError as exc:
                raise CallbackRefused(f"{exc.strerror}") from None
            except (OSError, TimeoutError) as exc:
                raise CallbackRefused(f"the host name {host!r} could not be resolved: {exc}") from None
        else:
            if not self._policy.allows(host):
                raise CallbackRefused(f"connecting to {host} is not allowed: {NOT_PUBLIC}")

    async def close(self) -> None:
        await self._session.close()
        await self._resolver.close()

    async def run(self) -> None:
        """Deliver every webhook the registry hands over, until cancelled."""
        async with asyncio.TaskGroup() as deliveries:
            while True:
                try:
                    delivery = await self._registry.next_delivery()
                except Exception:  # a store refusing a call must not end the deliveries for good
                    log.exception("taking the next webhook delivery failed; trying again in %gs", FIRST_RETRY)
                    await asyncio.sleep(FIRST_RETRY)
                    continue
                deliveries.create_task(self._deliver(delivery))

    async def _deliver(self, delivery: Delivery) -> None:
        self._metrics.webhooks_pending.inc()
        try:
            while True:
                await asyncio.sleep(max(0.0, delivery.next_attempt - self._clock()))
                async with self._slots.taken(delivery.url):
                    failure = await self._attempt(delivery)
                attempts = delivery.attempts + 1
                now = self._clock()
                if failure is None:
                    self._metrics.webhook_deliveries.labels(outcome="delivered").inc()
                    self._metrics.webhook_latency.observe(max(0.0, now - delivery.finished))
                    webhook = Webhook(
                        url=delivery.url, status=WebhookStatus.DELIVERED, attempts=attempts, delivered_at=utcnow()
                    )
                    await self._registry.record_delivery(delivery, webhook, None)
                    return
                delay = backoff(attempts)
                if failure.final or now + delay > delivery.finished + self._retry_for:
                    self._metrics.webhook_deliveries.labels(outcome="failed").inc()
                    log.warning(
                        "task %s: webhook given up after %d attempts: %s", delivery.task_id, attempts, failure.reason
                    )
                    webhook = Webhook(
                        url=delivery.url, status=WebhookStatus.FAILED, attempts=attempts, last_error=failure.reason
                    )
                    await self._registry.record_delivery(delivery, webhook, None)
                    return
                self._metrics.webhook_deliveries.labels(outcome="retry").inc()
                retry = replace(delivery, attempts=attempts, next_attempt=now + delay)
                webhook = Webhook(url=delivery.url, attempts=attempts, last_error=failure.reason)
                await self._registry.record_delivery(delivery, webhook, retry)
                delivery = retry
        except Exception:  # a bug here must not end the other deliveries
            log.exception("task %s: webhook delivery failed", delivery.task_id)
        finally:
            self._metrics.webhooks_pending.dec()

    async def _attempt(self, delivery: Delivery) -> Failure | None:
        """One POST; None if the receiver answered 2xx."""
        now = int(self._clock())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            signing.WEBHOOK_ID: delivery.delivery_id,
            signing.WEBHOOK_TIMESTAMP: str(now),
            signing.WEBHOOK_SIGNATURE: signing.standard_signature(delivery.delivery_id, now, delivery.body, self._key),
            signing.SIGNATURE: signing.signature(delivery.body, self._secret),
            signing.DELIVERY: delivery.delivery_id,
            signing.TIMESTAMP: str(now),
            signing.ATTEMPT: str(delivery.attempts + 1),
        }
        try:
            async with self._session.post(
                delivery.url, data=delivery.body, headers=headers, allow_redirects=False, timeout=self._timeout
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return Failure(f"the receiver answered HTTP {response.status}")
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, BlockedAddressError):
                return Failure(str(exc.os_error), final=True)
            return Failure(f"could not connect: {exc.os_error}")
        except TimeoutError:
            return Failure(f"no answer within {self._timeout.total:g} s")
        except aiohttp.ClientError as exc:
            return Failure(f"the request failed: {exc!r}")
