"""Reading POST /submit as multipart/form-data: image files and URLs, one per part.

An upload gets the limits a download gets (`--max-image-bytes` per image, `--max-urls-per-task`
items per task), and its bytes are reserved in the service-wide upload budget
(`service.tasks.uploads`) as they arrive. Parts are streamed a chunk at a time, so an
oversized file is refused without being buffered whole. Everything else counts too, while it
streams: the parts (the items, the text fields and a few empty file inputs at most) and the
text bytes (at most `--max-request-bytes`, what a JSON body may hold).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from service.api.errors import ApiError, too_busy
from service.sizes import readable
from service.tasks.uploads import Upload, UploadBudget

CHUNK_BYTES = 64 * 1024
MAX_TEXT_BYTES = 64 * 1024  # one text part: a URL, top_k, model, callback_url or priority
MAX_FILENAME_CHARS = 255
SPARE_PARTS = 16  # parts beyond the items: the text fields and empty file inputs
FILES = "files"
TEXT_FIELDS = ("urls", "top_k", "model", "callback_url", "priority")


@dataclass
class UploadForm:
    """A multipart /submit as sent: URLs and files in part order, top_k and model as text."""

    sources: list[str | Upload] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    size: int = 0  # bytes reserved from the budget for this form
    parts: int = 0
    text_bytes: int = 0

    def values(self) -> dict[str, Any]:
        """The form as `SubmitForm` validates it."""
        return {
            FILES: [source.data for source in self.sources if isinstance(source, Upload)],
            "urls": [source for source in self.sources if isinstance(source, str)],
            **self.fields,
        }

    def item_urls(self) -> list[str]:
        return [source.url if isinstance(source, Upload) else source for source in self.sources]

    def files(self) -> dict[int, bytes]:
        """The uploaded files' bytes, by the index of their item."""
        return {index: source.data for index, source in enumerate(self.sources) if isinstance(source, Upload)}


async def read_form(
    request: web.Request, max_items: int, max_image_bytes: int, max_text_bytes: int, budget: UploadBudget
) -> UploadForm:
    """The form, with its files' bytes reserved in `budget`; or ApiError, with nothing reserved."""
    if request.content_length is not None and request.content_length > budget.limit + max_text_bytes:
        raise _too_large(budget)
    form = UploadForm()
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "invalid_multipart", "nested multipart bodies are not supported")
            form.parts += 1
            if form.parts > max_items + SPARE_PARTS:
                raise ApiError(400, "too_many_parts", f"a form holds at most {max_items + SPARE_PARTS} parts")
            await _read_part(part, form, max_items, max_image_bytes, max_text_bytes, budget)
            await asyncio.sleep(0)  # parts already buffered would otherwise be read without a pause
    except (ValueError, LookupError, BadHttpMessage) as exc:  # what aiohttp raises on a malformed body
        budget.release(form.size)
        raise ApiError(400, "invalid_multipart", f"the multipart body is malformed: {exc}") from None
    except BaseException:
        budget.release(form.size)
        raise
    return form


async def _read_part(
    part: BodyPartReader,
    form: UploadForm,
    max_items: int,
    max_image_bytes: int,
    max_text_bytes: int,
    budget: UploadBudget,
) -> None:
    name = part.name or ""
    if name == FILES:
        if part.filename is None:  # a text field, not a file
            raise ApiError(
                400, "invalid_type", f"{FILES}: each part must be a file (with a filename)", details=[{"field": FILES}]
            )
        data = await _read_file(part, form, max_image_bytes, budget)
        if not data and not part.filename:
            return  # what a browser sends for a file input left empty
        form.sources.append(Upload(_clean_filename(part.filename), data))
    elif name == "urls":
        form.sources.append(await _read_text(part, form, max_text_bytes))
    elif name in TEXT_FIELDS:
        if name in form.fields:
            raise ApiError(400, "invalid_field", f"{name}: given more than once", details=[{"field": name}])
        form.fields[name] = await _read_text(part, form, max_text_bytes)
    else:
        raise ApiError(
            400,
            "unknown_field",
            f"unknown form field {name!r}; expected {FILES}, {', '.join(TEXT_FIELDS)}",
            details=[{"field": name}],
        )
    if len(form.sources) > max_items:
        raise ApiError(400, "too_many_images", f"a task holds at most {max_items} images (files and URLs)")


async def _read_file(part: BodyPartReader, form: UploadForm, max_image_bytes: int, budget: UploadBudget) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK_BYTES):
        data += chunk
        if len(data) > max_image_bytes:
            raise ApiError(
                413,
                "upload_too_large",
                f"{part.filename or 'a file'}: larger than {readable(max_image_bytes)} (--max-image-bytes)",
                details=[{"field": FILES, "filename": part.filename}],
            )
        if not budget.reserve(len(chunk)):
            if form.size + len(chunk) > budget.limit:
                raise _too_large(budget)
            raise too_busy("the service holds too many uploaded images right now; retry later")
        form.size += len(chunk)
    return bytes(data)


async def _read_text(part: BodyPartReader, form: UploadForm, max_text_bytes: int) -> str:
    raw = bytearray()
    while chunk := await part.read_chunk(CHUNK_BYTES):
        raw += chunk
        form.text_bytes += len(chunk)
        if len(raw) > MAX_TEXT_BYTES:
            raise ApiError(400, "field_too_large", f"{part.name}: longer than {MAX_TEXT_BYTES} bytes")
        if form.text_bytes > max_text_bytes:
            raise ApiError(
                413,
                "request_too_large",
                f"the form's text parts exceed {readable(max_text_bytes)} in all (--max-request-bytes)",
            )
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_field", f"{part.name}: not UTF-8 text", details=[{"field": part.name}]) from None


def _clean_filename(filename: str | None) -> str:
    """The base name only (some clients send a path), as text that can be stored and served
    (bytes that are not UTF-8 become U+FFFD, control characters "_"), not endlessly long."""
    # aiohttp hands over a header's bytes that are not UTF-8 as lone surrogates: undo that.
    text = (filename or "").encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    name = PurePosixPath(text.replace("\\", "/")).name
    name = "".join(char if char.isprintable() else "_" for char in name)
    return name[:MAX_FILENAME_CHARS] or "unnamed"


def _too_large(budget: UploadBudget) -> ApiError:
    return ApiError(
        413, "request_too_large", f"uploads are limited to {readable(budget.limit)} in all (--max-upload-bytes)"
    )
