"""The OpenAPI 3.1 document of the HTTP API, generated from the same structs that decode
requests and encode answers, so the two cannot drift apart."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from stockade import __version__
from stockade.limits import BY_NAME, LimitPolicy
from stockade.result import Result
from stockade.runner.config import RunnerConfig
from stockade.runner.front import piston, schema, streaming

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


KEYED = {"/v1/runs": "runs", "/api/v2/execute": "runs", "/metrics": "metrics",
         **{path: "runs" for path in ("/v1/sessions", "/v1/sessions/{id}",
                                      "/v1/sessions/{id}/runs", "/v1/sessions/{id}/files",
                                      "/v1/sessions/{id}/files/{path}")}}


def _with_keys(document: dict[str, Any], anonymous: tuple[str, ...]) -> dict[str, Any]:
    """The bearer scheme on every route that needs a key: optional where the anonymous
    callers' quota has the route's scope."""
    document["components"]["securitySchemes"] = {"apiKey": {
        "type": "http", "scheme": "bearer",
        "description": "An API key (`stk_...`) from the operator's `stockade keys add`; its "
                       "scopes (runs, metrics) say which routes it opens."}}
    for path, scope in KEYED.items():
        for operation in _operations(document["paths"][path]):
            optional = scope in anonymous
            operation["security"] = [{"apiKey": []}, *([{}] if optional else [])]
            kind = "PistonError" if path.startswith("/api/") else "ErrorBody"
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


def _op(summary: str, answers: dict[str, Any], *error_codes: int,
        body: dict[str, Any] | None = None) -> dict[str, Any]:
    operation = {"summary": summary, "responses": {**answers,
                                                   **_errors("ErrorBody", *error_codes)}}
    if body is not None:
        operation["requestBody"] = {"required": True, **body}
    return operation


SESSION_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
FILE_PATH = {"name": "path", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "A relative path in the session's working directory (no `..`)."}
NO_CONTENT = {"204": {"description": "Done."}}
OCTETS = {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                               "format": "binary"}}}}


def _session_paths() -> dict[str, Any]:
    """Sessions: 404 unknown (or another key's, or expired), 409 a call in progress,
    410 lost (the message says why)."""
    gone = (404, 410)
    return {
        "/v1/sessions": {
            "post": _op("Start a session: an interpreter that keeps its state across calls.",
                        {"201": _json_body("SessionInfo", "The new session.")},
                        400, 404, 413, 422, 503, 500,
                        body=_json_body("SessionRequest", "Limits and terms.")),
            "get": _op("The caller's sessions.",
                       {"200": _json_body("SessionList", "Live sessions.")})},
        "/v1/sessions/{id}": {
            "parameters": [SESSION_ID],
            "get": _op("A session's state and usage so far.",
                       {"200": _json_body("SessionInfo", "The session.")}, *gone),
            "delete": _op("End a session (a call in progress is cancelled).", NO_CONTENT,
                          *gone)},
        "/v1/sessions/{id}/runs": {
            "parameters": [SESSION_ID],
            "post": _op("Run a cell in the session's interpreter.",
                        {"200": _with_stream(_json_body("CellResult", "The cell's record "
                                                        "and what it showed."))},
                        400, 413, 422, 409, *gone, 500,
                        body=_json_body("CellRequest", "The cell."))},
        "/v1/sessions/{id}/files": {
            "parameters": [SESSION_ID],
            "get": _op("The files in the session's working directory.",
                       {"200": _json_body("SessionFiles", "The files.")}, 409, *gone)},
        "/v1/sessions/{id}/files/{path}": {
            "parameters": [SESSION_ID, FILE_PATH],
            "get": _op("A file's content.", {"200": {"description": "The content.", **OCTETS}},
                       409, 422, *gone, 502),
            "put": _op("Write a file (parents are made).", NO_CONTENT, 409, 413, 422, *gone,
                       502, body={"description": "The content.", **OCTETS}),
            "delete": _op("Remove a file.", NO_CONTENT, 409, 422, *gone, 502)},
    }


def _get(summary: str, body: dict[str, Any], *error_codes: int) -> dict[str, Any]:
    return {"get": {"summary": summary,
                    "responses": {"200": body, **_errors("ErrorBody", *error_codes)}}}


@functools.cache
def _document(limits: bytes, anonymous: tuple[str, ...],
              environments: tuple[str, ...]) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [schema.RunRequest, Result, schema.ErrorBody, schema.Languages, schema.Environments,
         schema.SessionRequest,
         schema.SessionInfo, schema.SessionList, schema.CellRequest, schema.CellResult,
         schema.SessionFiles,
         piston.PistonRequest, piston.PistonResponse, piston.PistonRuntime, piston.PistonError],
        ref_template=REF)
    text = {"description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}}}
    status = {"type": "object", "additionalProperties": True}
    document = {
        "openapi": "3.1.0",
        "info": {"title": "stockade", "version": __version__,
                 "description": "Run untrusted Python in confined, warm LXC sandboxes. "
                 f"Limit policy: {limits.decode()}"},
        "paths": {
            "/v1/runs": {"post": {
                "summary": "Run a program once, confined; answer with its result record.",
                "requestBody": {"required": True, **_json_body("RunRequest", "The run.")},
                "responses": {"200": _with_stream(_json_body("Result", "The result record.")),
                              **_errors("ErrorBody", 400, 413, 422, 503, 500)}}},
            **_session_paths(),
            "/v1/languages": _get("Languages, versions, preloads and limits.",
                                  _json_body("Languages", "What runs here.")),
            "/v1/environments": _get("Environments: each one's Python and packages.",
                                     _json_body("Environments", "What a run may pick.")),
            "/healthz": _get("The runner is alive.", _json_body(status, "Alive."), 503),
            "/readyz": _get("The pool is warm.", _json_body(status, "Ready."), 503),
            "/metrics": _get("Prometheus metrics.", text),
            "/openapi.json": _get("This document.", _json_body(status, "OpenAPI 3.1.")),
            "/api/v2/runtimes": _get("Piston v2: runtimes.", _json_body(
                {"type": "array", "items": _ref("PistonRuntime")}, "Runtimes.")),
            "/api/v2/execute": {"post": {
                "summary": "Piston v2: execute (files[0] is the program).",
                "requestBody": {"required": True,
                                **_json_body("PistonRequest", "Piston's request.")},
                "responses": {"200": _json_body("PistonResponse", "Piston's answer."),
                              **_errors("PistonError", 400, 413, 422, 503, 500)}}},
        },
        "components": {"schemas": _with_environments(
            _with_limit_ranges(components, limits), environments)},
    }
    return _with_request_ids(_with_keys(document, anonymous))


def _operations(path_item: dict[str, Any]) -> list[dict[str, Any]]:
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
        for operation in _operations(operations):
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
