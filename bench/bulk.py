"""Bulk jobs: the command-line client classifying 5,000 URLs end to end (`ics --urls-file
... --output ...`: five tasks of the service's 1,000, four in flight, every row written)
against one 1,000-URL task submitted directly and polled, on the same service in the same
run, rounds alternating. The target: the client's rate >= 0.9 of the direct task's.

    .venv/bin/python -m bench.bulk [--rounds 2] [--urls 5000]   # ~2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.harness import cpu_model
from bench.images import make_images
from testing.image_server import start_image_server
from testing.ports import free_port
from testing.services import ROOT, wait_ready


async def direct_task(base: str, urls: list[str]) -> float:
    """Images/s of one task, from its submit to its final state as a polling client sees it."""
    async with aiohttp.ClientSession() as http:
        started = time.perf_counter()
        async with http.post(f"{base}/submit", json={"urls": urls}) as response:
            task_id = (await response.json())["task_id"]
        while True:
            async with http.get(f"{base}/tasks/{task_id}?wait=30") as response:
                task = await response.json()
            if task["status"] in ("completed", "failed", "cancelled"):
                return len(urls) / (time.perf_counter() - started)


def bulk_job(base: str, urls_file: Path, output: Path) -> float:
    """Images/s of the client's whole run, process start to exit."""
    output.unlink(missing_ok=True)
    command = [sys.executable, "-m", "client", "--server", base, "--urls-file", str(urls_file), "--output", str(output)]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    rows = sum(1 for _ in output.open())
    return rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--urls", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        images = Path(directory, "img")
        images.mkdir()
        for number, data in enumerate(make_images(1000)):
            (images / f"{number}.jpg").write_bytes(data)
        server, image_port = start_image_server(str(images))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = [sys.executable, "run_service.py", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--data-dir", f"{directory}/data", "--allowed-networks", "127.0.0.1/32"]
        service = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(wait_ready(base))
            url = f"http://127.0.0.1:{image_port}/img/{{}}.jpg?run={{}}"
            asyncio.run(direct_task(base, [url.format(n, "warm") for n in range(100)]))  # workers warm
            urls_file = Path(directory, "urls.txt")
            direct_rates, bulk_rates = [], []
            for round_number in range(args.rounds):
                urls_file.write_text(
                    "\n".join(url.format(n % 1000, f"bulk{round_number}-{n}") for n in range(args.urls))
                )
                direct = [url.format(n, f"direct{round_number}") for n in range(1000)]
                order = ("direct", "bulk") if round_number % 2 == 0 else ("bulk", "direct")
                for kind in order:
                    if kind == "direct":
                        direct_rates.append(asyncio.run(direct_task(base, direct)))
                    else:
                        bulk_rates.append(bulk_job(base, urls_file, Path(directory, "out.jsonl")))
                print(
                    f"round {round_number + 1}: direct 1,000-URL task {direct_rates[-1]:.1f} images/s, "
                    f"client {args.urls:,} URLs {bulk_rates[-1]:.1f} images/s "
                    f"({bulk_rates[-1] / direct_rates[-1]:.0%})",
                    flush=True,
                )
        finally:
            service.terminate()
            service.wait(timeout=60)
            server.terminate()
    ratio = statistics.median(bulk / direct for bulk, direct in zip(bulk_rates, direct_rates, strict=True))
    print(f"CPU: {cpu_model()}")
    print(f"client / direct, median of {args.rounds} rounds: {ratio:.0%} (target >= 90%)")


if __name__ == "__main__":
    main()
