"""`python run_service.py` as a user starts it: serves /submit and classifies a real photo."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.conftest import ImageServer

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_run_service_classifies_a_photo_and_stops_cleanly(image_server: ImageServer) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "run_service.py", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(120):
            while True:
                try:
                    async with http.post(f"{base}/submit", json={"urls": [image_server.url("/photos/coffee")]}) as r:
                        assert r.status == 202
                        task_id = (await r.json())["task_id"]
                        break
                except aiohttp.ClientConnectionError:
                    assert process.poll() is None, process.stdout.read().decode()
                    await asyncio.sleep(0.2)
            while True:
                async with http.get(f"{base}/tasks/{task_id}") as r:
                    task = await r.json()
                if task["status"] == "completed":
                    break
                await asyncio.sleep(0.1)
        assert task["items"][0]["labels"][0]["label"] == "espresso"
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output
