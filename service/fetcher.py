"""Download image bytes over HTTP(S) with hard limits on time and size.

Every way a download can go wrong becomes a `FetchError` with a stable `code`, so that the
dispatcher can record it on the item without knowing about aiohttp.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import aiohttp

from service.settings import Settings

CHUNK_BYTES = 64 * 1024


class FetchError(Exception):
    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    max_redirects: int

    @classmethod
    def from_settings(cls, settings: Settings) -> FetchLimits:
        return cls(max_bytes=settings.max_image_bytes, max_redirects=settings.max_redirects)


def make_session(settings: Settings) -> aiohttp.ClientSession:
    """The one shared client: aiodns resolution, bounded connections, every timeout set."""
    connector = aiohttp.TCPConnector(
        resolver=aiohttp.AsyncResolver(),
        limit=settings.download_concurrency,
        ttl_dns_cache=60,
    )
    timeout = aiohttp.ClientTimeout(
        total=settings.download_timeout,
        connect=settings.connect_timeout,
        sock_connect=settings.connect_timeout,
        sock_read=settings.read_timeout,
        ceil_threshold=5,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,
        headers={"User-Agent": "image-classification-service/1.0", "Accept": "image/*"},
    )


async def fetch(session: aiohttp.ClientSession, url: str, limits: FetchLimits) -> bytes:
    """The body of `url`, at most `limits.max_bytes` long, or FetchError."""
    try:
        async with session.get(url, max_redirects=limits.max_redirects) as response:
            if response.status >= 400:
                raise FetchError(
                    "http_error", f"the image host answered HTTP {response.status}", response.status
                )
            if response.content_length is not None and response.content_length > limits.max_bytes:
                raise _too_large(limits.max_bytes)
            body = bytearray()
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                body += chunk
                if len(body) > limits.max_bytes:
                    raise _too_large(limits.max_bytes)
            return bytes(body)
    except aiohttp.TooManyRedirects as exc:
        raise FetchError("too_many_redirects", f"more than {limits.max_redirects} redirects") from exc
    except aiohttp.ClientConnectorDNSError as exc:
        raise FetchError("dns_error", f"the host name could not be resolved: {exc.os_error}") from exc
    except aiohttp.ClientConnectorError as exc:
        refused = isinstance(exc.os_error, ConnectionRefusedError) or exc.os_error.errno == errno.ECONNREFUSED
        code = "connection_refused" if refused else "connection_error"
        raise FetchError(code, f"could not connect: {exc.os_error}") from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise FetchError("timeout", "the download timed out") from exc
    except aiohttp.InvalidURL as exc:
        raise FetchError("invalid_url", f"invalid URL: {exc}") from exc
    except aiohttp.ClientError as exc:
        raise FetchError("download_error", f"the download failed: {exc!r}") from exc


def _too_large(max_bytes: int) -> FetchError:
    return FetchError("download_too_large", f"the image is larger than {max_bytes} bytes")
