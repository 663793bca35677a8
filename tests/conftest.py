"""Shared fixtures: the test photos, a real image server on 127.0.0.1, and service clients."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.pool import InferencePool
from service.pool.leftovers import remove_leftovers
from service.settings import Settings
from testing.ports import free_port
from testing.redis_server import RedisServer
from testing.services import ROOT, kill_group, service_command, wait_ready
from tests.fakes import FakePool

PHOTOS_DIR = Path(__file__).parent / "photos"

# One worker and short timeouts keep each test's service small and quick.
TEST_SETTINGS: dict[str, Any] = {
    "workers": 1,
    "threads_per_worker": 1,
    "connect_timeout": 2.0,
    "read_timeout": 1.0,
    "download_timeout": 5.0,
    "max_image_bytes": 1_000_000,
    "batch_wait_ms": 20.0,
    "max_redirects": 3,
    "allow_private_networks": True,  # the test image server is on 127.0.0.1
    "shutdown_grace": 1.0,  # a test that leaves a task running does not wait 30 s at teardown
}


def settings_for(**overrides: Any) -> Settings:
    """The tests' settings with `overrides`, validated like a user's (each call with a data dir
    of its own, unless `overrides` name one)."""
    data_dir = {"data_dir": tempfile.mkdtemp(prefix="ics-test-data-")}
    return Settings(**{**TEST_SETTINGS, **data_dir, **overrides})


# Fixtures that bring real processes or servers: a test that uses one is an e2e test.
E2E_FIXTURES = frozenset({"make_real_service", "redis", "redis_server", "service_url"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--serial-tests",
        choices=("run", "skip", "only"),
        default="run",
        help="tests marked serial (they cannot run under pytest-xdist): run them with the rest, skip them, "
        "or run only them (run_tests.sh runs the rest on every core, then these alone)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`-m "not e2e"` is the fast loop: tests marked e2e (by hand, by module, or by using a
    fixture of `E2E_FIXTURES`) start worker processes, a service, Redis or Chromium, or run
    the real model. `--serial-tests` picks the serial ones in or out."""
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
    choice = config.getoption("--serial-tests")
    if choice == "run":
        return
    keep = [item for item in items if (item.get_closest_marker("serial") is not None) == (choice == "only")]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


