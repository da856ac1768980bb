"""The HTTP API's routes, defined once. Each row gives the server its handler, the OpenAPI
document its path, method and summary, and the keys the scope it needs. A foreign API's
routes (Piston's) are rows like any other, marked by their `shape`: the error body they
answer with. The pages (the playground, /docs) are not API routes: `pages.py` has them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Shape = Literal["native", "piston"]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # as OpenAPI writes it, and as aiohttp names the route it matched
    handler: str  # the `Api` method that serves it
    summary: str
    scope: str | None = None  # what a key needs for it (None: no key)
    shape: Shape = "native"
    pattern: str | None = None  # aiohttp's path, where a parameter spans '/'

    @property
    def server_path(self) -> str:
        return self.pattern or self.path


SESSION = "/v1/sessions/{id}"
FILE = f"{SESSION}/files/{{path}}"
FILE_PATTERN = f"{SESSION}/files/{{path:.+}}"

ROUTES = (
    Route("POST", "/v1/runs", "post_run",
          "Run a program once, confined; answer with its result record.", "runs"),
    Route("POST", "/v1/sessions", "post_session",
          "Start a session: an interpreter that keeps its state across calls.", "runs"),
    Route("GET", "/v1/sessions", "list_sessions", "The caller's sessions.", "runs"),
    Route("GET", SESSION, "get_session", "A session's state and usage so far.", "runs"),
    Route("DELETE", SESSION, "delete_session",
          "End a session (a call in progress is cancelled).", "runs"),
    Route("POST", f"{SESSION}/runs", "post_session_run",
          "Run a cell in the session's interpreter.", "runs"),
    Route("GET", f"{SESSION}/files", "list_session_files",
          "The files in the session's working directory.", "runs"),
    Route("GET", FILE, "get_session_file", "A file's content.", "runs", pattern=FILE_PATTERN),
    Route("PUT", FILE, "put_session_file", "Write a file (parents are made).", "runs",
          pattern=FILE_PATTERN),
    Route("DELETE", FILE, "delete_session_file", "Remove a file.", "runs",
          pattern=FILE_PATTERN),
    Route("GET", "/v1/languages", "get_languages", "Languages, versions, preloads and limits."),
    Route("GET", "/v1/environments", "get_environments",
          "Environments: each one's Python and packages."),
    Route("GET", "/healthz", "healthz", "The runner is alive."),
    Route("GET", "/readyz", "readyz", "The pool is warm."),
    Route("GET", "/metrics", "get_metrics", "Prometheus metrics.", "metrics"),
    Route("GET", "/openapi.json", "get_openapi", "This document."),
    Route("GET", "/api/v2/runtimes", "piston_runtimes", "Piston v2: runtimes.", shape="piston"),
    Route("POST", "/api/v2/execute", "piston_execute",
          "Piston v2: execute (files[0] is the program).", "runs", shape="piston"),
)
BY_METHOD_AND_PATH = {(route.method, route.path): route for route in ROUTES}


def find(method: str, path: str) -> Route | None:
    """The row of the route aiohttp matched (`path`: its canonical form)."""
    return BY_METHOD_AND_PATH.get((method, path))


def keyed() -> dict[str, str]:
    """Each path that needs a key, and the scope (every method of a path needs the same)."""
    scopes: dict[str, str] = {}
    for route in ROUTES:
        if route.scope is not None:
            scopes[route.path] = route.scope
    return scopes
