"""Completion webhooks against a real receiver on loopback (allowed through
`--allowed-networks`): signed deliveries, retries with backoff, giving up after the bound, the
address policy at submit, and a pending delivery that survives a kill -9."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import standardwebhooks
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import ResponseError

from inference.protocol import Label
from service.fetch.policy import AddressPolicy
from service.metrics import Metrics
from service.settings import load_settings
from service.stores.memory.registry import InMemoryRegistry
from service.stores.sqlite.registry import SqliteRegistry
from service.tasks.deliveries import Delivery
from service.tasks.records import ItemStatus
from service.webhooks import signing
from service.webhooks.sender import PER_HOST, WebhookSender, backoff
from testing.services import kill_group
from tests.conftest import ImageServer, ServiceFactory, running_service, scrape, submit, wait_for_task

SECRET = "test-secret"
# The receiver is on loopback: allowed for it alone, as a user would allow an internal receiver.
WEBHOOK_SETTINGS: dict[str, Any] = {
    "webhook_secret": SECRET,
    "allow_private_networks": False,
    "allowed_networks": "127.0.0.1/32",
}


@dataclass
class Call:
    headers: dict[str, str]
    body: bytes
    answer: int | str


@dataclass
class Receiver:
    """Records every POST; answers each with the next of `answers` (an HTTP status, or "hang"),
    then 200, and sets a cookie that the sender must never send back."""

    answers: list[int | str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        answer = self.answers.pop(0) if self.answers else 200
        self.calls.append(Call(dict(request.headers), await request.read(), answer))
        if answer == "hang":
            await asyncio.sleep(60)
        response = web.Response(status=int(answer) if answer != "hang" else 200)
        response.set_cookie("receiver-session", "secret", path="/")
        return response

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hook?token=abc"))

    @property
    def url_by_name(self) -> str:
        """`url` with the host as a name (aiohttp's default jar keeps no cookie from an IP)."""
        assert self.server is not None
        return str(self.server.make_url("/hook?token=abc").with_host("localhost"))

    async def wait_calls(self, count: int, timeout: float = 20) -> list[Call]:
        async with asyncio.timeout(timeout):
            while len(self.calls) < count:
                await asyncio.sleep(0.02)
        return self.calls


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Receiver:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    receiver.server = await aiohttp_server(app, host="127.0.0.1")
    return receiver


async def webhook_of(client: TestClient, task_id: str, status: str, timeout: float = 20) -> dict[str, Any]:
    """The task's `webhook` once it has `status`."""
    async with asyncio.timeout(timeout):
        while True:
            task = await (await client.get(f"/tasks/{task_id}")).json()
            if task["webhook"]["status"] == status:
                return dict(task["webhook"])
            await asyncio.sleep(0.05)


async def test_a_finished_task_is_posted_once_signed_with_the_secret(
    make_real_service: ServiceFactory, image_server: ImageServer, receiver: Receiver
) -> None:
    client = await make_real_service(**WEBHOOK_SETTINGS)
    urls = [image_server.url("/photos/coffee"), image_server.url("/status/404")]  # an image host on loopback
    created = await submit(client, urls, callback_url=receiver.url)
    task = await wait_for_task(client, created["task_id"])
    assert task["webhook"]["url"] == receiver.url
    (call,) = await receiver.wait_calls(1)

    # Verified as a receiver would, with its own HMAC, not the service's helper.
    expected = "sha256=" + hmac.new(SECRET.encode(), call.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(call.headers[signing.SIGNATURE], expected)
    assert not signing.verify(call.body, "another secret", call.headers[signing.SIGNATURE])
    assert call.headers["Content-Type"] == "application/json"
    assert abs(int(call.headers[signing.TIMESTAMP]) - time.time()) < 60
    assert len(call.headers[signing.DELIVERY]) == 32 and call.headers[signing.ATTEMPT] == "1"
    payload = json.loads(call.body)
    summary = {key: value for key, value in task.items() if key not in ("items", "webhook")}
    assert payload == summary  # the summary as GET /tasks lists it, without the webhook's own state
    assert payload["status"] == "completed" and payload["progress"]["failed"] == 1

    webhook = await webhook_of(client, created["task_id"], "delivered")
    assert webhook["attempts"] == 1 and webhook["last_error"] is None and webhook["delivered_at"]
    listed = (await (await client.get("/tasks")).json())["tasks"][0]
    assert listed["webhook"]["status"] == "delivered"
    samples = await scrape(client)
    assert samples[("ics_webhook_deliveries_total", (("outcome", "delivered"),))] == 1
    assert samples[("ics_webhook_latency_seconds_count", ())] == 1
    assert samples[("ics_webhooks_pending", ())] == 0
    await asyncio.sleep(1.5)
    assert len(receiver.calls) == 1


@pytest.mark.parametrize(
    ("secret", "key"),
    [(SECRET, SECRET.encode()), ("whsec_" + base64.b64encode(b"\x00\xffkey bytes").decode(), None)],
    ids=["plain-secret", "whsec-secret"],
)
async def test_deliveries_verify_with_the_standard_webhooks_library(
    make_service: ServiceFactory, image_server: ImageServer, receiver: Receiver, secret: str, key: bytes | None
) -> None:
    """`webhook-id`, `webhook-timestamp`, `webhook-signature` as Standard Webhooks has them,
    verified by its own library: a plain secret keys by its UTF-8 bytes, a `whsec_` one by
    the base64 after the prefix. The timestamp is signed: a replay under a fresh one fails."""
    client = await make_service(**{**WEBHOOK_SETTINGS, "webhook_secret": secret})
    created = await submit(client, [image_server.url("/photos/coffee")], callback_url=receiver.url)
    (call,) = await receiver.wait_calls(1)
    headers = dict(call.headers)
    verifier = standardwebhooks.Webhook(key if key is not None else secret)
    payload = verifier.verify(call.body, headers)
    assert payload["task_id"] == created["task_id"]
    assert headers["webhook-id"] == headers[signing.DELIVERY]
    assert headers["webhook-timestamp"] == headers[signing.TIMESTAMP]
    assert headers["webhook-signature"].startswith("v1,")
    assert signing.verify(call.body, secret, headers[signing.SIGNATURE])  # the original header stays
    replayed = {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) + 60)}
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(call.body, replayed)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(call.body + b" ", headers)