@pytest.fixture(scope="session", autouse=True)
def empty_torch_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Weights cached on the machine running the tests must not change what they see:
    workers (which inherit the environment) look in an empty torch hub cache."""
    with pytest.MonkeyPatch.context() as patch:
        torch_home = tmp_path_factory.mktemp("torch_home")
        patch.setenv("TORCH_HOME", str(torch_home))
        yield torch_home


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left() -> Iterator[None]:
    """Services and workers killed with -9 (on purpose) leave their batch directories and
    semaphores in /dev/shm, for the next start on the machine to remove; the run removes
    them itself."""
    yield
    remove_leftovers()


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One ONNX model cache for the whole run, empty at its start: the first service exports
    the default model and the others reuse it, as instances on one machine do."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("model_cache")
        patch.setenv("ICS_MODEL_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    return {path.stem: path.read_bytes() for path in sorted(PHOTOS_DIR.glob("*.jpg"))}


class ImageServer:
    """Serves the test photos and a set of misbehaving endpoints; counts every request."""

    def __init__(self, photos: dict[str, bytes]) -> None:
        self.photos = photos
        self.files: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()
        self.dropped = 0  # /drip downloads the client gave up on
        self.server: TestServer | None = None
        self.app = web.Application()
        self.app.add_routes(
            [
                web.get("/photos/{name}", self._photo),
                web.get("/slow/{name}", self._slow_photo),
                web.get("/status/{code}", self._status),
                web.get("/text", self._text),
                web.get("/big", self._big),
                web.get("/big-stream", self._big_stream),
                web.get("/gzip-bomb", self._gzip_bomb),
                web.get("/gzip/{name}", self._gzip_photo),
                web.get("/hang", self._hang),
                web.get("/loop", self._loop),
                web.get("/redirect", self._redirect),
                web.get("/drip", self._drip),
                web.get("/file/{name}", self._file),
            ]
        )

    def url(self, path: str) -> str:
        assert self.server is not None
        return str(self.server.make_url(path))

    def total_hits(self, prefix: str = "/") -> int:
        return sum(count for path, count in self.hits.items() if path.startswith(prefix))

    def _photo_response(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.photos:
            raise web.HTTPNotFound()
        return web.Response(body=self.photos[name], content_type="image/jpeg")

    async def _photo(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        return self._photo_response(request)

    async def _slow_photo(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        await asyncio.sleep(float(request.query.get("delay", "0.5")))
        return self._photo_response(request)

    async def _status(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        return web.Response(status=int(request.match_info["code"]), text="nope")

    async def _text(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        return web.Response(body=b"this is plain text, not a JPEG", content_type="image/jpeg")

    async def _big(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        return web.Response(body=b"\xff" * 2_000_000, content_type="image/jpeg")

    async def _big_stream(self, request: web.Request) -> web.StreamResponse:
        """No Content-Length: only the streaming cap can stop it."""
        self.hits[request.path] += 1
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(40):
            await response.write(b"\xff" * 65_536)
        await response.write_eof()
        return response

    async def _gzip_bomb(self, request: web.Request) -> web.Response:
        """A few kilobytes on the wire (Content-Length says so) that inflate to 2 MB."""
        self.hits[request.path] += 1
        body = gzip.compress(b"\xff" * 2_000_000)
        return web.Response(body=body, headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"})

    async def _gzip_photo(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        body = gzip.compress(self.photos[request.match_info["name"]])
        return web.Response(body=body, headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"})

    async def _hang(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        await asyncio.sleep(30)
        return web.Response(body=b"too late")

    async def _loop(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        raise web.HTTPFound("/loop")

    async def _redirect(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        raise web.HTTPFound(request.query["to"])

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        """One byte every 0.2 s: never idle long enough for a read timeout. A client that
        hangs up meanwhile is counted in `dropped`."""
        self.hits[request.path] += 1
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        try:
            for _ in range(300):
                await response.write(b"\xff")
                await asyncio.sleep(0.2)
        except (ConnectionResetError, asyncio.CancelledError):  # the test server cancels a gone client's handler
            self.dropped += 1
            raise
        return response

    async def _file(self, request: web.Request) -> web.Response:
        """Any bytes a test put in `files`, served as image/jpeg whatever they are (after
        `delay` seconds, if the query gives one)."""
        self.hits[request.path] += 1
        await asyncio.sleep(float(request.query.get("delay", "0")))
        name = request.match_info["name"]
        if name not in self.files:
            raise web.HTTPNotFound()
        return web.Response(body=self.files[name], content_type="image/jpeg")


@asynccontextmanager
async def running_service(*flags: str, log: Path | None = None) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    """`run_service.py` as a user starts it (see `service_command`; private networks allowed),
    in a process group of its own, until `/readyz` answers 200; whatever is left of the group
    (the web process and its workers) is killed at the end. Its output is a pipe to read when
    it stops, or with `log` goes to that file (a busy service fills a pipe nobody reads)."""
    port = free_port()
    sink = subprocess.PIPE if log is None else log.open("ab")
    output = {"stdout": sink, "stderr": subprocess.STDOUT}
    command = service_command(port, "--allow-private-networks", *flags)
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, **output)  # type: ignore[call-overload]
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            await wait_ready(base, process)
        except RuntimeError:
            raise AssertionError(process.stdout.read().decode() if process.stdout else log) from None
        yield process, base
    finally:
        kill_group(process.pid)  # the web process may be gone, its group not
        process.wait()
        if log is not None:
            sink.close()  # type: ignore[union-attr]


@contextmanager
def started_service(*flags: str) -> Iterator[str]:
    """`run_service.py` as a user starts it (see `service_command`), for synchronous tests
    (requests, schemathesis): its base URL once `/readyz` answers 200; stopped at the end."""
    port = free_port()
    process = subprocess.Popen(service_command(port, *flags), cwd=ROOT, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            asyncio.run(wait_ready(base, process))
        except RuntimeError:
            raise AssertionError("the service exited during start-up") from None
        yield base
    finally:
        process.terminate()
        process.wait(timeout=60)


ImageServerFactory = Callable[[str], Awaitable[ImageServer]]


@pytest.fixture
def make_image_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]], photos: dict[str, bytes]
) -> ImageServerFactory:
    """`await make_image_server("127.0.0.2")`: another image server on that address."""

    async def make(host: str) -> ImageServer:
        images = ImageServer(photos)
        # A response still in flight when the test ends (a slow image a task was left
        # downloading) is cancelled after 0.5 s, not waited for: up to 10 s per test.
        images.server = await aiohttp_server(images.app, host=host, shutdown_timeout=0.5)
        return images

    return make


@pytest.fixture
async def image_server(make_image_server: ImageServerFactory) -> ImageServer:
    return await make_image_server("127.0.0.1")


ServiceFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_service(aiohttp_client: Callable[..., Awaitable[TestClient]]) -> ServiceFactory:
    """`await make_service(**setting_overrides)` starts the real app on a fake inference pool
    (`tests.fakes.FakePool`, or the one passed as `pool=`): everything but the worker
    processes, for tests of the HTTP contract. An image whose bytes are `fakes.image(label)`
    gets that label; any other bytes are `not_an_image`."""

    async def make(*, pool: InferencePool | None = None, **overrides: Any) -> TestClient:
        return await aiohttp_client(create_app(settings_for(**overrides), pool=pool or FakePool()))

    return make


@pytest.fixture
def make_real_service(aiohttp_client: Callable[..., Awaitable[TestClient]]) -> ServiceFactory:
    """`await make_real_service(**setting_overrides)` starts the real app with its real
    process pool and model (an e2e test)."""

    async def make(**overrides: Any) -> TestClient:
        return await aiohttp_client(create_app(settings_for(**overrides)))

    return make


async def wait_for_task(client: TestClient, task_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll GET /tasks/<id> until the task reaches a final state."""
    async with asyncio.timeout(timeout):
        while True:
            response = await client.get(f"/tasks/{task_id}")
            assert response.status == 200
            task = await response.json()
            if task["status"] in ("completed", "failed", "cancelled"):
                return task
            await asyncio.sleep(0.05)


async def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics parsed: (sample name, sorted labels) -> value."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(await response.text())
        for sample in family.samples
    }


async def metric(client: TestClient, name: str) -> float:
    """The value of one unlabelled metric on GET /metrics."""
    return (await scrape(client))[(name, ())]


async def submit(client: TestClient, urls: list[str], **fields: Any) -> dict[str, Any]:
    response = await client.post("/submit", json={"urls": urls, **fields})
    assert response.status == 202, await response.text()
    return await response.json()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the session; tests keep apart by key prefix (`redis_prefix`)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, to stop, freeze or restart (`redis_server` is shared)."""
    server = RedisServer(tmp_path / "redis")
    server.directory.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"
