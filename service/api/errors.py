"""One place that turns every failure of a request into a JSON error body.

Handlers raise `ApiError` (or let aiohttp raise its HTTP exceptions); the middleware renders
`{"error": {"code", "message", "details"}}` with the fitting status. Unexpected exceptions
become a logged 500 without internals in the body.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from service.api.schemas import ErrorBody, ErrorDetail
from service.sizes import readable
from service.tasks.registry import StoreUnavailable

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RETRY_AFTER_SECONDS = 5
# What every operation that reads or writes the task store declares (`service.api.openapi`).
STORE_UNAVAILABLE = {503: "store_unavailable: the task store cannot write or be reached now (see Retry-After)"}

# Codes for the HTTP errors aiohttp raises itself (unknown route, wrong method, ...).
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: object | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def too_busy(message: str, code: str = "too_busy", details: object | None = None) -> ApiError:
    """429: the service (or the caller's share of it: `key_quota_exceeded`) is full for now;
    the client should retry after a pause."""
    return ApiError(429, code, message, details=details, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def error_json(code: str, message: str, details: object | None = None) -> str:
    """The body of every error answer: `{"error": {"code", "message", "details"}}`."""
    return ErrorBody(error=ErrorDetail(code=code, message=message, details=details)).model_dump_json()


def error_response(
    status: int, code: str, message: str, details: object | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(text=error_json(code, message, details), status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
    except StoreUnavailable as exc:
        log.warning("%s %s: %s", request.method, request.path, exc)
        return error_response(
            503,
            "store_unavailable",
            "the task store cannot write or be reached right now; retry after the Retry-After seconds",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    except ConnectionResetError:
        # The client left, or was closed for sending its body too slowly: no one to answer.
        log.info("%s %s: the client's connection closed before the request was read", request.method, request.path)
        return error_response(400, "connection_lost", "the connection closed before the request was read")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason
        if exc.status == 413:  # aiohttp's own, over client_max_size
            message = f"the request body is larger than {readable(request.client_max_size)} (--max-request-bytes)"
        return error_response(exc.status, code, message, headers=headers)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal server error")