def test_a_whsec_secret_that_is_not_base64_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(["--webhook-secret", "whsec_not base64!"])
    assert exited.value.code == 2


async def test_a_receiver_that_fails_first_gets_exactly_two_attempts(
    make_service: ServiceFactory, image_server: ImageServer, receiver: Receiver
) -> None:
    receiver.answers = [500]
    client = await make_service(**WEBHOOK_SETTINGS)
    created = await submit(client, [image_server.url("/photos/coffee")], callback_url=receiver.url_by_name)
    first, second = await receiver.wait_calls(2)
    assert first.body == second.body  # the same bytes, so the same signature, on every attempt
    assert first.headers[signing.DELIVERY] == second.headers[signing.DELIVERY]
    assert [first.headers[signing.ATTEMPT], second.headers[signing.ATTEMPT]] == ["1", "2"]
    assert "Cookie" not in second.headers  # the first answer's cookie was not kept
    webhook = await webhook_of(client, created["task_id"], "delivered")
    assert webhook["attempts"] == 2 and webhook["last_error"] is None
    await asyncio.sleep(2)
    assert len(receiver.calls) == 2
    samples = await scrape(client)
    assert samples[("ics_webhook_deliveries_total", (("outcome", "retry"),))] == 1


async def test_a_receiver_that_never_answers_is_given_up_after_the_bound(
    make_service: ServiceFactory, image_server: ImageServer, receiver: Receiver
) -> None:
    receiver.answers = ["hang"] * 100
    client = await make_service(**WEBHOOK_SETTINGS, webhook_timeout=0.5, webhook_retry_for=2.0)
    created = await submit(client, [image_server.url("/photos/coffee")], callback_url=receiver.url)
    task = await wait_for_task(client, created["task_id"])
    assert task["webhook"]["status"] == "pending"
    started = time.monotonic()
    webhook = await webhook_of(client, created["task_id"], "failed")
    assert time.monotonic() - started < 5  # the 2 s bound, plus one attempt's timeout
    assert webhook["attempts"] >= 2 and "no answer within 0.5 s" in webhook["last_error"]
    attempts = len(receiver.calls)
    assert attempts == webhook["attempts"]
    await asyncio.sleep(1.5)
    assert len(receiver.calls) == attempts  # given up: no more attempts
    samples = await scrape(client)
    assert samples[("ics_webhook_deliveries_total", (("outcome", "failed"),))] == 1


