"""The task database's schema, and the upgrade of a database an older version wrote.

Tables: `tasks` (one row per task; a final one keeps its snapshot as JSON), `items` (the items
of active tasks), `submissions` (idempotency keys) and `deliveries` (webhooks not yet
delivered or given up). `PRAGMA user_version` holds the schema version.
"""

from __future__ import annotations

import json
import sqlite3

from service.tasks.records import TaskDetail

SCHEMA_VERSION = 4  # 2: tasks.precision; 3: tasks.webhook, submissions, deliveries; 4: tasks.priority

SCHEMA = """
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL UNIQUE,
    owner TEXT,
    model TEXT NOT NULL,
    precision TEXT NOT NULL DEFAULT 'fp32',
    priority TEXT NOT NULL DEFAULT 'interactive',
    top_k INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    finished_epoch REAL,
    error TEXT,
    total INTEGER NOT NULL,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    completed TEXT,
    snapshot BLOB,
    webhook TEXT
);
CREATE INDEX tasks_by_owner ON tasks (owner, seq);
CREATE INDEX tasks_by_owner_status ON tasks (owner, status, seq);
CREATE INDEX tasks_by_finish ON tasks (finished_epoch) WHERE finished_epoch IS NOT NULL;
CREATE TABLE items (
    task_seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    url TEXT NOT NULL,
    status TEXT NOT NULL,
    labels TEXT,
    error TEXT,
    done_order INTEGER,
    PRIMARY KEY (task_seq, idx)
) WITHOUT ROWID;
"""
# Added by schema 3: idempotency keys (`service.tasks.idempotency`) and pending webhook deliveries.
SCHEMA_3_TABLES = (
    """
CREATE TABLE submissions (
    owner TEXT NOT NULL,  -- '' without API keys
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    task_id TEXT NOT NULL,
    total INTEGER NOT NULL,
    created_epoch REAL NOT NULL,
    PRIMARY KEY (owner, key)
) WITHOUT ROWID;
""",
    "CREATE INDEX submissions_by_age ON submissions (created_epoch)",
    """
CREATE TABLE deliveries (
    delivery_id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    finished_epoch REAL NOT NULL,
    attempts INTEGER NOT NULL,
    next_epoch REAL NOT NULL
) WITHOUT ROWID
""",
)


def create(connection: sqlite3.Connection) -> None:
    """The tables of an empty database, at the current version."""
    connection.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table exists
    connection.executescript(SCHEMA)
    for statement in SCHEMA_3_TABLES:
        connection.execute(statement)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def upgrade(connection: sqlite3.Connection, version: int) -> None:
    """Bring a database written by an older version up to SCHEMA_VERSION, in one transaction."""
    with connection:
        if version < 2:  # every task so far ran in fp32; finished ones keep their snapshot, which gains the field
            connection.execute("ALTER TABLE tasks ADD COLUMN precision TEXT NOT NULL DEFAULT 'fp32'")
            _add_to_snapshots(connection, {"precision": "fp32"})
        if version < 3:  # no task had a webhook or an idempotency key
            connection.execute("ALTER TABLE tasks ADD COLUMN webhook TEXT")
            for statement in SCHEMA_3_TABLES:
                connection.execute(statement)
        if version < 4:  # every task so far was interactive; finished ones' snapshots gain the field
            connection.execute("ALTER TABLE tasks ADD COLUMN priority TEXT NOT NULL DEFAULT 'interactive'")
            _add_to_snapshots(connection, {"priority": "interactive"})
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _add_to_snapshots(connection: sqlite3.Connection, fields: dict[str, str]) -> None:
    """A field new in this version, with the value every older task had, into the snapshots
    that finished tasks keep (served as they are stored)."""
    finished = connection.execute("SELECT seq, snapshot FROM tasks WHERE snapshot IS NOT NULL").fetchall()
    for seq, snapshot in finished:
        detail = TaskDetail.model_validate({**json.loads(snapshot), **fields})
        connection.execute("UPDATE tasks SET snapshot = ? WHERE seq = ?", (detail.model_dump_json().encode(), seq))
