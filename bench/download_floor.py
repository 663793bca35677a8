"""The floor under the web process's CPU: the service's download client alone, per image.

    .venv/bin/python -m bench.download_floor --port PORT [--count 1000] [--rate 170]

The service's own `fetch`, on the session the service makes (aiodns, the address policy,
every timeout), with its download slots (`download_concurrency`), each download holding its
slot until the image is queued, and its `BatchQueue` (`max_queued_images`) emptied
`batch_size` images at a time at `--rate` images/s, as the workers empty it. So the event
loop sees the downloads in the rhythm it sees them in the service (flat out they cost less
per image: more sockets are ready at each wake-up). Nothing else runs in the process: no
registry, no journal, no pool, no API. `bench.run_bench` runs it each round at the rate the
service just reached; the service's web CPU per image less this floor is what the service
itself adds. Only CPU is measured: the images come from the bench's loopback image server.

`--client bare` puts a client that does nothing but keep-alive GETs in place of `fetch`: no
parser library, no limits, checks or timeouts. What it costs is what any client would cost
here (the event loop's wake-ups, the kernel's copies, the slots and the queue), so the
difference to `--client service` is the most any other HTTP client could save.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import uvloop
from yarl import URL

from bench.harness import own_cpu_seconds
from service.app import download_session
from service.broker.local import BatchQueue
from service.fetch.fetcher import fetch
from service.settings import Settings
from service.tasks.queues import QueuedImage

WARM_UP = 100  # downloads before the clock starts: the connections are opened then


Get = Callable[[str], Awaitable[bytes]]  # a URL's body


async def paced_downloads(urls: list[str], rate: float, settings: Settings, client: str = "service") -> float:
    """CPU seconds per image of downloading `urls` (after a warm-up) at `rate` images/s."""
    if client == "bare":
        server = URL(urls[0])  # every URL is on this one server
        assert server.host is not None
        assert server.port is not None
        connections = await BareConnections.open(server.host, server.port, settings.download_concurrency)
        try:
            return await _paced(connections.get, urls, rate, settings)
        finally:
            connections.close()
    limits = settings.fetch_limits()
    async with download_session(settings) as session:
        return await _paced(lambda url: fetch(session, url, limits), urls, rate, settings)


async def _paced(get: Get, urls: list[str], rate: float, settings: Settings) -> float:
    slots = asyncio.Semaphore(settings.download_concurrency)
    queue = BatchQueue(settings.max_queued_images)

    async def workers() -> None:
        while True:
            await asyncio.sleep(settings.resolved_batch_size() / rate)
            await queue.next_batch(settings.resolved_batch_size(), 0)

    async def download(index: int, url: str) -> None:
        async with slots:
            data = await get(url)
            await queue.put(QueuedImage("floor", index, "model", 1, data))

    emptying = asyncio.create_task(workers())
    try:
        await asyncio.gather(*(download(index, url) for index, url in enumerate(urls[:WARM_UP])))
        before = own_cpu_seconds()
        await asyncio.gather(*(download(index, url) for index, url in enumerate(urls)))
        return (own_cpu_seconds() - before) / len(urls)
    finally:
        emptying.cancel()


class BareConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one GET at a time, bodies with a Content-Length.
    Any other answer (another status, no length) fails the GET and closes the connection,
    which ends the measurement."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._body_at = 0  # where the body starts in the buffer; 0 while the head is incomplete
        self._end = 0
        self._answer: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one, not a subclass

    def get(self, request: bytes) -> asyncio.Future[bytes]:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection is closed")
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._answer

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._body_at:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            status_line, *headers = bytes(self._buffer[:head_end]).decode("latin-1").split("\r\n")
            lengths = [line.split(":", 1)[1] for line in headers if line.lower().startswith("content-length:")]
            if status_line.split()[1:2] != ["200"] or len(lengths) != 1:
                self._finish(RuntimeError(f"the image server answered {status_line!r} (lengths {lengths})"))
                assert self.transport is not None
                self.transport.close()
                return
            self._body_at = head_end + 4
            self._end = self._body_at + int(lengths[0])
        if len(self._buffer) >= self._end:
            self._finish(bytes(self._buffer[self._body_at : self._end]))

    def _finish(self, outcome: bytes | Exception) -> None:
        answer, self._answer = self._answer, None
        self._buffer.clear()
        self._body_at = 0
        if answer is None:
            return
        if isinstance(outcome, Exception):
            answer.set_exception(outcome)
        else:
            answer.set_result(outcome)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(ConnectionError("the image server closed the connection"))


class BareConnections:
    """As many connections to one server as there are download slots, so one is always free."""

    def __init__(self, host: str, port: int, connections: list[BareConnection]) -> None:
        self._host = f"{host}:{port}".encode()
        self._all = connections
        self._free = list(connections)

    @classmethod
    async def open(cls, host: str, port: int, count: int) -> BareConnections:
        loop = asyncio.get_running_loop()
        opened = [await loop.create_connection(BareConnection, host, port) for _ in range(count)]
        return cls(host, port, [connection for _, connection in opened])

    async def get(self, url: str) -> bytes:
        connection = self._free.pop()
        try:
            path = URL(url).raw_path_qs.encode()
            return await connection.get(b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept: image/*\r\n\r\n" % (path, self._host))
        finally:
            self._free.append(connection)

    def close(self) -> None:
        for connection in self._all:
            if connection.transport is not None:
                connection.transport.close()


def floor_per_image(port: int, count: int, rate: float, client: str = "service") -> float:
    """CPU seconds per image of the download client alone, measured in its own process."""
    command = [sys.executable, "-m", "bench.download_floor", "--port", str(port), "--count", str(count)]
    root = Path(__file__).resolve().parent.parent
    command += ["--rate", str(rate), "--client", client]
    finished = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True)
    return float(json.loads(finished.stdout.splitlines()[-1])["cpu_s_per_image"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="the bench's image server on 127.0.0.1")
    parser.add_argument("--count", type=int, default=1000, help="images /img/0.jpg .. /img/<count-1>.jpg")
    parser.add_argument("--rate", type=float, default=170.0, help="images/s the workers would take")
    parser.add_argument(
        "--client", choices=("service", "bare"), default="service", help="the service's fetch, or a bare client"
    )
    args = parser.parse_args()
    settings = Settings(allowed_networks="127.0.0.1/32")
    urls = [f"http://127.0.0.1:{args.port}/img/{n}.jpg" for n in range(args.count)]
    per_image = uvloop.run(paced_downloads(urls, args.rate, settings, args.client))
    print(json.dumps({"cpu_s_per_image": per_image, "rate": args.rate, "images": len(urls), "client": args.client}))


if __name__ == "__main__":
    main()
