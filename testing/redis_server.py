"""A real `redis-server` for tests and benchmarks: on a free loopback port, with its files in a
directory of the caller's, append-only as docs/scale-out.md asks of a deployment; never a system service."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from testing.ports import free_port


class RedisServer:
    """`start` it, `stop` it; `url` is where clients reach it. `appendfsync`: "always" for
    tests (nothing acknowledged is lost to a kill -9), "everysec" as deployments run it."""

    def __init__(self, directory: Path, appendfsync: str = "always") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: run_tests.sh installs Debian's redis-server")
        self.binary = binary
        self.directory = directory
        self.appendfsync = appendfsync
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    raise RuntimeError((self.directory / "redis.log").read_text()) from None
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """SIGTERM: Redis finishes its append-only file and exits."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None
