"""``/openapi.json``, ``/docs`` and ``/redoc``: the API's own description, behind a key.

Off unless ``SAFEGATE_API_DOCS=true`` (``gateway.app`` then mounts this router behind
``require`` with every role, so any valid key reads them and nobody else). FastAPI's own
docs routes stay off: they answer anyone. A browser sends no key when a page fetches the
document, so both pages carry the document inline instead of fetching ``/openapi.json``;
their scripts come from FastAPI's default CDN, as with FastAPI's own pages.
"""

from __future__ import annotations

import html
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

router = APIRouter(include_in_schema=False)

REDOC_JS_URL = "https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js"


def _document(request: Request) -> dict[str, Any]:
    document: dict[str, Any] = request.app.openapi()
    return document


def _script_json(value: object) -> str:
    """JSON that is safe inside a ``<script>`` element."""
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@router.get("/openapi.json")
async def openapi_document(request: Request) -> JSONResponse:
    return JSONResponse(_document(request))


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    document = _document(request)
    return get_swagger_ui_html(
        openapi_url="",  # the document is inline: ``spec`` wins over ``url``
        title=f"{document['info']['title']} - Swagger UI",
        swagger_ui_parameters={"spec": document},
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    document = _document(request)
    title = html.escape(f"{document['info']['title']} - ReDoc")
    page = f"""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
</head>
<body>
<div id="redoc"></div>
<script src="{REDOC_JS_URL}"></script>
<script>
Redoc.init({_script_json(document)}, {{}}, document.getElementById("redoc"));
</script>
</body>
</html>
"""
    return HTMLResponse(page)
