"""The route table (runner/front/routes.py) is the one place a route is defined: the
server serves exactly its rows, the OpenAPI document describes exactly them, and a key's
scope is asked where a row says, and only there."""

from __future__ import annotations

from typing import Any

from stockade.runner.config import RunnerConfig
from stockade.runner.front import openapi, routes
from stockade.runner.front.api import Api


def served(app: Any) -> set[tuple[str, str]]:
    return {(r.method, r.resource.canonical) for r in app.router.routes()
            if r.method != "HEAD" and r.resource is not None}


def test_the_server_serves_exactly_the_table_and_the_pages() -> None:
    api = Api.__new__(Api)  # the routes need the handlers' names, not a running front
    api.config = RunnerConfig()
    api.pages = type("NoPages", (), {"routes": lambda self: []})()
    table = {(r.method, r.path) for r in routes.ROUTES}
    assert served(api.app()) == table
    assert all(callable(getattr(Api, r.handler, None)) for r in routes.ROUTES)


def test_the_openapi_document_describes_exactly_the_table() -> None:
    document = openapi.document(RunnerConfig())
    described = {(method.upper(), path) for path, item in document["paths"].items()
                 for method in item if method != "parameters"}
    assert described == {(r.method, r.path) for r in routes.ROUTES}
    for route in routes.ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        assert operation["summary"] == route.summary
        assert ("security" in operation) is (route.scope is not None), route
        assert ("401" in operation["responses"]) is (route.scope is not None), route
        error = operation["responses"].get("422") or operation["responses"].get("503")
        if error is not None:
            shape = "PistonError" if route.shape == "piston" else "ErrorBody"
            assert shape in str(error), route


def test_foreign_shapes_are_rows_like_any_other() -> None:
    piston = [r for r in routes.ROUTES if r.shape == "piston"]
    assert {r.path for r in piston} == {"/api/v2/runtimes", "/api/v2/execute"}
    assert routes.keyed()["/api/v2/execute"] == "runs"
