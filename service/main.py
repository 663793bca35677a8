"""Start the image-classification service (`run_service.py`, or the `ics-service` console
script); `--help` lists the settings.

The app runs under `uvloop.run`. `web.run_app` would close the loop it is handed, so the
same steps are spelled out with `AppRunner` (which carries the shutdown timeout): start,
serve until SIGINT or SIGTERM, then clean up every resource the app holds. The listening
sockets are bound first of all (`service.listening`: a busy port is one line, before any
worker loads) and served here rather than by `web.TCPSite`, so that every connection is
served through `service.api.connections` (the bound on connections, the slow-client deadlines).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvloop
from aiohttp import web

from inference.specs import CatalogError
from service.api.appkeys import CONNECTIONS
from service.api.connections import raise_descriptor_limit
from service.app import create_app
from service.listening import ListenError, bind
from service.logs import configure_logging
from service.pool import DefaultModelError
from service.settings import PROGRAM, Settings, load_settings
from service.tasks.registry import StoreOpenError

log = logging.getLogger("service")


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    descriptors = raise_descriptor_limit()
    sockets = bind(settings.host, settings.port)  # before the workers load: a busy port says so at once
    app = create_app(settings)
    # aiohttp's own idle timer also runs while a request's headers arrive: a backstop that must
    # fire after the deadlines that the Connection around it keeps.
    keepalive = settings.keepalive_timeout + settings.header_timeout_max
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout, keepalive_timeout=keepalive)
    await runner.setup()
    listeners: list[asyncio.Server] = []
    try:
        assert runner.server is not None
        # What `web.TCPSite` does, with every connection served through `Connections`.
        factory = app[CONNECTIONS].protocol(runner.server)
        for sock in sockets:
            listeners.append(await loop.create_server(factory, sock=sock, backlog=128))
        log.info(
            "serving on %s (at most %d connections; open-file limit %d)",
            ", ".join(_url(sock) for sock in sockets),
            app[CONNECTIONS].limits.max_connections,
            descriptors,
        )
        await stop.wait()
        log.info("shutting down")
    finally:
        for listener in listeners:
            listener.close()
        for sock in sockets:
            sock.close()
        await runner.cleanup()
        app[CONNECTIONS].close()


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}" if sock.family != socket.AF_INET6 else f"http://[{host}]:{port}"


def main(program: str = PROGRAM) -> None:
    settings = load_settings(program=program)
    configure_logging(settings.log_format)
    if settings.prefetch:
        from inference.zoo import prefetch  # imports torch: only this command downloads weights

        prefetch([name.strip() for name in settings.prefetch.split(",") if name.strip()])
        return
    try:
        uvloop.run(serve(settings))
    except (ListenError, DefaultModelError, CatalogError, StoreOpenError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
