"""The download client on its own, against a real server on loopback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestServer

from service.app import download_session
from service.fetch.fetcher import fetch
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
