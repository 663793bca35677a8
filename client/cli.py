"""Command-line client: `ics IMAGE...` or `python -m client IMAGE...` (`--help` for the options).

Submits image URLs and local files (a directory means the images in it), follows the task's
event stream with a progress bar, then prints a results table, or the task as JSON with
`--json`. Ctrl-C stops watching; with `--cancel` it also cancels the task. A busy service
(429) is asked again after its Retry-After, a lost connection after a pause, both under one
idempotency key, so a retried submit never makes a second task.

Exit status: 0 every image was classified; 1 some image failed or was cancelled; 2 the
service refused the request or could not be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from client.api import ClientError, Inputs, cancel_task, get_task, submit, watch

DEFAULT_SERVER = "http://127.0.0.1:8080"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LABELS_SHOWN = 3

OK, SOME_FAILED, REFUSED, INTERRUPTED = 0, 1, 2, 130


def parse_args(argv: Sequence[str] | None, env: dict[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ics",
        description="Classify images with the service: URLs or local files, with a live progress bar.",
        epilog="Exit status: 0 all classified, 1 some image failed or was cancelled, 2 refused or unreachable, "
        "130 interrupted.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="an http(s) URL, an image file, or a directory")
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
    parser.add_argument("--json", action="store_true", help="print the finished task as JSON instead of a table")
    parser.add_argument("--cancel", action="store_true", help="on Ctrl-C, cancel the task (default: leave it running)")
    args = parser.parse_args(argv)
    args.api_key = env.get("ICS_API_KEY", "")  # not a flag: flags show in `ps`
    return args


def split_inputs(images: Sequence[str]) -> Inputs:
    """URLs stay URLs; a directory stands for the image files directly inside it."""
    urls: list[str] = []
    files: list[Path] = []
    for image in images:
        if image.lower().startswith(("http://", "https://")):
            urls.append(image)
            continue
        path = Path(image)
        if path.is_dir():
            files += sorted(child for child in path.iterdir() if child.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ClientError(f"{image}: no such file, and not an http(s) URL")
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
    inputs = split_inputs(args.images)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
    base = args.server.rstrip("/") + "/"
    async with aiohttp.ClientSession(base_url=base, headers=headers, timeout=timeout) as session:
        task_id = await submit(session, inputs, args.model, args.top_k, args.callback_url, tell=_tell)
        total = len(inputs.urls) + len(inputs.files)
        try:
            with tqdm(total=total, unit="img", desc=f"task {task_id[:8]}", file=sys.stderr) as bar:
                await watch(session, task_id, bar)
        except asyncio.CancelledError:  # Ctrl-C
            if args.cancel:
                task = await cancel_task(session, task_id)
                print(
                    f"cancelled task {task_id}: {task['progress']['succeeded']} of {total} images were classified",
                    file=sys.stderr,
                )
            else:
                print(f"stopped watching; task {task_id} goes on (GET {base}tasks/{task_id})", file=sys.stderr)
            return INTERRUPTED
        task = await get_task(session, task_id)
    print(json.dumps(task, indent=2) if args.json else results_table(task))
    return exit_status(task)


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
