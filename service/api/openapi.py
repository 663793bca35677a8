"""The OpenAPI 3.1 document, generated from the routes and the pydantic models they use.

Each handler carries its description (`@documented(...)`): the models that validate its body
and query and the models its answers are made from. `build_openapi` walks the app's router,
so a route without a description is an error at start-up, not a silent gap in the contract.
An operation's id is its handler's name; links name the operations an answer leads to.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from openapi_pydantic.v3.v3_1 import (
    Components,
    DataType,
    Header,
    Info,
    Link,
    MediaType,
    OpenAPI,
    Operation,
    Parameter,
    PathItem,
    Reference,
    RequestBody,
    Response,
    Schema,
    SecurityScheme,
)
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.api.schemas import ErrorBody
from service.api.validation import JSON, MULTIPART

REF_TEMPLATE = "#/components/schemas/{model}"
# On an event stream's media type, beside its string schema: the schema of each event (OpenAPI
# 3.2 would call it `itemSchema`; 3.1 has no field for it).
EVENT_SCHEMA = "x-event-schema"
BEARER = "apiKey"
DESCRIPTION_ATTRIBUTE = "openapi"

# A request body model, or the app key under which the app keeps its own (settings-bound) one.
BodyModel = type[BaseModel] | web.AppKey[type[BaseModel]]
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class Reply:
    """One documented answer: a JSON body shaped by `model`, or another media type."""

    description: str
    model: type[BaseModel] | None = None
    media_type: str = JSON
    more_media_types: tuple[str, ...] = ()  # the same answer in other forms (a query parameter picks one)
    headers: Mapping[str, str] = field(default_factory=dict)  # name -> description
    # link name -> id of an operation taking the `task_id` of this answer's body
    links: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestHeader:
    """An optional request header, with the constraints the handler enforces."""

    description: str
    pattern: str | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class Description:
    summary: str
    replies: Mapping[int, Reply]
    errors: Mapping[int, str] = field(default_factory=dict)  # status -> the error codes it carries
    body: BodyModel | None = None  # a JSON body
    form: BodyModel | None = None  # the same operation also takes multipart/form-data shaped by this
    query: type[BaseModel] | None = None
    headers: Mapping[str, RequestHeader] = field(default_factory=dict)  # request headers, by name
    public: bool = False  # open even when API keys are configured
    listed: bool = True  # in the document's paths (not the page and the document themselves)
    tag: str = "tasks"


def documented(**kwargs: Any) -> Callable[[H], H]:
    """Attach an OpenAPI description to a handler (see `Description` for the fields)."""
    description = Description(**kwargs)

    def attach(handler: H) -> H:
        setattr(handler, DESCRIPTION_ATTRIBUTE, description)
        return handler

    return attach


def description_of(handler: object) -> Description | None:
    """The description `documented` attached to a handler, if any."""
    description = getattr(handler, DESCRIPTION_ATTRIBUTE, None)
    return description if isinstance(description, Description) else None


def build_openapi(app: web.Application, title: str, version: str, auth: bool) -> bytes:
    """The document as JSON bytes; `auth` adds the bearer scheme and 401 answers."""
    models: set[type[BaseModel]] = {ErrorBody}
    paths: dict[str, dict[str, Operation]] = {}
    operation_ids: set[str | None] = set()
    for route in app.router.routes():
        if route.method == "HEAD" or isinstance(route.resource, web.StaticResource):
            continue
        assert route.resource is not None
        path = route.resource.canonical
        description = description_of(route.handler)
        if description is None:
            raise RuntimeError(f"{route.method} {path} has no OpenAPI description (service.api.openapi.documented)")
        if not description.listed:
            continue
        operation = _operation(app, path, description, auth, models)
        operation.operationId = getattr(route.handler, "__name__", None)
        if operation.operationId in operation_ids:
            raise RuntimeError(f"{route.method} {path}: operation id {operation.operationId!r} is taken")
        operation_ids.add(operation.operationId)
        paths.setdefault(path, {})[route.method.lower()] = operation

    _, definitions = models_json_schema(
        [(model, "validation") for model in sorted(models, key=lambda m: m.__name__)], ref_template=REF_TEMPLATE
    )
    components = Components(schemas={name: Schema.model_validate(s) for name, s in definitions["$defs"].items()})
    if auth:
        components.securitySchemes = {BEARER: SecurityScheme(type="http", scheme="bearer")}
    document = OpenAPI(
        openapi="3.1.0",
        info=Info(title=title, version=version),
        paths={path: PathItem.model_validate(operations) for path, operations in paths.items()},
        components=components,
    )
    # Only what was set: the library's defaults include fields not valid everywhere (allowEmptyValue).
    return json.dumps(document.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True)).encode()


def _operation(
    app: web.Application, path: str, description: Description, auth: bool, models: set[type[BaseModel]]
) -> Operation:
    responses: dict[str, Response | Reference] = {}
    for status, reply in description.replies.items():
        responses[str(status)] = _response(reply, models)
    errors = dict(description.errors)
    if auth and not description.public:
        errors[401] = "unauthorized"
    for status, codes in sorted(errors.items()):
        responses[str(status)] = _response(Reply(f"Error; `error.code` is one of: {codes}", ErrorBody), models)

    parameters: list[Parameter | Reference] = [
        Parameter.model_validate({"name": name, "in": "path", "required": True, "schema": Schema(type=DataType.STRING)})
        for name in _path_parameters(path)
    ]
    for name, header in description.headers.items():
        schema = Schema(type=DataType.STRING, pattern=header.pattern, maxLength=header.max_length)
        parameters.append(
            Parameter.model_validate(
                {"name": name, "in": "header", "required": False, "description": header.description, "schema": schema}
            )
        )
    if description.query is not None:
        parameters += _query_parameters(description.query)
        models.add(description.query)  # brings the enums its fields refer to into the components
    content: dict[str, MediaType] = {}
    if description.body is not None:
        body = _resolve(app, description.body)
        models.add(body)
        content[JSON] = MediaType.model_validate({"schema": _ref(body)})
    if description.form is not None:
        content[MULTIPART] = MediaType.model_validate({"schema": _form_schema(_resolve(app, description.form))})
    request_body = RequestBody(required=True, content=content) if content else None
    return Operation(
        summary=description.summary,
        tags=[description.tag],
        parameters=parameters or None,
        requestBody=request_body,
        responses=responses,
        security=[{BEARER: []}] if auth and not description.public else None,
    )


def _response(reply: Reply, models: set[type[BaseModel]]) -> Response:
    extensions: dict[str, Any] = {}
    if reply.model is not None and reply.media_type == JSON:
        models.add(reply.model)
        schema: Schema | Reference = _ref(reply.model)
    elif reply.model is not None:
        # A stream of text (Server-Sent Events): a string to generated clients, which would
        # otherwise parse the stream as one JSON object; the shape of each event is the
        # extension's schema.
        models.add(reply.model)
        schema = Schema(type=DataType.STRING)
        extensions[EVENT_SCHEMA] = {"$ref": REF_TEMPLATE.format(model=reply.model.__name__)}
    else:
        schema = Schema(type=DataType.OBJECT if reply.media_type == JSON else DataType.STRING)
    headers: dict[str, Header | Reference] = {
        name: Header.model_validate({"description": text, "schema": Schema(type=DataType.STRING)})
        for name, text in reply.headers.items()
    }
    links: dict[str, Link | Reference] = {
        name: Link(operationId=operation, parameters={"task_id": "$response.body#/task_id"})
        for name, operation in reply.links.items()
    }
    return Response(
        description=reply.description,
        content={
            media_type: MediaType.model_validate({"schema": schema, **extensions})
            for media_type in (reply.media_type, *reply.more_media_types)
        },
        headers=headers or None,
        links=links or None,
    )


def _ref(model: type[BaseModel]) -> Reference:
    return Reference.model_validate({"$ref": REF_TEMPLATE.format(model=model.__name__)})


def _resolve(app: web.Application, model: BodyModel) -> type[BaseModel]:
    return app[model] if isinstance(model, web.AppKey) else model


def _form_schema(form: type[BaseModel]) -> Schema:
    """A form's fields are text or files, never null: the schema without null branches."""
    schema = form.model_json_schema(ref_template=REF_TEMPLATE)
    schema["properties"] = {name: _never_null(prop) for name, prop in schema["properties"].items()}
    return Schema.model_validate(schema)


def _never_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A field schema without the null branch pydantic adds to optional fields."""
    prop = dict(prop)
    if "anyOf" in prop:
        options = [option for option in prop.pop("anyOf") if option != {"type": "null"}]
        prop.update(options[0] if len(options) == 1 else {"anyOf": options})
    if prop.get("default") is None:
        prop.pop("default", None)
    return prop


def _path_parameters(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def _query_parameters(query: type[BaseModel]) -> list[Parameter]:
    """One parameter per field. A query value is never JSON null (absent means None)."""
    schema = query.model_json_schema(ref_template=REF_TEMPLATE)
    parameters = []
    for name, prop in schema["properties"].items():
        prop = _never_null(prop)
        parameters.append(
            Parameter.model_validate(
                {
                    "name": name,
                    "in": "query",
                    "required": name in schema.get("required", ()),
                    "description": prop.pop("description", None),
                    "schema": Schema.model_validate(prop),
                }
            )
        )
    return parameters
