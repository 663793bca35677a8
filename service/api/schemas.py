"""The API's wire shapes: request bodies and queries (validation) and the response bodies
that are not task records (those are `service.tasks.records`, served as they are stored).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, create_model
from pydantic_core import PydanticCustomError

from inference.specs import RunPrecision
from service.fetch.policy import odd_numeric_host, url_host, url_problem
from service.tasks.fleet import WorkerEntry
from service.tasks.records import Priority, Progress, Record, TaskStatus, TaskSummary


class CalibrationEntry(Record):
    """What an int8 model's calibration measured on images it did not calibrate on."""

    images: int  # calibrated on
    held_out: int  # the agreement is measured on these
    source: str  # "shipped photos" or the --calibration-dir
    agreement_with_fp32: float  # share of held-out images whose top-1 is fp32's, refined as the model runs
    agreement_without_refine: float
    refined_share: float  # held-out images the refine classified again in fp32


class ModelEntry(Record):
    name: str
    source: str  # embedded | torchvision | checkpoint
    architecture: str
    input_size: int
    num_classes: int
    precision: RunPrecision  # what it runs at: bf16 only where the CPU computes it natively, int8 when asked
    refine_margin: float  # bf16/int8: images whose two best logits are closer are classified again in fp32
    calibration: CalibrationEntry | None  # int8 models, once calibrated
    default: bool
    weights_present: bool  # false: listed but unavailable until its weights are on disk


class ModelList(Record):
    default: str
    models: list[ModelEntry]


class WorkerList(Record):
    workers: list[WorkerEntry]


class Health(Record):
    status: str


class SubmitResponse(Record):
    task_id: str
    status: TaskStatus
    total: int


class ProgressEvent(Progress):
    """The data of a `progress` event: the counts, and the task's status as it is then."""

    status: TaskStatus

    @classmethod
    def of(cls, summary: TaskSummary) -> ProgressEvent:
        return cls(**dict(summary.progress), status=summary.status)


class ServerEvent(Record):
    """One Server-Sent Event of `GET /tasks/<id>/events`; the stream is a sequence of them."""

    event: Literal["progress", "item", "end", "shutdown"]
    data: Annotated[
        str,
        Field(
            description="JSON: a ProgressEvent for `progress`, an Item for `item`, a TaskSummary for `end` and "
            "`shutdown`",
            json_schema_extra={"contentMediaType": "application/json"},
        ),
    ]
    id: Annotated[str | None, Field(description="`item` events: the result's place in completion order")] = None


class ErrorDetail(Record):
    code: str
    message: str
    details: object | None = None


class ErrorBody(Record):
    error: ErrorDetail


# What the pattern can state of the refusals: an http(s) scheme, a non-empty host part without
# credentials or spaces, no control characters anywhere (`url_problem` checks the rest).
URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\x00-\x20\x7f/?#@]+([/?#][^\x00-\x1f\x7f]*)?$"


def _check_url(url: str) -> str:
    problem = url_problem(url)
    if problem:
        # An address in an odd form is refused as an address (a callback's callback_url_refused).
        raise PydanticCustomError("address_refused" if odd_numeric_host(url_host(url)) else "invalid_url", problem)
    return url


def _url_type(max_length: int | None = None) -> Any:
    """One entry of `urls`: the pattern documents the scheme, the validator checks the rest."""
    return Annotated[StrictStr, Field(pattern=URL_PATTERN, max_length=max_length), AfterValidator(_check_url)]


_URLS_DOC = "absolute http(s) URLs of the images, without user credentials; duplicates are kept"
_TOP_K_DOC = "labels per image; default: the service's default"
_PRIORITY_DOC = (
    "interactive (the default): its images go before batch work; batch: a bulk job, run in the capacity "
    "interactive work leaves. Within a priority, tasks take turns, image by image"
)
_CALLBACK_DOC = (
    "an http(s) URL that gets the task's summary, signed, when the task ends (a completion webhook); needs the "
    "service's --webhook-secret, and a host the address policy allows"
)


def _callback_type(max_length: int | None = None) -> Any:
    url = Annotated[StrictStr, Field(pattern=URL_PATTERN, max_length=max_length), AfterValidator(_check_url)]
    return Annotated[url | None, Field(description=_CALLBACK_DOC)]


