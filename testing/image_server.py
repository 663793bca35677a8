"""An image server in a process of its own, serving a directory's files from memory at
`/img/<name>`: it stands in for image hosts elsewhere and does not share the event loop of
whoever drives the service (the tests' misbehaving image server is `tests.conftest.ImageServer`)."""

from __future__ import annotations

import multiprocessing
from multiprocessing.process import BaseProcess
from pathlib import Path

from aiohttp import web

from testing.ports import free_port, wait_for_port


def _serve_images(directory: str, port: int) -> None:
    """The images from memory: it shares the 2 cores with the service, so it should cost
    little (files through aiohttp's static handler cost about 0.6 ms of CPU per image, nearly
    as much as the service's web process)."""
    images = {path.name: path.read_bytes() for path in Path(directory).iterdir()}

    async def image(request: web.Request) -> web.Response:
        body = images.get(request.match_info["name"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/img/{name}", image)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def start_image_server(directory: str) -> tuple[BaseProcess, int]:
    """The server's process (a daemon: it ends with its parent) and its port, once it listens."""
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(target=_serve_images, args=(directory, port), daemon=True)
    process.start()
    wait_for_port(port)
    return process, port
