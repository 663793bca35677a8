"""Download image bytes over HTTP(S) with hard limits on time, size, redirects and address.

Every way a download can go wrong becomes a `FetchError` with a stable `code`, so that the
dispatcher can record it on the item without knowing about aiohttp. Redirects are followed
here, not by aiohttp, so that every hop's URL passes the same checks as a submitted one.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import aiohttp
from yarl import URL

from service.fetch.policy import AddressPolicy, BlockedAddressError, PolicyResolver, policy_connector, url_problem
from service.sizes import readable

CHUNK_BYTES = 64 * 1024
REDIRECT_STATUSES = {301, 302, 303, 307, 308}


class FetchError(Exception):
    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


@dataclass(frozen=True)
class FetchLimits:
    """What one download may take (`--max-image-bytes`, `--max-redirects`, `--max-url-length`)."""

    max_bytes: int
    max_redirects: int
    max_url_length: int


@dataclass(frozen=True)
class DownloadTimeouts:
    """Seconds (`--download-timeout`, `--connect-timeout`, `--read-timeout`)."""

    total: float  # also ends a server that drips a byte at a time
    connect: float
    read: float


def make_session(policy: AddressPolicy, timeouts: DownloadTimeouts, concurrency: int) -> aiohttp.ClientSession:
    """The one shared client: aiodns resolution behind the address policy, at most
    `concurrency` connections, every timeout set, no proxies or credentials from the
    environment, and no cookies: one an image host sets for one user's download must not go
    out with another's."""
    connector = policy_connector(policy, PolicyResolver(aiohttp.AsyncResolver(), policy), concurrency)
    timeout = aiohttp.ClientTimeout(
        total=timeouts.total,
        connect=timeouts.connect,
        sock_connect=timeouts.connect,
        sock_read=timeouts.read,
        ceil_threshold=5,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": "image-classification-service/1.0", "Accept": "image/*"},
    )


async def fetch(session: aiohttp.ClientSession, url: str, limits: FetchLimits) -> bytes:
    """The body of `url`, at most `limits.max_bytes` long, or FetchError."""
    try:
        for _ in range(limits.max_redirects + 1):
            async with session.get(url, allow_redirects=False) as response:
                if response.status in REDIRECT_STATUSES:
                    url = _next_hop(url, response, limits)
                    continue
                if response.status >= 400:
                    raise FetchError("http_error", f"the image host answered HTTP {response.status}", response.status)
                return await _read_body(response, limits.max_bytes)
        raise FetchError("too_many_redirects", f"more than {limits.max_redirects} redirects")
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, BlockedAddressError):
            raise FetchError("blocked_address", exc.os_error.strerror or str(exc.os_error)) from exc
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            raise FetchError("dns_error", f"the host name could not be resolved: {exc.os_error}") from exc
        refused = isinstance(exc.os_error, ConnectionRefusedError) or exc.os_error.errno == errno.ECONNREFUSED
        code = "connection_refused" if refused else "connection_error"
        raise FetchError(code, f"could not connect: {exc.os_error}") from exc
    except TimeoutError as exc:  # aiohttp's ServerTimeoutError is one too
        raise FetchError("timeout", "the download timed out") from exc
    except aiohttp.InvalidURL as exc:
        raise FetchError("invalid_url", f"invalid URL: {exc}") from exc
    except aiohttp.ClientError as exc:
        raise FetchError("download_error", f"the download failed: {exc!r}") from exc


def _next_hop(url: str, response: aiohttp.ClientResponse, limits: FetchLimits) -> str:
    location = response.headers.get("Location")
    if not location:
        raise FetchError("invalid_redirect", f"HTTP {response.status} redirect without a Location")
    try:
        target = str(URL(url).join(URL(location)))
    except ValueError as exc:
        raise FetchError("invalid_redirect", f"redirect to an invalid URL: {exc}") from exc
    problem = url_problem(target, limits.max_url_length)
    if problem:
        raise FetchError("invalid_redirect", f"redirect refused: {problem}")
    return target


async def _read_body(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    if response.content_length is not None and response.content_length > max_bytes:
        raise _too_large(max_bytes)
    if response.content_length is not None and "Content-Encoding" not in response.headers:
        # The length is the body's, and the parser stops there: one read, no size loop
        # (which cost about a third of a download's CPU). A compressed body is inflated
        # as it arrives and may grow past its length, so it is counted chunk by chunk.
        return await response.read()
    body = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)


def _too_large(max_bytes: int) -> FetchError:
    return FetchError("download_too_large", f"the image is larger than {readable(max_bytes)} (--max-image-bytes)")
