"""Typed keys for the state an application holds (see `service.app.create_app`)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from service.dispatcher import Dispatcher
from service.metrics import Metrics
from service.pool import InferencePool
from service.registry import TaskRegistry
from service.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", TaskRegistry)
POOL = web.AppKey("pool", InferencePool)
SESSION = web.AppKey("session", aiohttp.ClientSession)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
METRICS = web.AppKey("metrics", Metrics)
