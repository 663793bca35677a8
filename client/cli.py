"""Command-line client: `ics IMAGE...` or `python -m client IMAGE...` (`--help` for the options).

Submits image URLs and local files (a directory means the images in it), follows the task's
event stream with a progress bar, then prints a results table, or the task as JSON with
`--json`. Ctrl-C stops watching; with `--cancel` it also cancels the task. `--task ID`
does the same for a task submitted earlier (`--output F` writes its results file,
`--cancel` cancels it at once). A bulk job (a
URLs file, `-r`, `--output`, or more images than one task holds) runs through
`client.bulk` instead: many tasks at batch priority (unless `--priority` says otherwise), one
row per input, resumable. A busy service
(429) is asked again after its Retry-After, a lost connection after a pause, both under one
idempotency key, so a retried submit never makes a second task.

Exit status: 0 every image was classified; 1 some image failed or was cancelled; 2 the
service refused the request or could not be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from tqdm import tqdm

from client import __version__
from client.api import (
    ClientError,
    Inputs,
    cancel_task,
    download_results,
    get_task,
    submit,
    task_limit,
    watch,
)
from client.bulk import BulkJob, Options
from client.inputs import InputError, Source, is_url, sources
from client.manifest import Manifest
from client.results import ResultsFile

DEFAULT_SERVER = "http://127.0.0.1:8080"
LABELS_SHOWN = 3

OK, SOME_FAILED, REFUSED, INTERRUPTED = 0, 1, 2, 130
FINAL = ("completed", "failed", "cancelled")


def parse_args(argv: Sequence[str] | None, env: dict[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ics",
        description="Classify images with the service: URLs or local files, with a live progress bar.",
        epilog="Exit status: 0 all classified, 1 some image failed or was cancelled, 2 refused or unreachable, "
        "130 interrupted.",
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="an http(s) URL, an image file, or a directory")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--task",
        metavar="ID",
        help="a task submitted earlier: follow it to its end and show it; with --output, write its results file; "
        "with --cancel, cancel it now",
    )
    parser.add_argument(
        "--server",
        default=env.get("ICS_SERVER", DEFAULT_SERVER),
        help="the service's base URL [env ICS_SERVER] (default: %(default)s)",
    )
    parser.add_argument("--model", help="model name (default: the service's default)")
    parser.add_argument("--top-k", type=int, help="labels per image (default: the service's default)")
    parser.add_argument(
        "--callback-url", help="have the service POST the task's summary to this URL when it ends (a webhook)"
    )
    parser.add_argument(
        "--priority",
        choices=["interactive", "batch"],
        help="interactive work goes first, batch work runs in the capacity it leaves (default: interactive; batch "
        "for bulk jobs)",
    )
    parser.add_argument("--json", action="store_true", help="print the finished task as JSON instead of a table")
    parser.add_argument(
        "--cancel",
        action="store_true",
        help="on Ctrl-C, cancel the task (default: leave it running); with --task, cancel that task now",
    )
    bulk = parser.add_argument_group("bulk jobs", "many tasks, one results row per input, resumable")
    bulk.add_argument("--urls-file", metavar="FILE", help="image URLs, one per line, or a CSV column; - for stdin")
    bulk.add_argument("--url-column", metavar="NAME", help="the URL column of a CSV --urls-file (default: url)")
    bulk.add_argument(
        "--encoding",
        default="utf-8",
        help="the text encoding of --urls-file (default: %(default)s; a byte-order mark is dropped)",
    )
    bulk.add_argument("-r", "--recursive", action="store_true", help="walk directories to the bottom")
    bulk.add_argument(
        "--output", metavar="FILE", help="write one row per input as results arrive: .csv, or JSON Lines otherwise"
    )
    bulk.add_argument(
        "--resume", action="store_true", help="finish the job of an earlier run that wrote --output (same inputs)"
    )
    bulk.add_argument("--concurrency", type=int, default=4, help="tasks in flight at once (default: %(default)s)")
    args = parser.parse_args(argv)
    if not is_url(args.server) or not urlsplit(args.server).netloc:
        parser.error(f"--server {args.server}: give the service's URL with its scheme, e.g. http://127.0.0.1:8080")
    if args.task is not None:
        if args.images or args.urls_file or args.resume or args.recursive:
            parser.error("--task reads a task submitted earlier: give no IMAGE, --urls-file, -r or --resume with it")
        if args.output and args.cancel:
            parser.error("--task with --output writes the results of a task; --cancel cancels one: give one of them")
    elif not args.images and not args.urls_file:
        parser.error("give at least one IMAGE or --urls-file (or --task ID)")
    if args.resume and not args.output:
        parser.error("--resume needs --output, the results file of the job to finish")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    try:
        codecs.lookup(args.encoding)
    except LookupError:
        parser.error(f"--encoding {args.encoding}: not an encoding Python knows (e.g. utf-8, latin-1, cp1252)")
    args.api_key = env.get("ICS_API_KEY", "")  # not a flag: flags show in `ps`
    return args


def split_inputs(images: Sequence[str]) -> Inputs:
    """URLs stay URLs; a directory stands for the image files directly inside it."""
    urls: list[str] = []
    files: list[Path] = []
    try:
        for source in sources(images, None, None, recursive=False):
            if source.is_url:
                urls.append(source.value)
            else:
                files.append(Path(source.value))
    except InputError as exc:
        raise ClientError(str(exc)) from None
    if not urls and not files:
        raise ClientError("no images to classify")
    return Inputs(urls, files)


def exit_status(task: dict[str, Any]) -> int:
    progress = task["progress"]
    return OK if task["status"] == "completed" and progress["succeeded"] == progress["total"] else SOME_FAILED


def results_table(task: dict[str, Any]) -> str:
    rows = [("#", "image", "status", "labels")]
    for item in task["items"]:
        if item["labels"]:
            result = ", ".join(f"{label['label']} ({label['score']:.3f})" for label in item["labels"][:LABELS_SHOWN])
        elif item["error"]:
            result = f"{item['error']['code']}: {item['error']['message']}"
        else:
            result = ""
        rows.append((str(item["index"]), _shorten(item["url"], 60), item["status"], result))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    ]
    progress = task["progress"]
    summary = (
        f"task {task['task_id']} {task['status']}: {progress['succeeded']} classified, "
        f"{progress['failed']} failed, {progress['cancelled']} cancelled"
    )
    if task.get("error"):
        summary += f" ({task['error']['code']}: {task['error']['message']})"
    return "\n".join([*lines, summary])


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


async def run(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
    base = args.server.rstrip("/") + "/"
    # Idle connections closed well before the service's keep-alive timeout (15 s by default),
    # so no request goes out on a connection the service is closing.
    connector = aiohttp.TCPConnector(keepalive_timeout=5)
    async with aiohttp.ClientSession(base_url=base, headers=headers, timeout=timeout, connector=connector) as session:
        if args.task is not None:
            return await run_task(args, session)
        if args.urls_file or args.recursive or args.output:
            return await run_bulk(args, session)
        inputs = split_inputs(args.images)
        total = len(inputs.urls) + len(inputs.files)
        if total > await task_limit(session):
            print(f"{total} images: more than one task holds, so one row per image follows", file=sys.stderr)
            return await run_bulk(args, session)
        task_id = await submit(
            session, inputs, args.model, args.top_k, args.callback_url, tell=_tell, priority=args.priority
        )
        task = await follow_to_end(args, session, task_id, total)
        if task is None:
            return INTERRUPTED
    print(json.dumps(task, indent=2) if args.json else results_table(task))
    return exit_status(task)


async def follow_to_end(
    args: argparse.Namespace, session: aiohttp.ClientSession, task_id: str, total: int, done: int = 0
) -> dict[str, Any] | None:
    """The task once it has ended, watched on a progress bar; None if Ctrl-C stopped the
    watching (and, with --cancel, the task)."""
    try:
        with tqdm(total=total, initial=done, unit="img", desc=f"task {task_id[:8]}", file=sys.stderr) as bar:
            await watch(session, task_id, bar, skip=done)
    except asyncio.CancelledError:  # Ctrl-C
        if args.cancel:
            task = await cancel_task(session, task_id)
            print(
                f"cancelled task {task_id}: {task['progress']['succeeded']} of {total} images were classified",
                file=sys.stderr,
            )
        else:
            print(f"stopped watching; task {task_id} goes on (ics --task {task_id})", file=sys.stderr)
        return None
    return await get_task(session, task_id)


async def run_task(args: argparse.Namespace, session: aiohttp.ClientSession) -> int:
    """`--task ID`: cancel it (--cancel), or follow it to its end, then show it or write its
    results file (--output)."""
    if args.cancel:
        task = await cancel_task(session, args.task)
    else:
        task = await get_task(session, args.task)
        if task["status"] not in FINAL:
            progress = task["progress"]
            followed = await follow_to_end(args, session, args.task, progress["total"], progress["done"])
            if followed is None:
                return INTERRUPTED
            task = followed
    if args.output:
        output = None if args.output == "-" else Path(args.output)
        await download_results(session, args.task, output, csv=args.output.lower().endswith(".csv"))
        if output is not None:
            print(f"{task['progress']['total']} rows in {output}", file=sys.stderr)
    else:
        print(json.dumps(task, indent=2) if args.json else results_table(task))
    return exit_status(task)


async def run_bulk(args: argparse.Namespace, session: aiohttp.ClientSession) -> int:
    """Every input through as many tasks as it takes, one row each (see `client.bulk`)."""
    output = Path(args.output) if args.output and args.output != "-" else None
    if output is not None and not args.resume and output.exists() and output.stat().st_size > 0:
        raise ClientError(f"{output} exists: add --resume to finish its job, or remove it to start again")

    def listed() -> Iterator[Source]:
        return sources(args.images, args.urls_file, args.url_column, args.recursive, args.encoding)

    try:
        total = None if args.urls_file == "-" else sum(1 for _ in listed())  # standard input is read once
    except InputError as exc:
        raise ClientError(str(exc)) from None
    limit = await task_limit(session)
    results = ResultsFile(output, args.resume)
    manifest = Manifest.open(output.with_name(output.name + ".manifest") if output else None, args.resume)
    options = Options(args.model, args.top_k, args.callback_url, args.concurrency, args.priority or "batch")
    complete = False
    with tqdm(total=total, unit="img", desc="job", file=sys.stderr, dynamic_ncols=True) as bar:
        job = BulkJob(session, options, results, manifest, bar, _tell)
        try:
            counts = await job.run(listed(), limit)
            complete = True
        except asyncio.CancelledError:  # Ctrl-C
            bar.close()
            if args.cancel:
                print(f"cancelled {await job.cancel_in_flight()} tasks in flight", file=sys.stderr)
            where = "; run it again with --resume to finish" if output else ""
            print(f"stopped after {job.counts.rows} rows{where}", file=sys.stderr)
            return INTERRUPTED
        finally:
            results.close()
            manifest.close(complete)
    failed = results.failed_before + counts.failed
    seconds = time.monotonic() - counts.started
    rate = counts.rows / seconds if seconds > 0 else 0.0
    print(
        f"{results.written.count} rows{f' in {output}' if output else ''}: "
        f"{results.written.count - failed} classified, {failed} failed or cancelled; "
        f"this run {counts.rows} in {seconds:.1f} s ({rate:.1f} images/s)",
        file=sys.stderr,
    )
    return OK if failed == 0 else SOME_FAILED


def _tell(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, dict(os.environ))
    try:
        return asyncio.run(run(args))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return REFUSED
    except aiohttp.ClientError as exc:
        print(f"error: could not reach the service at {args.server}: {exc}", file=sys.stderr)
        return REFUSED
    except KeyboardInterrupt:  # before the task existed
        return INTERRUPTED
