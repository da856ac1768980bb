"""Fuzz the API from its own OpenAPI document: no 5xx (besides a documented 503) and no
answer that breaks the document's schemas, for valid and invalid requests alike.

Valid requests may still be refused: the document cannot say everything the server checks
(file-name rules, per-file caps, base64 validity), so "schema-valid is accepted" is not
among the checks. schemathesis' pytest plugin does not run under pytest 9, so the
operations are walked here.
"""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from stockade.runner.local import RunnerProcess, request

SETTINGS = hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                               database=None, suppress_health_check=list(hypothesis.HealthCheck))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_api_keeps_to_its_openapi_document(runner: RunnerProcess, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{runner.port}/openapi.json")
    checked = []
    for loaded in schema.get_all_operations():
        operation = loaded.ok()
        if mode == GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to get wrong in a GET without parameters

        @SETTINGS
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def call(case: schemathesis.Case) -> None:
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        call()
        checked.append(operation.label)
    assert "POST /v1/runs" in checked and "POST /api/v2/execute" in checked
    assert "POST /v1/sessions/{id}/runs" in checked


@pytest.fixture(autouse=True)
def _no_session_outlives_the_fuzzing(runner: RunnerProcess) -> Iterator[None]:
    """Sessions the fuzzer started would hold the session pool for later tests."""
    yield
    for session in runner.get("/v1/sessions").json()["sessions"]:
        request(runner.port, "DELETE", f"/v1/sessions/{session['id']}")