class SubmitRequest(BaseModel):
    """Body of POST /submit.

    The limits that come from settings (how many URLs, how long, how large `top_k`) live in
    a subclass made by `limited`, built once per app: the same class validates requests and
    is published in the OpenAPI document, so the documented bounds are the enforced ones.
    """

    model_config = ConfigDict(extra="forbid")

    urls: Annotated[list[_url_type()], Field(min_length=1, description=_URLS_DOC)]  # type: ignore[valid-type]
    top_k: Annotated[StrictInt | None, Field(ge=1, description=_TOP_K_DOC)] = None
    model: Annotated[StrictStr | None, Field(description="a model name; default: the service's default model")] = None
    callback_url: _callback_type() = None  # type: ignore[valid-type]
    priority: Annotated[Priority | None, Field(description=_PRIORITY_DOC)] = None

    @classmethod
    def limited(cls, max_urls: int, max_url_length: int, max_top_k: int) -> type[SubmitRequest]:
        fields: dict[str, Any] = {
            "urls": (
                Annotated[
                    list[_url_type(max_url_length)],  # type: ignore[misc]
                    Field(min_length=1, max_length=max_urls, description=_URLS_DOC),
                ],
                ...,
            ),
            "top_k": (Annotated[StrictInt | None, Field(ge=1, le=max_top_k, description=_TOP_K_DOC)], None),
            "callback_url": (_callback_type(max_url_length), None),
        }
        return create_model("SubmitRequest", __base__=cls, **fields)


_FILES_DOC = "image files, one part each (any file name; the item's `url` is `upload:<file name>`)"


class SubmitForm(BaseModel):
    """The multipart/form-data body of POST /submit: files and URLs, one per part, in the order
    the items get. Bound to settings by `limited`, like `SubmitRequest`; together the files and
    URLs must number at least one and at most the URL limit."""

    model_config = ConfigDict(extra="forbid")

    files: Annotated[list[bytes], Field(description=_FILES_DOC)] = []
    urls: Annotated[list[_url_type()], Field(description=_URLS_DOC)] = []  # type: ignore[valid-type]
    top_k: Annotated[int | None, Field(ge=1, description=_TOP_K_DOC)] = None
    model: Annotated[str | None, Field(description="a model name; default: the service's default model")] = None
    callback_url: _callback_type() = None  # type: ignore[valid-type]
    priority: Annotated[Priority | None, Field(description=_PRIORITY_DOC)] = None

    @classmethod
    def limited(cls, max_items: int, max_url_length: int, max_top_k: int) -> type[SubmitForm]:
        fields: dict[str, Any] = {
            "files": (Annotated[list[bytes], Field(max_length=max_items, description=_FILES_DOC)], []),
            "urls": (
                Annotated[
                    list[_url_type(max_url_length)],  # type: ignore[misc]
                    Field(max_length=max_items, description=_URLS_DOC),
                ],
                [],
            ),
            "top_k": (Annotated[int | None, Field(ge=1, le=max_top_k, description=_TOP_K_DOC)], None),
            "callback_url": (_callback_type(max_url_length), None),
        }
        return create_model("SubmitForm", __base__=cls, **fields)


MAX_WAIT_SECONDS = 60.0


class ResultsQuery(BaseModel):
    """Query of GET /tasks/<id>/results."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["csv", "jsonl"] = Field(
        "jsonl", description="`csv` (a header row, then one row per image) or `jsonl` (JSON Lines: one object each)"
    )


class TaskQuery(BaseModel):
    """Query of GET /tasks/<id>: optionally a long poll."""

    model_config = ConfigDict(extra="forbid")

    wait: Annotated[
        float,
        Field(
            ge=0,
            le=MAX_WAIT_SECONDS,
            description="seconds to wait for a change (an item finishing, or the "
            "task reaching a final state) before answering; 0 answers at once",
        ),
    ] = 0
    done: Annotated[
        int | None,
        Field(
            ge=0,
            description="`progress.done` of the snapshot you already have: answer at once if more items "
            "are done; default: the count when the request arrives",
        ),
    ] = None


class TaskListQuery(BaseModel):
    """Query of GET /tasks."""

    model_config = ConfigDict(extra="forbid")

    status: Annotated[TaskStatus | None, Field(description="only tasks in this status")] = None
    priority: Annotated[Priority | None, Field(description="only tasks of this priority")] = None
    limit: Annotated[int, Field(ge=1, le=500, description="page size")] = 50
    cursor: Annotated[str | None, Field(description="`next_cursor` of the previous page")] = None
