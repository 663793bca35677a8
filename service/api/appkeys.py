"""Typed keys for the state an application holds (see `service.app.create_app`)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from service.api.connections import Connections
from service.api.idempotency import KeyLocks
from service.api.schemas import SubmitForm, SubmitRequest
from service.backend import Backend
from service.metrics import Metrics
from service.pool import InferencePool
from service.pool.catalog import ModelCatalog
from service.settings import Settings
from service.tasks.engine import TaskEngine
from service.tasks.registry import TaskRegistry
from service.tasks.uploads import UploadBudget
from service.webhooks.sender import WebhookSender

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", TaskRegistry)
ENGINE = web.AppKey("engine", TaskEngine)
BACKEND = web.AppKey("backend", Backend)
POOL = web.AppKey("pool", InferencePool)
CATALOG = web.AppKey("catalog", ModelCatalog)
METRICS = web.AppKey("metrics", Metrics)
SUBMIT_REQUEST: web.AppKey[type[SubmitRequest]] = web.AppKey("submit_request")  # bound to this app's limits
SUBMIT_FORM: web.AppKey[type[SubmitForm]] = web.AppKey("submit_form")  # the same, for multipart uploads
UPLOAD_BUDGET = web.AppKey("upload_budget", UploadBudget)
OPENAPI = web.AppKey("openapi", bytes)
CLOSING = web.AppKey("closing", asyncio.Event)  # set when shutdown begins: watchers answer at once
CONNECTIONS = web.AppKey("connections", Connections)  # the client connections' bound and deadlines
WEBHOOKS = web.AppKey("webhooks", WebhookSender)  # only with --webhook-secret
SUBMIT_KEYS = web.AppKey("submit_keys", KeyLocks)  # one submit at a time per idempotency key
