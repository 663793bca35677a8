"""The web page at `/`: plain HTML, CSS and JavaScript from `service/api/static/`, served by the
service itself (no build step, nothing from a CDN). It uses only the public API."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from service.api.openapi import Reply, documented

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/static"


@documented(
    summary="The web page: submit URLs or files and watch them being classified",
    tag="page",
    public=True,
    listed=False,
    replies={200: Reply("An HTML page", media_type="text/html")},
)
async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


@documented(
    summary="The page's icon, where browsers look for it without being told",
    tag="page",
    public=True,
    listed=False,
    replies={200: Reply("An SVG image", media_type="image/svg+xml")},
)
async def favicon(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "favicon.svg", headers={"Content-Type": "image/svg+xml"})


def add_page(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_static(STATIC_PREFIX, STATIC_DIR)
