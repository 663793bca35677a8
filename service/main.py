"""Start the image-classification service (`run_service.py`, or the `ics-service` console
script); `--help` lists the settings.

The app runs under `uvloop.run`. `web.run_app` would close the loop it is handed, so the
same steps are spelled out with `AppRunner` (which carries the shutdown timeout): start,
serve until SIGINT or SIGTERM, then clean up every resource the app holds. The listening
socket is opened here rather than by `web.TCPSite`, so that every connection is served
through `service.api.connections` (the bound on connections, the slow-client deadlines).
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop
from aiohttp import web

from inference.specs import CatalogError
from service.api.appkeys import CONNECTIONS
from service.api.connections import raise_descriptor_limit
from service.app import create_app
from service.logs import configure_logging
from service.pool import DefaultModelError
from service.settings import Settings, load_settings
from service.tasks.registry import StoreOpenError

log = logging.getLogger("service")


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    descriptors = raise_descriptor_limit()
    app = create_app(settings)
    # aiohttp's own idle timer also runs while a request's headers arrive: a backstop that must
    # fire after the deadlines that the Connection around it keeps.
    keepalive = settings.keepalive_timeout + settings.header_timeout_max
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout, keepalive_timeout=keepalive)
    await runner.setup()
    listener: asyncio.Server | None = None
    try:
        assert runner.server is not None
        # What `web.TCPSite` does, with every connection served through `Connections`.
        factory = app[CONNECTIONS].protocol(runner.server)
        listener = await loop.create_server(factory, settings.host, settings.port, backlog=128)
        log.info(
            "serving on http://%s:%d (at most %d connections; open-file limit %d)",
            settings.host,
            settings.port,
            app[CONNECTIONS].limits.max_connections,
            descriptors,
        )
        await stop.wait()
        log.info("shutting down")
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()
        app[CONNECTIONS].close()


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_format)
    if settings.prefetch:
        from inference.zoo import prefetch  # imports torch: only this command downloads weights

        prefetch([name.strip() for name in settings.prefetch.split(",") if name.strip()])
        return
    try:
        uvloop.run(serve(settings))
    except (DefaultModelError, CatalogError, StoreOpenError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
