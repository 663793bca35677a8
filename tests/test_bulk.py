"""Bulk jobs with the command-line client against `run_service.py`: thousands of URLs in many
tasks, a CSV column, a directory tree, results files with exactly one row per input, runs
interrupted by SIGINT and SIGKILL and resumed without downloading an image twice, 429s waited
out, and the client's memory flat over a long input."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from testing.services import ROOT
from tests.conftest import PHOTOS_DIR, ImageServer, running_service

pytestmark = pytest.mark.e2e  # the bulk client against a real service

TASK_LIMIT = "100"


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[str]:
    async with running_service("--max-urls-per-task", TASK_LIMIT, log=tmp_path / "service.log") as (_, base):
        yield base


async def start_client(base: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client",
        "--server",
        base,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process, timeout: float = 240) -> tuple[int, str]:
    async with asyncio.timeout(timeout):
        _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


def read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    return [json.loads(line) for line in path.read_text().splitlines()]


async def tasks_of(base: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/tasks?limit=500") as response:
        return list((await response.json())["tasks"])


def url_list(image_server: ImageServer, count: int, delay: float = 0.0) -> tuple[list[str], dict[int, str]]:
    """`count` URLs: half good (each its own file), a quarter 404, a quarter not images; and
    what each should become."""
    coffee = (PHOTOS_DIR / "coffee.jpg").read_bytes()
    urls, expected = [], {}
    for n in range(count):
        if n % 4 < 2:
            image_server.files[f"g{n}"] = coffee
            urls.append(image_server.url(f"/file/g{n}?delay={delay}"))
            expected[n] = "espresso"
        elif n % 4 == 2:
            urls.append(image_server.url(f"/status/404?n={n}"))
            expected[n] = "http_error"
        else:
            urls.append(image_server.url(f"/text?n={n}"))
            expected[n] = "not_an_image"
    return urls, expected


def check_rows(rows: list[dict[str, Any]], expected: dict[int, str]) -> None:
    assert sorted(int(row["index"]) for row in rows) == list(range(len(expected)))  # one each, no duplicate
    for row in rows:
        outcome = row["label"] if row["status"] == "succeeded" else row["error_code"]
        assert outcome == expected[int(row["index"])], row


async def test_a_long_url_list_runs_as_many_tasks_with_one_row_per_url(
    service: str, image_server: ImageServer, tmp_path: Path
) -> None:
    urls, expected = url_list(image_server, 2000)
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text("# a comment, then the URLs\n" + "\n".join(urls) + "\nnot a url\n\n")
    expected[2000] = "invalid_input"
    output = tmp_path / "results.jsonl"
    status, stderr = await finish(await start_client(service, "--urls-file", str(urls_file), "--output", str(output)))
    assert status == 1, stderr  # some failed
    rows = read_rows(output)
    check_rows(rows, expected)
    tasks = await tasks_of(service)
    assert len(tasks) == 20  # 2,000 URLs in tasks of the service's 100
    assert {task["priority"] for task in tasks} == {"batch"}  # a bulk job leaves interactive work first
    assert all(image_server.hits[f"/file/g{n}"] == 1 for n in expected if expected[n] == "espresso")
    good = next(row for row in rows if row["status"] == "succeeded")
    assert good["labels"][0]["label"] == "espresso" and good["score"] > 0.9 and len(good["task_id"]) == 32
    assert "2001 rows in" in stderr and "1000 classified, 1001 failed or cancelled" in stderr
    assert not output.with_name("results.jsonl.manifest").exists()  # a finished job needs none


async def test_a_csv_column_and_a_directory_tree_go_into_a_csv(
    service: str, image_server: ImageServer, tmp_path: Path
) -> None:
    table = tmp_path / "images.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image_url", "note"])
        writer.writerow(["1", image_server.url("/photos/chelsea"), "a cat"])
        writer.writerow(["2", image_server.url("/status/404"), "gone"])
    tree = tmp_path / "photos"
    (tree / "a" / "b").mkdir(parents=True)
    shutil.copy(PHOTOS_DIR / "coffee.jpg", tree / "coffee.jpg")
    shutil.copy(PHOTOS_DIR / "rocket.jpg", tree / "a" / "b" / "rocket-without-extension")
    (tree / "a" / "notes.txt").write_text("not an image")
    output = tmp_path / "results.csv"
    args = ["-r", str(tree), "--urls-file", str(table), "--url-column", "image_url", "--output", str(output)]
    status, stderr = await finish(await start_client(service, *args, "--priority", "interactive"))
    assert status == 1, stderr
    assert {task["priority"] for task in await tasks_of(service)} == {"interactive"}  # as told
    rows = {row["input"]: row for row in read_rows(output)}
    assert set(rows) == {
        str(tree / "coffee.jpg"),
        str(tree / "a" / "b" / "rocket-without-extension"),  # an image by its content
        image_server.url("/photos/chelsea"),
        image_server.url("/status/404"),
    }
    assert rows[str(tree / "coffee.jpg")]["label"] == "espresso"
    assert rows[str(tree / "a" / "b" / "rocket-without-extension")]["label"] == "missile"
    assert rows[image_server.url("/photos/chelsea")]["label"] == "Egyptian cat"
    assert rows[image_server.url("/status/404")]["error_code"] == "http_error"
    assert json.loads(rows[str(tree / "coffee.jpg")]["labels"])[0]["label"] == "espresso"

    # Without --url-column, a column "url" is looked for.
    status, stderr = await finish(
        await start_client(service, "--urls-file", str(table), "--output", str(tmp_path / "x.csv"))
    )
    assert status == 2 and "no column 'url' (columns: id, image_url, note)" in stderr
    # A refusal of the whole job ends it with its reason, not a traceback.
    args = ["--urls-file", str(table), "--url-column", "image_url", "--output", str(tmp_path / "y.csv")]
    status, stderr = await finish(await start_client(service, *args, "--model", "resnet9000"))
    assert status == 2 and "unknown_model" in stderr and "Traceback" not in stderr, stderr


async def rows_so_far(output: Path) -> int:
    return output.read_text().count("\n") if output.exists() else 0


async def interrupt(base: str, output: Path, args: list[str], after_rows: int, how: signal.Signals) -> tuple[int, str]:
    process = await start_client(base, *args)
    async with asyncio.timeout(120):
        while await rows_so_far(output) < after_rows:
            assert process.returncode is None
            await asyncio.sleep(0.05)
    process.send_signal(how)
    return await finish(process)


async def test_an_interrupted_job_resumes_without_downloading_twice(
    service: str, image_server: ImageServer, tmp_path: Path
) -> None:
    urls, expected = url_list(image_server, 800, delay=0.02)
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text("\n".join(urls) + "\n")
    output = tmp_path / "results.jsonl"
    args = ["--urls-file", str(urls_file), "--output", str(output), "--concurrency", "2"]

    assert (await interrupt(service, output, args, 150, signal.SIGINT))[0] == 130
    assert output.with_name("results.jsonl.manifest").exists()
    assert (await interrupt(service, output, [*args, "--resume"], 400, signal.SIGKILL))[0] == -signal.SIGKILL
    with output.open("a") as handle:
        handle.write('{"index": 12, "inp')  # a row the kill cut off mid-line
    refused, stderr = await finish(await start_client(service, *args))
    assert refused == 2 and "--resume" in stderr  # an existing output is not appended to by accident
    status, stderr = await finish(await start_client(service, *args, "--resume"))
    assert status == 1, stderr

    check_rows(read_rows(output), expected)
    downloads = {n: image_server.hits[f"/file/g{n}"] for n in expected if expected[n] == "espresso"}
    assert set(downloads.values()) == {1}, {n: hits for n, hits in downloads.items() if hits != 1}
    assert "800 rows in" in stderr
    assert not output.with_name("results.jsonl.manifest").exists()


async def test_a_full_service_is_waited_for(image_server: ImageServer, tmp_path: Path) -> None:
    urls, expected = url_list(image_server, 300, delay=0.05)
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text("\n".join(urls) + "\n")
    output = tmp_path / "results.jsonl"
    flags = ["--max-urls-per-task", "50", "--max-active-images", "100"]
    async with running_service(*flags, log=tmp_path / "service.log") as (_, base):
        status, stderr = await finish(
            await start_client(base, "--urls-file", str(urls_file), "--output", str(output), "--concurrency", "4")
        )
    assert status == 1, stderr
    assert "the service is busy (429); retrying in 5 s" in stderr
    check_rows(read_rows(output), expected)


async def test_the_clients_memory_stays_flat_over_a_long_input(
    service: str, image_server: ImageServer, tmp_path: Path
) -> None:
    count = 12_000
    urls_file = tmp_path / "urls.txt"
    with urls_file.open("w") as handle:
        for n in range(count):
            handle.write(image_server.url(f"/status/404?n={n}") + "\n")
    output = tmp_path / "results.jsonl"
    process = await start_client(service, "--urls-file", str(urls_file), "--output", str(output), "--concurrency", "8")
    client = psutil.Process(process.pid)
    finished = asyncio.create_task(finish(process))  # reads its output meanwhile
    samples: list[tuple[int, int]] = []  # (rows, RSS)
    with contextlib.suppress(psutil.NoSuchProcess):
        while not finished.done():
            samples.append((await rows_so_far(output), client.memory_info().rss))
            await asyncio.sleep(0.1)
    status, stderr = await finished
    assert status == 1, stderr
    assert len(read_rows(output)) == count
    early = max(rss for rows, rss in samples if rows <= count // 4)
    late = max(rss for rows, rss in samples if rows >= count // 2)
    # From a quarter of the rows to the end, about 0.5 MB more; keeping every row would be 6 MB.
    assert late - early < 3 * 2**20, (early, late)
    assert os.path.getsize(output) > 0


async def test_more_images_than_a_task_holds_become_a_bulk_job_on_stdout(tmp_path: Path) -> None:
    for name in ("chelsea", "coffee", "rocket"):
        shutil.copy(PHOTOS_DIR / f"{name}.jpg", tmp_path / f"{name}.jpg")
    async with running_service("--max-urls-per-task", "2", log=tmp_path / "service.log") as (_, base):
        process = await start_client(base, str(tmp_path))
        async with asyncio.timeout(120):
            stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert "3 images: more than one task holds" in stderr.decode()
    rows = [json.loads(line) for line in stdout.decode().splitlines()]
    assert sorted((row["index"], row["label"]) for row in rows) == [
        (0, "Egyptian cat"),
        (1, "espresso"),
        (2, "missile"),
    ]
    assert len({row["task_id"] for row in rows}) == 2


async def test_ctrl_c_with_cancel_cancels_the_tasks_in_flight_and_resume_finishes(
    service: str, image_server: ImageServer, tmp_path: Path
) -> None:
    urls, expected = url_list(image_server, 400, delay=0.05)
    urls_file = tmp_path / "urls.txt"
    urls_file.write_text("\n".join(urls) + "\n")
    output = tmp_path / "results.jsonl"
    args = ["--urls-file", str(urls_file), "--output", str(output), "--concurrency", "2"]
    status, stderr = await interrupt(service, output, [*args, "--cancel"], 50, signal.SIGINT)
    assert status == 130 and "cancelled 2 tasks in flight" in stderr, stderr
    assert "run it again with --resume" in stderr
    assert sum(task["status"] == "cancelled" for task in await tasks_of(service)) == 2
    status, stderr = await finish(await start_client(service, *args, "--resume"))
    assert status == 1, stderr
    check_rows(read_rows(output), expected)  # cancelled inputs without a row were sent again


async def test_a_urls_file_with_a_mark_and_a_bad_byte_runs_and_resumes(
    service: str, image_server: ImageServer, tmp_path: Path
) -> None:
    """Issue 34, item 4: one non-UTF-8 byte was a traceback with no row, and `--resume` the same."""
    urls = tmp_path / "urls.txt"
    good = image_server.url("/photos/coffee").encode()
    urls.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good + b"?caf\xe9\n" + good + b"?n=3\n")
    output = tmp_path / "rows.jsonl"
    status, stderr = await finish(await start_client(service, "--urls-file", str(urls), "--output", str(output)))
    assert status == 1 and "Traceback" not in stderr, stderr
    rows = {row["index"]: row for row in read_rows(output)}
    assert [rows[index]["status"] for index in range(3)] == ["succeeded", "failed", "succeeded"]
    assert rows[1]["error_code"] == "invalid_input"
    assert rows[1]["error_message"] == "line 2 is not valid utf-8 (see --encoding)"
    args = ["--urls-file", str(urls), "--output", str(output), "--resume"]
    status, stderr = await finish(await start_client(service, *args))
    assert status == 1 and "3 rows" in stderr and "Traceback" not in stderr, stderr
