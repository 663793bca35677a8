"""Client connections: how many may be open, and how long a slow client may take.

aiohttp reads a request for as long as the client cares to send it, so a few hundred
clients that stall mid-request would hold their descriptors for good. Every connection is
therefore served through a `Connection` (aiohttp's own protocol inside), which closes it
when the client is too slow, in the spirit of Apache's mod_reqtimeout:

- headers: within `--header-timeout`, one more second for every `--min-rate` bytes that
  arrive, never past `--header-timeout-max` (answered `408`, then closed);
- body: within `--body-timeout`, extended the same way while it arrives (closed);
- between requests: `--keepalive-timeout` of silence (closed);
- responses: a client that reads none of its response for `--send-timeout` (closed).

While a handler runs with its body read, and while its response is sent, nothing is timed
(a long poll, an event stream, a large page to a slow reader) but a client that reads nothing.
Beyond `--max-connections` a new connection is answered `503` and closed at once, so the
descriptors left stay for downloads, the task store and the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from service.api.errors import Handler, error_json
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_AUTO_CONNECTIONS = 10_000
RESERVED_DESCRIPTORS = 256  # the store, uploads, worker pipes, DNS, logs: besides the downloads
LINGER_SECONDS = 1.0  # how long a refused or timed-out client may take to read its answer
LOG_INTERVAL = 10.0  # seconds between two lines about the same kind of closed connection

ProtocolFactory = Callable[[], asyncio.Protocol]


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout: float
    header_timeout_max: float
    body_timeout: float
    min_rate: int
    keepalive_timeout: float
    send_timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return cls(
            max_connections=connection_bound(settings.max_connections, descriptors, settings.download_concurrency),
            header_timeout=settings.header_timeout,
            header_timeout_max=settings.header_timeout_max,
            body_timeout=settings.body_timeout,
            min_rate=settings.min_rate,
            keepalive_timeout=settings.keepalive_timeout,
            send_timeout=settings.send_timeout,
        )


def raise_descriptor_limit() -> int:
    """Lift the soft limit on open descriptors to the hard one (any process may), and
    return it: the default soft limit of 1,024 is what slow clients exhausted first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


def connection_bound(requested: int, descriptors: int, download_concurrency: int) -> int:
    """How many client connections to accept: `requested` (0 = as many as fit), never so many
    that downloads (two descriptors each at worst) and the service's own files run short."""
    fits = max(16, descriptors - RESERVED_DESCRIPTORS - 2 * download_concurrency)
    if requested == 0:
        return min(fits, MAX_AUTO_CONNECTIONS)
    if requested > fits:
        log.warning("--max-connections %d lowered to %d: the open-file limit is %d", requested, fits, descriptors)
        return fits
    return requested


class Phase(enum.Enum):
    HEADERS = "headers"  # waiting for a request's headers
    BODY = "body"  # a handler runs; the request's body is still arriving
    ACTIVE = "active"  # a handler runs with the whole request in hand, or a file is sent: not timed
    IDLE = "idle"  # between two requests on a kept-alive connection