def test_backoff_doubles_with_jitter_up_to_five_minutes() -> None:
    for attempts, ceiling in [(1, 1.0), (2, 2.0), (5, 16.0), (20, 300.0)]:
        delays = [backoff(attempts) for _ in range(200)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 100  # jittered


async def test_callbacks_are_refused_unless_signed_public_or_allowed(
    make_service: ServiceFactory, receiver: Receiver
) -> None:
    url = ["http://203.0.113.9/cat.jpg"]  # never fetched: every request here is refused
    unsigned = await make_service()
    response = await unsigned.post("/submit", json={"urls": url, "callback_url": receiver.url})
    assert response.status == 400 and (await response.json())["error"]["code"] == "webhooks_disabled"

    client = await make_service(webhook_secret=SECRET, allow_private_networks=False)
    port = receiver.url.split(":")[2].split("/")[0]
    for callback in (
        receiver.url,
        f"http://localhost:{port}/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://10.1.2.3/",
    ):
        response = await client.post("/submit", json={"urls": url, "callback_url": callback})
        body = await response.json()
        assert response.status == 400 and body["error"]["code"] == "callback_url_refused", (callback, body)
        assert "not allowed" in body["error"]["message"]
    for callback in ("ftp://example.com/hook", "http://user:pw@example.com/", "http://", 7):
        response = await client.post("/submit", json={"urls": url, "callback_url": callback})
        code = (await response.json())["error"]["code"]
        assert response.status == 400 and code in ("invalid_callback_url", "invalid_type"), (callback, code)
    form = aiohttp.FormData({"urls": url[0], "callback_url": receiver.url}, default_to_multipart=True)
    response = await client.post("/submit", data=form)
    assert response.status == 400 and (await response.json())["error"]["code"] == "callback_url_refused"
    assert (await (await client.get("/tasks")).json())["tasks"] == []


@pytest.mark.e2e
async def test_a_pending_delivery_survives_a_kill_9_and_is_delivered_once_after(
    image_server: ImageServer, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.answers = [503] * 3  # down while the service dies
    flags = ["--data-dir", str(tmp_path), "--webhook-secret", SECRET]
    async with aiohttp.ClientSession() as http:
        async with running_service(*flags) as (process, base):
            async with http.post(
                f"{base}/submit", json={"urls": [image_server.url("/photos/coffee")], "callback_url": receiver.url}
            ) as response:
                task_id = (await response.json())["task_id"]
            await receiver.wait_calls(1)
            await asyncio.sleep(0.2)  # the attempt's outcome is on disk (written within 20 ms)
            kill_group(process.pid)
            process.wait()
        failed_attempts = len(receiver.calls)
        assert 1 <= failed_attempts <= 3
        receiver.answers = []  # up again

        async with running_service(*flags) as (process, base):
            calls = await receiver.wait_calls(failed_attempts + 1)
            async with asyncio.timeout(20):
                while True:
                    async with http.get(f"{base}/tasks/{task_id}") as response:
                        task = await response.json()
                    if task["webhook"]["status"] == "delivered":
                        break
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1)
    delivered = [call for call in receiver.calls if call.answer == 200]
    assert len(delivered) == 1  # once, after the restart
    assert {call.headers[signing.DELIVERY] for call in calls} == {delivered[0].headers[signing.DELIVERY]}
    assert task["webhook"]["attempts"] == len(receiver.calls)
    assert json.loads(delivered[0].body)["task_id"] == task_id


class RefusingRegistry(InMemoryRegistry):
    """Fails its first `refusals` hand-overs, as a Redis that refuses a call fails them."""

    refusals = 1

    async def next_delivery(self) -> Delivery:
        if self.refusals:
            self.refusals -= 1
            raise ResponseError("MISCONF Redis is unable to persist to disk")
        return await super().next_delivery()


async def test_the_sender_goes_on_after_its_store_failed_to_hand_over_a_delivery(receiver: Receiver) -> None:
    registry = RefusingRegistry(metrics=Metrics())
    policy = AddressPolicy.from_strings(False, ["127.0.0.1/32"])
    sender = WebhookSender(registry, policy, SECRET, timeout=5, retry_for=60, metrics=Metrics())
    running = asyncio.create_task(sender.run())
    task = await registry.create(["u0"], "m", 1, callback_url=receiver.url)
    await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=[Label("cat", 281, 0.9)])
    calls = await receiver.wait_calls(1, timeout=10)
    assert json.loads(calls[0].body)["task_id"] == task.task_id and registry.refusals == 0
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    await sender.close()


