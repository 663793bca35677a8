"""What the end-to-end benches share: the service as a subprocess with its memory watched, the
requests that drive it, and what the machine is. `bench.run_bench` and the benches beside it are
built from these and from `testing/` (ports, the image server, Redis, waiting for readiness),
which the tests use too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import aiohttp
import psutil

from inference.specs import cpu_flags
from testing.ports import free_port
from testing.services import ROOT, wait_ready

POLL_SECONDS = 0.25  # how often the bench asks whether its tasks are done


# --- the service, and the requests that drive it ---


class MemoryWatch:
    """Samples the memory of the service process and its workers; keeps the peaks.

    RSS counts the shared pages of the torch/CUDA libraries once per process; PSS shares
    them out, so the PSS total is what the service really costs the machine.
    """

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak: dict[str, int] = {"main_rss": 0, "workers_rss": 0, "total_rss": 0, "total_pss": 0}

    def sample(self, with_pss: bool) -> None:
        try:
            processes = [self.process, *self.process.children(recursive=True)]
            rss = [process.memory_info().rss for process in processes]
            pss = sum(process.memory_full_info().pss for process in processes) if with_pss else 0
        except psutil.Error:
            return
        now = {"main_rss": rss[0], "workers_rss": sum(rss[1:]), "total_rss": sum(rss), "total_pss": pss}
        self.peak = {key: max(value, now[key]) for key, value in self.peak.items()}

    async def run(self) -> None:
        # PSS walks every worker's page tables (costly with torch's many mappings), so it is
        # sampled every 2 s; RSS is cheap and sampled every 0.25 s.
        for tick in itertools.count():
            self.sample(with_pss=tick % 8 == 0)
            await asyncio.sleep(0.25)


async def submit(http: aiohttp.ClientSession, base: str, urls: list[str]) -> str:
    async with http.post(f"{base}/submit", json={"urls": urls}) as response:
        body = await response.json()
        if response.status != 202:
            raise RuntimeError(f"submit failed: {response.status} {body}")
        return str(body["task_id"])


async def wait_all_done(http: aiohttp.ClientSession, base: str, task_ids: set[str]) -> float:
    """Poll the task list (summaries only) until every task in `task_ids` is final; the
    latest `finished_at` among them (Unix time). They are the newest tasks, so the page holds
    them and little else: a page of hundreds of finished tasks at every poll would be the
    bench's load on the web process, not the work measured."""
    pending = set(task_ids)
    finished = 0.0
    limit = str(min(500, len(task_ids) + 20))
    while pending:
        async with http.get(f"{base}/tasks", params={"limit": limit}) as response:
            page = await response.json()
        for task in page["tasks"]:
            if task["task_id"] in pending and task["status"] in ("completed", "failed", "cancelled"):
                if task["status"] != "completed" or task["progress"]["failed"]:
                    raise RuntimeError(f"task {task['task_id']} ended {task['status']}: {task['progress']}")
                pending.discard(task["task_id"])
                finished = max(finished, datetime.fromisoformat(task["finished_at"]).timestamp())
        if pending:
            # Each poll costs the web process about 0.7 ms of CPU (SQLite; 0.4 in memory):
            # every 0.1 s that was 0.045 ms per image of a 1,000-URL task's web CPU figure.
            # Throughput does not depend on it: it is timed to `finished_at`.
            await asyncio.sleep(POLL_SECONDS)
    return finished


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The load client's own garbage collection paused while it times requests: a full
    collection of the bench process, slowed by the service keeping both cores busy, took
    40-90 ms and, landing inside a timed GET, made the GET p99 (seen with a gc.callbacks
    probe: the service's web process had no pause of that size)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def latency_under_load(http: aiohttp.ClientSession, base: str, urls: list[str]) -> dict[str, list[float]]:
    """Time GET /tasks/<id> (the running 1,000-item task) and POST /submit while it runs.

    A GET is timed until its whole body has arrived; parsing the JSON is the client's cost
    and happens after the clock stops."""
    big = await submit(http, base, urls)
    timings: dict[str, list[float]] = {"get": [], "submit": []}
    small_tasks: set[str] = set()
    with gc_paused():
        while True:
            started = time.perf_counter()
            async with http.get(f"{base}/tasks/{big}") as response:
                body = await response.read()
            timings["get"].append(time.perf_counter() - started)
            if json.loads(body)["status"] not in ("queued", "running"):
                break
            if len(timings["get"]) % 4 == 0:
                started = time.perf_counter()
                small_tasks.add(await submit(http, base, urls[:1]))
                timings["submit"].append(time.perf_counter() - started)
            await asyncio.sleep(0.05)
    await wait_all_done(http, base, small_tasks)
    return timings


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def own_cpu_seconds() -> float:
    """This process's CPU time, to the microsecond (psutil's counts in clock ticks)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client_connector() -> aiohttp.TCPConnector:
    """The load client's connections. Idle ones are closed after 5 s, before the service's
    own `--keepalive-timeout` (15 s) would: a request sent on a connection the service is
    closing that very moment fails with "Server disconnected" (seen once in round 2, on one
    of 100 concurrent submits reusing connections idle since round 1)."""
    return aiohttp.TCPConnector(limit=200, keepalive_timeout=5)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class Service:
    """`run_service.py` on one task store, as a subprocess, with its memory watched."""

    def __init__(self, args: argparse.Namespace, store: str, data_dir: str, extra: tuple[str, ...] = ()) -> None:
        self.store = store
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "run_service.py", "--host", "127.0.0.1", "--port", str(self.port)]
        command += [
            "--runtime",
            args.runtime,
            "--workers",
            str(args.workers),
            "--threads-per-worker",
            str(args.threads),
        ]
        command += ["--store", store, "--data-dir", data_dir, "--allowed-networks", "127.0.0.1/32", *extra]
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.memory = MemoryWatch(self.process.pid)

    async def ready(self) -> float:
        """Seconds from the process start to `/readyz` answering 200."""
        await wait_ready(self.base, self.process)
        return time.perf_counter() - self.started

    def workers(self) -> list[psutil.Process]:
        return [child for child in self.memory.process.children() if "spawn_main" in " ".join(child.cmdline())]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


# --- the machine ---


def cpu_model() -> str:
    """The CPU's model name and whether it has AVX-512 BF16 / AMX (figures depend on them)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = sorted(flag for flag in cpu_flags() if flag == "avx512_bf16" or flag.startswith("amx"))
    return f"{model} ({', '.join(flags) or 'no avx512_bf16/amx'})"
