"""A `POST /submit` read into one value, whichever way it came: a JSON body of URLs, or a
multipart form of files and URLs (`service.api.forms`). Everything after this sees only a
`TaskRequest`: the idempotency check, the admission checks and the start of the task."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from service.api import idempotency
from service.api.appkeys import SETTINGS, SUBMIT_FORM, SUBMIT_REQUEST, UPLOAD_BUDGET
from service.api.errors import ApiError
from service.api.forms import read_form
from service.api.validation import MULTIPART, read_json_object, submit_error_code, validate
from service.tasks.idempotency import IdempotencyKey
from service.tasks.records import Priority


@dataclass(frozen=True)
class TaskRequest:
    """What the task would be, as the client asked for it (defaults not applied yet)."""

    urls: list[str]  # one per item: the image URL, or `upload:<file name>` for an uploaded file
    files: dict[int, bytes]  # the uploaded files' bytes, by item index
    top_k: int | None
    model: str | None
    callback_url: str | None
    priority: Priority | None
    reserved: int = 0  # upload bytes reserved in the budget for `files`, until a task takes them

    def idempotency_key(self, key: str | None) -> IdempotencyKey | None:
        """The request's `Idempotency-Key` with the fingerprint of this request, if it has one."""
        if key is None:
            return None
        digest = idempotency.fingerprint(
            self.urls, self.files, self.model, self.top_k, self.callback_url, self.priority
        )
        return IdempotencyKey(key, digest)


async def read_task_request(request: web.Request) -> TaskRequest:
    """The request's body, validated; a form's files are reserved in the upload budget (and
    released again if it is refused here). ApiError(400/413/415) for a body that is not one."""
    app = request.app
    if request.content_type != MULTIPART:
        body = validate(app[SUBMIT_REQUEST], await read_json_object(request), submit_error_code)
        return TaskRequest(body.urls, {}, body.top_k, body.model, body.callback_url, body.priority)
    settings, budget = app[SETTINGS], app[UPLOAD_BUDGET]
    form = await read_form(
        request, settings.max_urls_per_task, settings.max_image_bytes, settings.max_request_bytes, budget
    )
    try:
        fields = validate(app[SUBMIT_FORM], form.values(), submit_error_code)
        if not form.sources:
            raise ApiError(400, "no_images", "the form holds no files and no urls")
    except BaseException:
        budget.release(form.size)
        raise
    return TaskRequest(
        form.item_urls(), form.files(), fields.top_k, fields.model, fields.callback_url, fields.priority, form.size
    )
