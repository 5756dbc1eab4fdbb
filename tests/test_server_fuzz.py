"""Fuzz every route with schemathesis from the server's own OpenAPI schema: no input may answer 500 or hang,
and every answer matches the documented schema (status code, content type, body).

Both generation modes: inputs that fit the schema, and inputs that break it (those must get a 4xx).

Bounded: a fixed number of examples per route, and generation requests get at most 4 tokens and 2 choices
(the server's behaviour for larger values is the same code path, only slower).
"""

from __future__ import annotations

from typing import Any

import pytest
from test_server_support import API_KEY, main_server, needs_model

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [needs_model, pytest.mark.slow]

EXAMPLES_PER_ROUTE = 25  # per route and generation mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def _cap(body: Any) -> Any:
    """Keep fuzzed generation requests short: at most 4 tokens and 2 choices whatever the generated numbers
    (ints, floats such as 13.0, nulls or absent fields), everything else as generated."""
    if isinstance(body, dict):
        body = dict(body)
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if key in body and (value is None or _number(value) and value > 4):
                body[key] = 4
        if "max_tokens" not in body:
            body["max_tokens"] = 4
        if _number(body.get("n")) and body["n"] > 2:
            body["n"] = 2
        if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 2:
            body["prompt"] = body["prompt"][:2]
    return body


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gives_a_server_error(mode: GenerationMode) -> None:
    """Every operation of /openapi.json, EXAMPLES_PER_ROUTE generated cases each (schemathesis' pytest plugin
    does not load under pytest 9, so the cases are drawn with hypothesis directly)."""
    server = main_server()
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8

    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to break in a request without parameters or body

        @settings(
            max_examples=EXAMPLES_PER_ROUTE,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            if case.body is not None:
                case.body = _cap(case.body)
            headers = {"Authorization": f"Bearer {API_KEY}"}
            response = case.call(base_url=server.url, headers=headers, timeout=60)
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except (Failure, FailureGroup) as e:
                failures.append(
                    f"{case.operation.label}: {e}\n{response.text[:300]}\n{case.as_curl_command()}"
                )
            if (
                400 <= response.status_code < 500
                and response.headers.get("content-type") == "application/json"
            ):
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, error

        check()
    assert not failures, "\n\n".join(failures[:5])
