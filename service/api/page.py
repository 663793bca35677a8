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


def add_page(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_static(STATIC_PREFIX, STATIC_DIR)
