"""The download client on its own, against a real server on loopback."""

from __future__ import annotations

import re
import socket
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from service.app import download_session
from service.fetch.fetcher import fetch
from service.fetch.policy import AddressPolicy, BlockedAddressError, PolicyResolver
from tests.conftest import settings_for


async def test_a_cookie_one_download_was_given_is_not_sent_with_the_next(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    # Downloads of different users' tasks share one session: a cookie kept from one
    # (a signed-URL host's session, say) would go out with the others to that host. By a
    # name: aiohttp's default jar keeps no cookie from a host given as an IP address.
    cookies_sent: list[str | None] = []

    async def image(request: web.Request) -> web.Response:
        cookies_sent.append(request.headers.get("Cookie"))
        response = web.Response(body=b"\xff\xd8 not really a JPEG", content_type="image/jpeg")
        response.set_cookie("session", "alice-secret", path="/")
        return response

    app = web.Application()
    app.router.add_get("/img/{name}", image)
    server = await aiohttp_server(app, host="127.0.0.1")
    settings = settings_for()  # the tests allow loopback
    limits = settings.fetch_limits()
    async with download_session(settings) as session:
        for name in ("alice", "bob"):
            url = server.make_url(f"/img/{name}").with_host("localhost")
            assert (await fetch(session, str(url), limits)).startswith(b"\xff\xd8")
    assert cookies_sent == [None, None]


class FixedResolver(AbstractResolver):
    """Answers every name with `addresses`, as a DNS server would."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=address, port=port, family=socket.AF_INET, proto=0, flags=0)
            for address in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_a_name_with_a_private_and_a_public_address_connects_only_to_the_public_one() -> None:
    """The README's promise: of several DNS answers, the private ones are dropped (a name
    that also points inside cannot be used to reach inside); only private ones fail clearly."""
    policy = AddressPolicy()
    mixed = PolicyResolver(FixedResolver(["10.0.0.7", "93.184.215.14", "127.0.0.1"]), policy)
    assert [answer["host"] for answer in await mixed.resolve("images.example", 80)] == ["93.184.215.14"]
    inside = PolicyResolver(FixedResolver(["10.0.0.7", "192.168.1.2"]), policy)
    with pytest.raises(BlockedAddressError, match=re.escape("10.0.0.7, 192.168.1.2 (for images.example)")):
        await inside.resolve("images.example", 80)


async def test_proxy_variables_are_ignored(
    aiohttp_server: Callable[..., Awaitable[TestServer]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloads go straight to the image's host: a proxy in the environment would see (and
    could answer for) every URL users send, and could reach what the address policy keeps out."""

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=b"\xff\xd8 direct", content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/img", image)
    server = await aiohttp_server(app, host="127.0.0.1")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there: a proxy used would fail
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    settings = settings_for()
    async with download_session(settings) as session:
        assert await fetch(session, str(server.make_url("/img")), settings.fetch_limits()) == b"\xff\xd8 direct"