def _canned(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP response in the service's JSON error shape, for a connection that no
    handler serves; the connection closes after it."""
    body = error_json(code, message).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


TOO_MANY = _canned(503, "Service Unavailable", "too_many_connections", "too many open connections; retry later")
TOO_SLOW = _canned(408, "Request Timeout", "request_timeout", "the request's headers did not arrive in time")


class ThrottledLog:
    """At most one warning per kind of event every `LOG_INTERVAL` seconds; those left unsaid
    are counted in one line when the interval ends (or at shutdown): a thousand stalled
    clients make a few lines, not a thousand."""

    def __init__(self) -> None:
        self._quiet_until: dict[str, float] = {}
        self._unsaid: dict[str, int] = {}
        self._flushes: dict[str, asyncio.TimerHandle] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._quiet_until.get(kind, 0.0):
            self._quiet_until[kind] = now + LOG_INTERVAL
            log.warning(message, *args)
            return
        self._unsaid[kind] = self._unsaid.get(kind, 0) + 1
        if kind not in self._flushes:
            self._flushes[kind] = loop.call_at(self._quiet_until[kind], self._flush, kind)

    def _flush(self, kind: str) -> None:
        self._flushes.pop(kind, None)
        unsaid = self._unsaid.pop(kind, 0)
        if unsaid:
            log.warning("%d more %s in the last %.0f s", unsaid, kind, LOG_INTERVAL)

    def close(self) -> None:
        for kind, handle in list(self._flushes.items()):
            handle.cancel()
            self._flush(kind)


class Connections:
    """The open client connections, their bound and their deadlines."""

    def __init__(self, limits: ConnectionLimits, metrics: Metrics) -> None:
        self.limits = limits
        self._metrics = metrics
        self._open: dict[asyncio.BaseTransport, Connection] = {}
        self._log = ThrottledLog()
        metrics.connections_open.set_function(lambda: len(self._open))

    def protocol(self, inner: ProtocolFactory) -> Callable[[], Connection]:
        """A protocol factory for `loop.create_server`, wrapping aiohttp's (`runner.server`)."""
        return lambda: Connection(inner, self)

    def admit(self, connection: Connection, transport: asyncio.BaseTransport) -> bool:
        if len(self._open) >= self.limits.max_connections:
            self._closed("refused")
            self._log.warning(
                "refused connections",
                "refused a connection from %s: %d connections are open (--max-connections)",
                _peer(transport),
                len(self._open),
            )
            return False
        self._open[transport] = connection
        return True

    def forget(self, transport: asyncio.BaseTransport) -> None:
        self._open.pop(transport, None)

    def timed_out(self, transport: asyncio.BaseTransport, phase: Phase, seconds: float, received: int) -> None:
        self._closed(f"{phase.value}_timeout")
        if phase is Phase.IDLE:
            return  # the normal end of a kept-alive connection
        self._log.warning(
            f"closed connections (request {phase.value} too slow)",
            "closed a connection from %s: the request %s did not arrive in time (%.1f s, %d bytes)",
            _peer(transport),
            phase.value,
            seconds,
            received,
        )

    def close(self) -> None:
        """At shutdown: the counts of what the log left unsaid."""
        self._log.close()

    def response_unread(self, transport: asyncio.BaseTransport, seconds: float) -> None:
        self._closed("send_timeout")
        self._log.warning(
            "closed connections (response not read)",
            "closed a connection from %s: the client read nothing of its response for %.1f s",
            _peer(transport),
            seconds,
        )

    def _closed(self, reason: str) -> None:
        self._metrics.connections_closed.labels(reason=reason).inc()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Tells each connection when a request reaches a handler and when its response has
        been sent. aiohttp sends a response after the middlewares; it is sent here, so that a
        large one to a slow reader is not taken for an idle connection. A file is the
        exception (aiohttp's file responses can be sent only once, by aiohttp): its
        connection is not timed until the next request, and aiohttp's own idle timer, which
        starts once the file is sent, ends it if none comes."""
        connection = self._open.get(request.transport) if request.transport is not None else None
        if connection is None:  # served without a Connection (the test server)
            return await handler(request)
        connection.request_started(request)
        sent = False
        try:
            response = await handler(request)
            if not isinstance(response, web.FileResponse):
                with contextlib.suppress(ConnectionError):  # the client left: aiohttp sees to it
                    await response.prepare(request)
                    await response.write_eof()
                sent = True
            return response
        finally:
            connection.request_finished(sent)


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else "an unknown peer"


class Connection(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, a deadline per phase around it."""

    def __init__(self, inner: ProtocolFactory, connections: Connections) -> None:
        self._make_inner = inner
        self._inner: asyncio.Protocol | None = None
        self._connections = connections
        self._limits = connections.limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._phase = Phase.HEADERS
        self._since = self._loop.time()
        self._received = 0  # bytes since the phase began
        self._request: web.BaseRequest | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._answered = False  # refused or timed out with an answer: closing
        self._linger: asyncio.TimerHandle | None = None
        self._unread: asyncio.TimerHandle | None = None  # while writing is paused

    # asyncio.Protocol: aiohttp's protocol sees every call, the deadlines are kept on the way.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is one, without the subclass
        self._transport = transport
        if not self._connections.admit(self, transport):
            self._answer_and_close(TOO_MANY)
            return
        self._inner = self._make_inner()
        self._inner.connection_made(transport)
        self._enter(Phase.HEADERS)

    def data_received(self, data: bytes) -> None:
        if self._inner is None or self._answered:
            return  # refused or timed out: what the client still sends is dropped
        if self._phase is Phase.IDLE or (self._phase is Phase.ACTIVE and self._request is None):
            self._enter(Phase.HEADERS)  # the next request begins
        self._received += len(data)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is None or self._answered:
            return None  # the client is done too: close
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        """The client reads slower than we write; one that reads nothing for --send-timeout is dropped."""
        self._unread = self._loop.call_later(self._limits.send_timeout, self._send_timed_out)
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None
        if self._inner is not None:
            self._inner.resume_writing()

    def _send_timed_out(self) -> None:
        self._unread = None
        if self._transport is not None:
            self._connections.response_unread(self._transport, self._limits.send_timeout)
            self._transport.abort()  # what is buffered will never be read

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._transport is not None:
            self._connections.forget(self._transport)
        for handle in (self._linger, self._unread):
            if handle is not None:
                handle.cancel()
        if self._inner is not None:
            self._inner.connection_lost(exc)
        self._request = None

    # What the middleware reports.

    def request_started(self, request: web.BaseRequest) -> None:
        self._request = request
        self._enter(Phase.BODY if request.body_exists and not request.content.is_eof() else Phase.ACTIVE)

    def request_finished(self, sent: bool) -> None:
        self._request = None
        if self._transport is not None and not self._transport.is_closing():
            self._enter(Phase.IDLE if sent else Phase.ACTIVE)

    # The deadlines.

    def _enter(self, phase: Phase) -> None:
        self._phase = phase
        self._since = self._loop.time()
        self._received = 0
        self._cancel_timer()
        deadline = self._deadline()
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._check)

    def _deadline(self) -> float | None:
        limits = self._limits
        earned = self._received / limits.min_rate
        if self._phase is Phase.HEADERS:
            return self._since + min(limits.header_timeout_max, limits.header_timeout + earned)
        if self._phase is Phase.BODY:
            return self._since + limits.body_timeout + earned
        if self._phase is Phase.IDLE:
            return self._since + limits.keepalive_timeout
        return None

    def _check(self) -> None:
        self._timer = None
        if self._phase is Phase.BODY and self._request is not None and self._request.content.is_eof():
            self._phase = Phase.ACTIVE
            return
        deadline = self._deadline()
        if deadline is None or self._transport is None:
            return
        now = self._loop.time()
        if now < deadline:  # data arrived meanwhile and earned more time
            self._timer = self._loop.call_at(deadline, self._check)
            return
        self._connections.timed_out(self._transport, self._phase, now - self._since, self._received)
        if self._phase is Phase.HEADERS:
            self._answer_and_close(TOO_SLOW)
        else:
            self._transport.close()

    def _answer_and_close(self, response: bytes) -> None:
        """Send `response`, then close once the client has read it. Closing at once, with the
        client's request still unread here, would make the kernel reset the connection and
        the client might never see the answer; so the writing side closes first and what
        the client still sends is read and dropped for a moment."""
        assert self._transport is not None
        self._answered = True
        self._transport.write(response)
        if self._transport.can_write_eof():
            self._transport.write_eof()
        self._linger = self._loop.call_later(LINGER_SECONDS, self._transport.close)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
