"""Optional API keys: with keys configured, every endpoint but the probes and docs needs one.

A request proves itself with `Authorization: Bearer <key>`. The key is compared in constant
time against every configured key, and only a short hash of it (the task owner id) is
kept on the request, so the key itself is never stored with a task or logged.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web
from aiohttp.typedefs import Middleware

from service.api.errors import ApiError, Handler
from service.api.openapi import description_of

OWNER = web.RequestKey("owner", str)


def is_public(request: web.Request) -> bool:
    """Probes and the API docs carry no credentials: their handlers are described `public`
    (see `service.api.openapi.documented`), and Swagger UI's static files are public too."""
    route = request.match_info.route
    description = description_of(route.handler)
    return bool(description and description.public) or isinstance(route.resource, web.StaticResource)


def owner_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def request_owner(request: web.Request) -> str | None:
    """Who the request acts for: the key's owner id, or None when keys are off."""
    return request.get(OWNER)


def auth_middleware(keys: list[str]) -> Middleware:
    encoded = [key.encode() for key in keys]

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_public(request):
            return await handler(request)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        candidate = presented.strip().encode()
        matched = None
        for key in encoded:  # no early exit: every key is compared, in constant time
            if hmac.compare_digest(candidate, key):
                matched = key
        if scheme.lower() != "bearer" or matched is None:
            raise ApiError(
                401,
                "unauthorized",
                "a valid API key is required: Authorization: Bearer <key>",
                headers={"WWW-Authenticate": 'Bearer realm="image-classification"'},
            )
        request[OWNER] = owner_id(matched.decode())
        return await handler(request)

    return check_api_key
