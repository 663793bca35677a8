"""Typed keys for the state an application holds (see `service.app.create_app`)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from service.catalog import ModelCatalog
from service.dispatcher import Dispatcher
from service.metrics import Metrics
from service.pool import InferencePool
from service.registry import TaskRegistry
from service.schemas import SubmitForm, SubmitRequest
from service.settings import Settings
from service.uploads import UploadBudget

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", TaskRegistry)
POOL = web.AppKey("pool", InferencePool)
SESSION = web.AppKey("session", aiohttp.ClientSession)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
METRICS = web.AppKey("metrics", Metrics)
CATALOG = web.AppKey("catalog", ModelCatalog)
SUBMIT_REQUEST = web.AppKey("submit_request", type[SubmitRequest])  # bound to this app's limits
SUBMIT_FORM = web.AppKey("submit_form", type[SubmitForm])  # the same, for multipart uploads
UPLOAD_BUDGET = web.AppKey("upload_budget", UploadBudget)
OPENAPI = web.AppKey("openapi", bytes)
