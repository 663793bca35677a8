"""Completion webhook latency: seconds from a task's end (`finished_at`) to its signed webhook
arriving at a receiver on loopback, while tasks keep the service busy.

    .venv/bin/python -m bench.webhooks [--tasks 40] [--images 25]   # ~1 minute

`--tasks` tasks of `--images` images each are submitted at once (with `callback_url`), so
most of them end while others are still classifying; every webhook's signature is checked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.harness import cpu_model, percentile
from bench.images import make_images
from service.webhooks import signing
from testing.image_server import start_image_server
from testing.ports import free_port
from testing.services import ROOT, wait_ready

SECRET = "bench-secret"


async def measure(args: argparse.Namespace, base: str, image_port: int, receiver_port: int) -> list[float]:
    latencies: list[float] = []
    all_arrived = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        now = time.time()
        body = await request.read()
        if not signing.verify(body, SECRET, request.headers[signing.SIGNATURE]):
            raise RuntimeError("a webhook with a bad signature")
        latencies.append(now - datetime.fromisoformat(json.loads(body)["finished_at"]).timestamp())
        if len(latencies) == args.tasks:
            all_arrived.set()
        return web.Response()

    receiver = web.Application()
    receiver.router.add_post("/hook", receive)
    runner = web.AppRunner(receiver, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", receiver_port).start()
    try:
        await wait_ready(base)
        async with aiohttp.ClientSession() as http:
            callback = f"http://127.0.0.1:{receiver_port}/hook"
            for task in range(args.tasks):
                urls = [
                    f"http://127.0.0.1:{image_port}/img/{(task * args.images + n) % 200}.jpg"
                    for n in range(args.images)
                ]
                async with http.post(f"{base}/submit", json={"urls": urls, "callback_url": callback}) as response:
                    assert response.status == 202, await response.text()
            async with asyncio.timeout(600):
                await all_arrived.wait()
    finally:
        await runner.cleanup()
    return latencies


def start_service(data_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "run_service.py", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--data-dir", data_dir, "--allowed-networks", "127.0.0.1/32", "--webhook-secret", SECRET]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--images", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        for number, data in enumerate(make_images(200)):
            Path(directory, f"{number}.jpg").write_bytes(data)
        server, image_port = start_image_server(directory)
        with tempfile.TemporaryDirectory() as data_dir:
            service, base = start_service(data_dir)
            try:
                latencies = asyncio.run(measure(args, base, image_port, free_port()))
            finally:
                service.terminate()
                service.wait(timeout=60)
                server.terminate()
    print(f"CPU: {cpu_model()}")
    print(
        f"{len(latencies)} webhooks, {args.tasks} tasks of {args.images} images submitted at once: latency after the "
        f"task's end p50 {1000 * percentile(latencies, 0.5):.1f} ms, p95 {1000 * percentile(latencies, 0.95):.1f} ms, "
        f"max {1000 * max(latencies):.1f} ms"
    )


if __name__ == "__main__":
    main()
