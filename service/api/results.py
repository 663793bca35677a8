"""A task's results as a file: `GET /tasks/<id>/results?format=csv|jsonl`.

One row per image in input order, with the columns of the command-line client's `--output`
(`client.results`), so that a file downloaded from the page, fetched with `ics --task ID
--output F`, or written by a bulk job reads the same. The rows are streamed out a block at a
time rather than built as one body: a 1,000-image task is about 300 KB of CSV.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from service.api.appkeys import REGISTRY
from service.api.auth import request_owner
from service.api.errors import STORE_UNAVAILABLE
from service.api.openapi import Reply, documented
from service.api.schemas import ResultsQuery
from service.api.tasks import TASK_NOT_FOUND, task_id_of, task_not_found
from service.api.validation import query_error_code, validate
from service.tasks.records import Item

routes = web.RouteTableDef()

# The same columns, in the same order, as the client's results files (tested against them).
COLUMNS = ["index", "input", "status", "label", "score", "labels", "error_code", "error_message", "task_id"]
ROWS_PER_WRITE = 200
MEDIA_TYPES = {"csv": "text/csv", "jsonl": "application/jsonl"}


@routes.get("/tasks/{task_id}/results")
@documented(
    summary="The task's results as a file: one row per image, in input order (CSV or JSON Lines)",
    query=ResultsQuery,
    replies={
        200: Reply(
            "One row per image with the columns " + ", ".join(f"`{column}`" for column in COLUMNS) + " (`labels` "
            "is a JSON list of `{label, score}`; `label` and `score` are the top one's), as the command-line "
            "client's `--output` writes them. An unfinished task's rows show each image's status so far.",
            media_type=MEDIA_TYPES["csv"],
            more_media_types=(MEDIA_TYPES["jsonl"],),
            headers={"Content-Disposition": 'attachment; filename="task-<id>.csv" (or .jsonl)'},
        )
    },
    errors={**TASK_NOT_FOUND, 400: "unknown_parameter, invalid_format", **STORE_UNAVAILABLE},
)
async def task_results(request: web.Request) -> web.StreamResponse:
    query = validate(ResultsQuery, request.query, query_error_code)
    task = await request.app[REGISTRY].get(task_id_of(request), request_owner(request))
    if task is None:
        raise task_not_found(request)
    response = web.StreamResponse(
        headers={"Content-Disposition": f'attachment; filename="task-{task.task_id}.{query.format}"'}
    )
    response.content_type = MEDIA_TYPES[query.format]
    response.charset = "utf-8"
    await response.prepare(request)
    render = _csv_lines if query.format == "csv" else _json_lines
    for start in range(0, max(len(task.items), 1), ROWS_PER_WRITE):
        rows = (row(item, task.task_id) for item in task.items[start : start + ROWS_PER_WRITE])
        await response.write(render(rows, header=start == 0).encode())
    await response.write_eof()
    return response


def row(item: Item, task_id: str) -> dict[str, Any]:
    labels = [{"label": label.label, "score": label.score} for label in item.labels or []]
    return {
        "index": item.index,
        "input": item.url,
        "status": item.status.value,
        "label": labels[0]["label"] if labels else None,
        "score": labels[0]["score"] if labels else None,
        "labels": labels,
        "error_code": item.error.code if item.error else None,
        "error_message": item.error.message if item.error else None,
        "task_id": task_id,
    }


def _csv_lines(rows: Iterable[dict[str, Any]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS)
    if header:
        writer.writeheader()
    writer.writerows({**record, "labels": json.dumps(record["labels"])} for record in rows)
    return buffer.getvalue()


def _json_lines(rows: Iterable[dict[str, Any]], header: bool) -> str:
    return "".join(json.dumps(record) + "\n" for record in rows)
