"""From a request to a validated model, or to an ApiError with a stable code per problem.

pydantic does the validation; this module maps its error types to the API's error codes, for
bodies (`submit_error_code`) and for queries (`query_error_code`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from service.api.errors import ApiError

JSON = "application/json"
MULTIPART = "multipart/form-data"
M = TypeVar("M", bound=BaseModel)
ErrorCodeOf = Callable[[tuple[int | str, ...], str], str]

# pydantic's error types -> our error codes: first by (top-level field, type), then by type.
_FIELD_CODES = {
    ("urls", "too_long"): "too_many_urls",
    ("urls", "too_short"): "empty_urls",
    ("urls", "string_pattern_mismatch"): "invalid_url",
    ("urls", "string_too_long"): "invalid_url",
    ("urls", "invalid_url"): "invalid_url",
    ("callback_url", "string_pattern_mismatch"): "invalid_callback_url",
    ("callback_url", "string_too_long"): "invalid_callback_url",
    ("callback_url", "invalid_url"): "invalid_callback_url",
    ("callback_url", "address_refused"): "callback_url_refused",
    ("urls", "address_refused"): "invalid_url",
    ("top_k", "greater_than_equal"): "top_k_out_of_range",
    ("top_k", "less_than_equal"): "top_k_out_of_range",
    ("priority", "enum"): "invalid_priority",
}
# Messages for what pydantic would explain in its own terms (a URL field's regular expression).
_MESSAGES = {
    "string_pattern_mismatch": "not an absolute http(s) URL with a host (without credentials, spaces or control "
    "characters)",
}
_TYPE_CODES = {"missing": "missing_field", "extra_forbidden": "unknown_field"}
_QUERY_CODES = {
    "status": "invalid_status",
    "priority": "invalid_priority",
    "limit": "invalid_limit",
    "cursor": "invalid_cursor",
    "wait": "invalid_wait",
    "done": "invalid_done",
    "format": "invalid_format",
}


async def read_json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != JSON:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the body must be JSON (Content-Type: application/json) or a form ({MULTIPART})",
        )
    raw = await request.read()  # over client_max_size: aiohttp raises 413, rendered by the middleware
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # the decoder's own depth limit (about 1,000 levels here)
        raise ApiError(400, "invalid_json", "the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    return body


def validate(model: type[M], data: Mapping[str, Any], code_of: ErrorCodeOf) -> M:
    """`data` as `model`, or ApiError(400) listing every problem (`code` is the first one's)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            {
                "field": ".".join(str(part) for part in error["loc"]),
                "code": code_of(error["loc"], error["type"]),
                "message": _MESSAGES.get(error["type"], error["msg"]),
            }
            for error in exc.errors(include_url=False, include_input=False)
        ]
        first = problems[0]
        raise ApiError(400, first["code"], f"{first['field']}: {first['message']}", details=problems) from None


def submit_error_code(loc: tuple[int | str, ...], error_type: str) -> str:
    field = str(loc[0]) if loc else ""
    if (field, error_type) in _FIELD_CODES:
        return _FIELD_CODES[(field, error_type)]
    if error_type in _TYPE_CODES:
        return _TYPE_CODES[error_type]
    if error_type.endswith(("_type", "_parsing")):
        return "invalid_type"
    return "invalid_field"


def query_error_code(loc: tuple[int | str, ...], error_type: str) -> str:
    if error_type == "extra_forbidden":
        return "unknown_parameter"
    return _QUERY_CODES.get(str(loc[0]) if loc else "", "invalid_parameter")
