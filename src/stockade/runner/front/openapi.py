"""The OpenAPI 3.1 document of the HTTP API, generated from the same structs that decode
requests and encode answers, so the two cannot drift apart."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from stockade import __version__, wire
from stockade.limits import BY_NAME, LimitPolicy
from stockade.result import Result
from stockade.runner.config import RunnerConfig
from stockade.runner.front import piston, routes, schema, streaming

REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(name=name)}


def _json_body(name: str | dict[str, Any], description: str) -> dict[str, Any]:
    ref = _ref(name) if isinstance(name, str) else name
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _errors(kind: str, *codes: int) -> dict[str, Any]:
    described = {400: "Malformed JSON or invalid UTF-8.", 413: "The body is over the cap.",
                 401: "No API key, or not a valid one.",
                 403: "The key may not use this route, or ask for this limit.",
                 422: "A field is invalid: unknown, mistyped, out of range or unsafe.",
                 429: "Over the key's rate or its share of the queue; retry after "
                      "Retry-After seconds.",
                 503: "Saturated or not running; retry after Retry-After seconds.",
                 500: "stockade itself failed.",
                 404: "No such session (or file): never made, another key's, deleted or "
                      "expired; or this runner serves no sessions.",
                 409: "A call is in progress in this session; retry when it has ended.",
                 410: "The session ended by itself (a limit, exit(), its container "
                      "failed); the message says why.",
                 502: "The session answered wrongly (its program broke its channel)."}
    answers = {str(code): _json_body(kind, described[code]) for code in codes}
    for code in ("429", "503"):
        if code in answers:
            answers[code]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return answers


def _with_keys(document: dict[str, Any], anonymous: tuple[str, ...]) -> dict[str, Any]:
    """The bearer scheme on every route that needs a key: optional where the anonymous
    callers' quota has the route's scope."""
    document["components"]["securitySchemes"] = {"apiKey": {
        "type": "http", "scheme": "bearer",
        "description": "An API key (`stk_...`) from the operator's `stockade keys add`; its "
                       "scopes (runs, metrics) say which routes it opens."}}
    for route in routes.ROUTES:
        if route.scope is None:
            continue
        operation = document["paths"][route.path][route.method.lower()]
        optional = route.scope in anonymous
        operation["security"] = [{"apiKey": []}, *([{}] if optional else [])]
        kind = "PistonError" if route.shape == "piston" else "ErrorBody"
        operation["responses"].update(_errors(kind, 401, 403, 429))
    return document


def _with_stream(answer: dict[str, Any]) -> dict[str, Any]:
    """A run route's answer, also as server-sent events for `Accept: text/event-stream`."""
    answer["description"] += (
        " With `Accept: text/event-stream`: once the run has a container, events `stdout` "
        "and `stderr` (data: the chunk as a JSON string) as the program writes, within the "
        "output cap, then one `result` (data: the record). A refusal before the start "
        "keeps its status and JSON error body.")
    answer["content"][streaming.CONTENT_TYPE] = {"schema": {"type": "string"}}
    return answer


def _op(answers: dict[str, Any], *error_codes: int,
        body: dict[str, Any] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"responses": {**answers, **_errors("ErrorBody", *error_codes)}}
    if body is not None:
        operation["requestBody"] = {"required": True, **body}
    return operation


SESSION_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
FILE_PATH = {"name": "path", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "A relative path in the session's working directory (no `..`)."}
NO_CONTENT = {"204": {"description": "Done."}}
OCTETS = {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                               "format": "binary"}}}}


def _session_operations() -> dict[tuple[str, str], dict[str, Any]]:
    """Sessions: 404 unknown (or another key's, or expired), 409 a call in progress,
    410 lost (the message says why)."""
    gone = (404, 410)
    session, files, file = routes.SESSION, f"{routes.SESSION}/files", routes.FILE
    return {
        ("POST", "/v1/sessions"): _op({"201": _json_body("SessionInfo", "The new session.")},
                                      400, 404, 413, 422, 503, 500,
                                      body=_json_body("SessionRequest", "Limits and terms.")),
        ("GET", "/v1/sessions"): _op({"200": _json_body("SessionList", "Live sessions.")}),
        ("GET", session): _op({"200": _json_body("SessionInfo", "The session.")}, *gone),
        ("DELETE", session): _op(NO_CONTENT, *gone),
        ("POST", f"{session}/runs"): _op(
            {"200": _with_stream(_json_body("CellResult", "The cell's record and what it "
                                            "showed."))},
            400, 413, 422, 409, *gone, 500, body=_json_body("CellRequest", "The cell.")),
        ("GET", files): _op({"200": _json_body("SessionFiles", "The files.")}, 409, *gone),
        ("GET", file): _op({"200": {"description": "The content.", **OCTETS}}, 409, 422,
                           *gone, 502),
        ("PUT", file): _op(NO_CONTENT, 409, 413, 422, *gone, 502,
                           body={"description": "The content.", **OCTETS}),
        ("DELETE", file): _op(NO_CONTENT, 409, 422, *gone, 502),
    }


def _get(body: dict[str, Any], *error_codes: int) -> dict[str, Any]:
    return {"responses": {"200": body, **_errors("ErrorBody", *error_codes)}}


