"""The service as a user starts it: the command line, waiting until it is ready, and killing
what is left of it (its web process and its workers) at the end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent  # the checkout: where run_service.py is


def service_command(port: int, *flags: str) -> list[str]:
    """`run_service.py` on 127.0.0.1:`port` with one worker process (and a data dir of its own,
    unless `flags` name one); run it with `cwd=ROOT`."""
    data = [] if "--data-dir" in flags else ["--data-dir", tempfile.mkdtemp(prefix="ics-test-data-")]
    address = ["--host", "127.0.0.1", "--port", str(port)]
    return [sys.executable, "run_service.py", *address, "--workers", "1", *data, *flags]


async def wait_ready(base: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 120.0) -> None:
    """Until the service at `base` answers `/readyz` with 200; RuntimeError if its `process`
    exits first, TimeoutError after `timeout` seconds."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
        while True:
            try:
                async with http.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the service at {base} exited with status {process.returncode}")
            await asyncio.sleep(0.05)


def running(process: psutil.Process) -> bool:
    """Alive; a dead process nobody has reaped yet (a zombie) is not."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_group(group: int) -> None:
    """kill -9 of a process group (a service started in a session of its own: its web
    process, its workers...), all at once but for multiprocessing's resource tracker. That
    one goes last: once the others are gone it removes the named semaphores they left in
    /dev/shm; killed with them it would leave them there for good (8 per service)."""
    members: list[psutil.Process] = []
    trackers: list[psutil.Process] = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(OSError, psutil.Error):  # gone meanwhile
            if os.getpgid(process.pid) == group:
                tracker = "resource_tracker" in " ".join(process.info["cmdline"] or ())
                (trackers if tracker else members).append(process)
    for process in members:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    for process in trackers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.resume()  # the group may have been stopped (SIGSTOP)
    deadline = time.monotonic() + 5
    while any(running(process) for process in trackers) and time.monotonic() < deadline:
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):  # anything that started meanwhile
        os.killpg(group, signal.SIGKILL)