async def test_a_hanging_receiver_delays_no_other(
    receiver: Receiver, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """Issue 34, item 3: 200 deliveries to a receiver that hangs held every shared slot, and
    five healthy receivers' webhooks came a minute late. Attempts are limited per receiver."""
    hanging = Receiver(answers=["hang"] * 200)
    app = web.Application()
    app.router.add_post("/hook", hanging.handle)
    hanging.server = await aiohttp_server(app, host="127.0.0.1")
    registry = InMemoryRegistry(metrics=Metrics())
    policy = AddressPolicy.from_strings(False, ["127.0.0.1/32"])
    sender = WebhookSender(registry, policy, SECRET, timeout=10, retry_for=60, metrics=Metrics())
    running = asyncio.create_task(sender.run())
    try:
        for callback in [hanging.url] * 200 + [receiver.url] * 5:
            task = await registry.create(["u0"], "m", 1, callback_url=callback)
            await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=[Label("cat", 281, 0.9)])
        finished = time.monotonic()
        await receiver.wait_calls(5, timeout=10)
        assert time.monotonic() - finished < 2
        assert len(hanging.calls) == PER_HOST  # the hanging receiver holds its own few slots only
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await sender.close()


async def test_deliveries_pending_without_a_secret_are_told_at_start(
    make_service: ServiceFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """They wait for a secret (they cannot be signed): said in the log and in ics_webhooks_pending."""
    registry = await SqliteRegistry.open(tmp_path, 3600, 100, Metrics())
    task = await registry.create(["u0"], "m", 1, callback_url="http://203.0.113.9/hook")
    await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=[Label("cat", 281, 0.9)])
    await registry.close()
    client = await make_service(data_dir=tmp_path)
    assert "1 completion webhooks are pending but --webhook-secret is not set" in caplog.text
    assert (await scrape(client))[("ics_webhooks_pending", ())] == 1


async def test_callback_hosts_in_an_odd_numeric_form_are_refused(make_service: ServiceFactory) -> None:
    """`0177.0.0.1` (octal) and `0x7f.1` (hex): resolvers read them differently (c-ares took
    the first for 177.0.0.1, and the attempts were then refused for the whole retry hour)."""
    client = await make_service(webhook_secret=SECRET)
    for host in ("0177.0.0.1", "0x7f.1", "2130706433", "127.1"):
        response = await client.post(
            "/submit", json={"urls": ["http://203.0.113.9/a.jpg"], "callback_url": f"http://{host}/"}
        )
        body = await response.json()
        assert response.status == 400 and body["error"]["code"] == "callback_url_refused", (host, body)
        response = await client.post("/submit", json={"urls": [f"http://{host}/a.jpg"]})
        assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_url", host


async def test_a_redirect_from_a_receiver_is_not_followed(
    receiver: Receiver, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """A receiver's redirect could point anywhere (inside the network, too): the attempt
    fails with its status and the delivery is tried again later at the same URL."""

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(receiver.url)

    app = web.Application()
    app.router.add_post("/hook", redirect)
    redirecting = await aiohttp_server(app, host="127.0.0.1")
    registry = InMemoryRegistry(metrics=Metrics())
    policy = AddressPolicy.from_strings(False, ["127.0.0.1/32"])
    sender = WebhookSender(registry, policy, SECRET, timeout=5, retry_for=60, metrics=Metrics())
    running = asyncio.create_task(sender.run())
    try:
        task = await registry.create(["u0"], "m", 1, callback_url=str(redirecting.make_url("/hook")))
        await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=[Label("cat", 281, 0.9)])
        async with asyncio.timeout(10):
            while (webhook := (await registry.get(task.task_id)).webhook) is None or not webhook.attempts:  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        assert webhook.last_error == "the receiver answered HTTP 307"
        assert receiver.calls == []  # never reached through the redirect
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await sender.close()


async def test_the_address_policy_is_applied_again_at_the_connection(receiver: Receiver) -> None:
    """What passed the check at submit is checked again when the sender connects (a name
    may resolve elsewhere by then): here a callback the sender's policy refuses, never reached."""
    registry = InMemoryRegistry(metrics=Metrics())
    sender = WebhookSender(registry, AddressPolicy(), SECRET, timeout=5, retry_for=60, metrics=Metrics())
    running = asyncio.create_task(sender.run())
    try:
        task = await registry.create(["u0"], "m", 1, callback_url=receiver.url)  # loopback: not public
        await registry.update_item(task.task_id, 0, ItemStatus.SUCCEEDED, labels=[Label("cat", 281, 0.9)])
        async with asyncio.timeout(10):
            while (webhook := (await registry.get(task.task_id)).webhook) is None or webhook.status != "failed":  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        assert webhook.attempts == 1 and "not allowed" in (webhook.last_error or "")  # given up at once
        assert receiver.calls == []
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await sender.close()