@functools.cache
def _document(limits: bytes, anonymous: tuple[str, ...],
              environments: tuple[str, ...]) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [wire.RunRequest, Result, wire.ErrorBody, wire.Languages, wire.Environments,
         wire.SessionRequest,
         wire.SessionInfo, wire.SessionList, wire.CellRequest, wire.CellResult,
         wire.SessionFiles,
         piston.PistonRequest, piston.PistonResponse, piston.PistonRuntime, piston.PistonError],
        ref_template=REF)
    document = {
        "openapi": "3.1.0",
        "info": {"title": "stockade", "version": __version__,
                 "description": "Run untrusted Python in confined, warm LXC sandboxes. "
                 f"Limit policy: {limits.decode()}"},
        "paths": _paths(_operations()),
        "components": {"schemas": _with_environments(
            _with_limit_ranges(components, limits), environments)},
    }
    return _with_request_ids(_with_keys(document, anonymous))


def _operations() -> dict[tuple[str, str], dict[str, Any]]:
    """Each route's request and answers (routes.py gives its summary and scope)."""
    text = {"description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}}}
    status = {"type": "object", "additionalProperties": True}
    return {
        ("POST", "/v1/runs"): {
            "requestBody": {"required": True, **_json_body("RunRequest", "The run.")},
            "responses": {"200": _with_stream(_json_body("Result", "The result record.")),
                          **_errors("ErrorBody", 400, 413, 422, 503, 500)}},
        **_session_operations(),
        ("GET", "/v1/languages"): _get(_json_body("Languages", "What runs here.")),
        ("GET", "/v1/environments"): _get(_json_body("Environments", "What a run may pick.")),
        ("GET", "/healthz"): _get(_json_body(status, "Alive."), 503),
        ("GET", "/readyz"): _get(_json_body(status, "Ready."), 503),
        ("GET", "/metrics"): _get(text),
        ("GET", "/openapi.json"): _get(_json_body(status, "OpenAPI 3.1.")),
        ("GET", "/api/v2/runtimes"): _get(_json_body(
            {"type": "array", "items": _ref("PistonRuntime")}, "Runtimes.")),
        ("POST", "/api/v2/execute"): {
            "requestBody": {"required": True,
                            **_json_body("PistonRequest", "Piston's request.")},
            "responses": {"200": _json_body("PistonResponse", "Piston's answer."),
                          **_errors("PistonError", 400, 413, 422, 503, 500)}},
    }


def _paths(operations: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """The document's paths: one operation a row of the route table, in its order."""
    paths: dict[str, Any] = {}
    for route in routes.ROUTES:
        item = paths.setdefault(route.path, {})
        parameters = [spec for spec in (SESSION_ID, FILE_PATH)
                      if f"{{{spec['name']}}}" in route.path]
        if parameters:
            item["parameters"] = parameters
        item[route.method.lower()] = {"summary": route.summary,
                                      **operations[(route.method, route.path)]}
    return paths


def _operations_of(path_item: dict[str, Any]) -> list[dict[str, Any]]:
    return [op for key, op in path_item.items() if key != "parameters"]


def _with_request_ids(document: dict[str, Any]) -> dict[str, Any]:
    """X-Request-Id on every operation (optional) and on every answer (always)."""
    # Any value is accepted (an unusable one is replaced, never refused), so the schema
    # has no pattern: the description says which ids are kept.
    document["components"]["parameters"] = {"RequestId": {
        "name": "X-Request-Id", "in": "header", "required": False,
        "schema": {"type": "string"},
        "description": "Your id for this request, kept if it matches "
                       f"^{schema.REQUEST_ID.pattern}$; otherwise the runner makes one."}}
    document["components"]["headers"] = {"RequestId": {
        "required": True, "schema": {"type": "string"},
        "description": "This request's id: in the runner's log and in every error body."}}
    for operations in document["paths"].values():
        for operation in _operations_of(operations):
            operation["parameters"] = [{"$ref": "#/components/parameters/RequestId"}]
            for answer in operation["responses"].values():
                answer.setdefault("headers", {})["X-Request-Id"] = {
                    "$ref": "#/components/headers/RequestId"}
    return document


def _with_limit_ranges(components: dict[str, Any], limits: bytes) -> dict[str, Any]:
    """The configured floor and caps of every limit, so clients (and fuzzers) see them."""
    policy = msgspec.json.decode(limits, type=LimitPolicy)
    for name, spec in components["LimitsIn"]["properties"].items():
        for variant in spec.get("anyOf", [spec]):
            if variant.get("type") in ("integer", "number"):
                variant["minimum"] = BY_NAME[name].floor
                variant["maximum"] = getattr(policy.maximum, name)
    return components


def _with_environments(components: dict[str, Any],
                       environments: tuple[str, ...]) -> dict[str, Any]:
    """The environments this host serves, as the only names a run may give."""
    for variant in components["RunRequest"]["properties"]["environment"]["anyOf"]:
        if variant.get("type") == "string":
            variant["enum"] = list(environments)
    return components


def document(config: RunnerConfig) -> dict[str, Any]:
    scopes = tuple(config.anonymous.scopes) if config.anonymous else ()
    return _document(msgspec.json.encode(config.limits), scopes, tuple(config.served))
