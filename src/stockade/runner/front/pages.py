"""The pages a person opens: the playground at `/`, the API docs at `/docs`, and their files.

Files come from a fixed list read once at start, never from a path in the request. Each is
linked under a URL naming its content's digest, so a browser may keep it for good; the
pages are revalidated every time. Every page carries a strict Content-Security-Policy: its
own scripts and styles only, requests to this runner only, framed by no one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).with_name("static")
SWAGGER = "vendor/swagger-ui/swagger-ui-bundle.js"
ASSETS = ("playground.js", "playground.css", "favicon.svg", "docs.js", SWAGGER,
          "vendor/swagger-ui/swagger-ui.css")
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml"}
_COMMON_CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; base-uri 'none'; "
               "form-action 'none'; frame-ancestors 'none'")
# Images a run left in out/ are shown from blob: URLs; its HTML goes in a sandboxed srcdoc
# frame, which inherits this policy (so no script runs there either).
PLAYGROUND_CSP = f"{_COMMON_CSP}; style-src 'self'; img-src 'self' blob:"
# Swagger UI sets inline styles on its elements.
DOCS_CSP = f"{_COMMON_CSP}; style-src 'self' 'unsafe-inline'; img-src 'self' data:"
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY"}
PLACEHOLDER = re.compile(r"\{\{([a-z0-9/._-]+)\}\}")
MISSING_DOCS = ("<!DOCTYPE html><html lang=\"en\"><meta charset=\"utf-8\"><title>stockade API"
                "</title><p>The API docs' browser library was not installed with this runner "
                "(<code>tools/vendor</code> fetches it at build time). The document itself is "
                "at <a href=\"/openapi.json\">/openapi.json</a>.</p></html>")


@dataclass(frozen=True)
class File:
    body: bytes
    content_type: str
    digest: str

    @property
    def etag(self) -> str:
        return f'"{self.digest}"'


def _file(body: bytes, suffix: str) -> File:
    return File(body, CONTENT_TYPES[suffix], hashlib.sha256(body).hexdigest()[:20])


class Pages:
    def __init__(self) -> None:
        self.assets = {name: _file((STATIC / name).read_bytes(), Path(name).suffix)
                       for name in ASSETS if (STATIC / name).is_file()}
        self.playground = self._page("playground.html")
        docs_ready = SWAGGER in self.assets
        self.docs = self._page("docs.html") if docs_ready else _file(MISSING_DOCS.encode(),
                                                                     ".html")

    def _url(self, name: str) -> str:
        return f"/static/{name}?v={self.assets[name].digest}"

    def _page(self, name: str) -> File:
        html = PLACEHOLDER.sub(lambda m: self._url(m.group(1)), (STATIC / name).read_text())
        return _file(html.encode(), ".html")

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/", self.get_playground), web.get("/docs", self.get_docs),
                web.get("/static/{name:.+}", self.get_static)]

    async def get_playground(self, request: web.Request) -> web.StreamResponse:
        return _answer(request, self.playground, "no-cache", PLAYGROUND_CSP)

    async def get_docs(self, request: web.Request) -> web.StreamResponse:
        return _answer(request, self.docs, "no-cache", DOCS_CSP)

    async def get_static(self, request: web.Request) -> web.StreamResponse:
        found = self.assets.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        # Linked with its digest: the content at that URL never changes.
        pinned = request.query.get("v") == found.digest
        return _answer(request, found, "public, max-age=31536000, immutable" if pinned
                       else "no-cache")


def _answer(request: web.Request, found: File, cache: str,
            csp: str | None = None) -> web.StreamResponse:
    headers = {"Cache-Control": cache, "ETag": found.etag, **SECURITY_HEADERS}
    if csp:
        headers["Content-Security-Policy"] = csp
    if found.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, headers={**headers,
                                                  "Content-Type": found.content_type})
