"""The API's contract for people and tools: `/openapi.json` and Swagger UI at `/docs`.

Swagger UI's files come from the pinned `swagger-ui-py` package and are served by this
service, so the docs work offline (no CDN).
"""

from __future__ import annotations

from aiohttp import web
from swagger_ui.utils import SWAGGER_UI_PY_ROOT

from service.api.appkeys import OPENAPI, SETTINGS
from service.api.openapi import Reply, build_openapi, documented

STATIC_PREFIX = "/docs/static"
TITLE = "Image-classification task service"
VERSION = "1.0.0"

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{title} - API</title>
  <link rel="stylesheet" href="{static}/swagger-ui.css">
  <link rel="icon" type="image/png" href="{static}/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{static}/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true}});
  </script>
</body>
</html>
"""


@documented(
    summary="This OpenAPI 3.1 document",
    tag="docs",
    public=True,
    listed=False,
    replies={200: Reply("The OpenAPI document", media_type="application/json")},
)
async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


@documented(
    summary="Swagger UI for this document",
    tag="docs",
    public=True,
    listed=False,
    replies={200: Reply("An HTML page", media_type="text/html")},
)
async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=_PAGE.format(title=TITLE, static=STATIC_PREFIX), content_type="text/html")


def add_docs(app: web.Application) -> None:
    """Add the docs routes, then build the document from every route the app has by now."""
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs_page)
    app.router.add_static(STATIC_PREFIX, SWAGGER_UI_PY_ROOT / "static")
    app[OPENAPI] = build_openapi(app, TITLE, VERSION, auth=bool(app[SETTINGS].api_key_list()))
