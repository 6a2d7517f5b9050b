"""The HTTP shell of `imgclf serve`, apart from the routes that answer
images (app.py): JSON errors for every failure, the request-head limit,
the headers that keep the page and the JSON inert in a browser, and the
page, its assets and Swagger UI served from an in-memory table."""

# No `from __future__ import annotations`: FastAPI reads the endpoint
# annotations (Request) at runtime, and Request is imported inside each add_*.

import logging
import time
from importlib import resources
from pathlib import Path

from imgclf.deploy.serve.metrics import Metrics
from imgclf.deploy.serve.parsing import ApiError

STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
log = logging.getLogger("imgclf.serve")


def error_response(metrics: Metrics, status: int, code: str, message: str, headers: dict | None = None, **extra):
    from fastapi.responses import JSONResponse

    metrics.error(code)
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers)


def add_error_handlers(app, metrics: Metrics) -> None:
    """ApiError, Starlette's 404/405 (keeping Allow), validation errors, and a
    middleware that turns any other exception into a counted JSON 500."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(metrics, e.status, e.code, e.message, headers=e.headers, **e.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(metrics, e.status_code, code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        return error_response(metrics, 400, "bad_parameters", msg[:500])

    @app.middleware("http")
    async def _count(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # last resort: a JSON 500, counted, never a dead server
            log.exception("internal error on %s %s", request.method, request.url.path)
            response = error_response(metrics, 500, "internal", "internal error; see the server log")
        route = getattr(request.scope.get("route"), "path", None) or "other"  # the template: bounded labels
        metrics.request(request.method, route, response.status_code, time.perf_counter() - t0)
        return response


MAX_HEAD_BYTES = 64 * 1024  # request line and headers together
# The page's own policy: its script, style and API calls come from this server;
# previews are blob: URLs and thumbnails data: URLs; no page may frame it.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
# /docs is Swagger UI, whose page starts it from an inline script: framing is still refused.
DOCS_CSP = "frame-ancestors 'none'"


def add_http_middleware(app, metrics: Metrics) -> None:
    """Plain ASGI middleware around every request: HEAD is answered as GET
    (uvicorn sends the headers only), a request head over 64 KiB is a 431
    (h11 only limits heads that arrive in pieces), and every answer carries
    the headers a browser needs to keep the page and the JSON inert."""
    inner = app.build_middleware_stack

    def build():
        return guard(inner())

    def guard(asgi):
        async def call(scope, receive, send):
            if scope["type"] != "http":
                return await asgi(scope, receive, send)
            head = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) + 4
                                                                              for k, v in scope["headers"])
            if head > MAX_HEAD_BYTES:
                r = error_response(metrics, 431, "headers_too_large", f"the request line and headers are {head:,} "
                                   f"bytes, over the limit of {MAX_HEAD_BYTES:,}; send fewer or shorter headers")
                return await r(scope, receive, with_security_headers(send, scope["path"]))
            if scope["method"] == "HEAD":
                scope = {**scope, "method": "GET"}
            await asgi(scope, receive, with_security_headers(send, scope["path"]))

        return call

    app.build_middleware_stack = build


def with_security_headers(send, path: str):
    csp = PAGE_CSP if path == "/" or path.startswith("/static/") else DOCS_CSP if path == "/docs" else \
        "default-src 'none'; frame-ancestors 'none'"
    extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
             (b"referrer-policy", b"no-referrer"), (b"content-security-policy", csp.encode())]

    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": list(message.get("headers", [])) + extra}
        await send(message)

    return wrapped


SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
                 "favicon-32x32.png": "image/png"}


def static_table() -> dict[str, tuple[bytes, str]]:
    """Every file the server serves, read once into memory: the page's own
    assets and Swagger UI's (from the swagger-ui-bundle-v2 package), so /docs
    works offline and no request ever names a path on disk."""
    table = {name: (resources.files("imgclf.deploy.serve").joinpath("static", name).read_bytes(), mime)
             for name, mime in STATIC_FILES.items()}
    try:
        import swagger_ui_bundle
    except ImportError:  # an install without it keeps a working API; /docs says what to install
        return table
    folder = Path(swagger_ui_bundle.swagger_ui_path)
    table.update({name: ((folder / name).read_bytes(), mime) for name, mime in SWAGGER_FILES.items()})
    return table


def add_page_routes(app) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import Response

    static = static_table()

    @app.get("/", include_in_schema=False)
    async def index():
        data, mime = static["index.html"]
        return Response(data, media_type=mime)

    @app.get("/docs", include_in_schema=False)
    async def docs():
        if "swagger-ui-bundle.js" not in static:
            raise ApiError(404, "not_found", "API docs need the swagger-ui-bundle-v2 package "
                           "(pip install 'imgclf[serve]'); the schema is at /openapi.json")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="imgclf API",
                                   swagger_js_url="/static/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger-ui.css",
                                   swagger_favicon_url="/static/favicon-32x32.png")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        # Looked up in a fixed in-memory table: a request never names a path on disk.
        if name not in static:
            raise ApiError(404, "not_found", "no such static file")
        data, mime = static[name]
        return Response(data, media_type=mime, headers={"Cache-Control": "no-cache"})
