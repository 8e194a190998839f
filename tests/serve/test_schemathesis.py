"""Property-based fuzzing of the live API from its own /openapi.json (bounded examples per operation).

Whatever schemathesis generates from the schema (valid bodies with boundary values, and invalid
ones: wrong types, missing fields), the server never answers 5xx, its answers match the documented
status codes and content types, and every error body is OpenAI's
`{"error": {"message", "type", "param", "code"}}`. (Driven through hypothesis directly:
schemathesis' lazy pytest fixture loader does not support pytest 9.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, status_code_conformance

from tests.serve.conftest import API_KEY

pytestmark = pytest.mark.ray

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OPERATIONS = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
              ("GET", "/health"), ("GET", "/metrics")]


@pytest.fixture(scope="module")
def api_schema(main_app):
    return schemathesis.openapi.from_url(f"{main_app}/openapi.json", headers=AUTH)


def openai_error_shape(ctx, response, case):
    if response.status_code < 400:
        return None
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return None


def test_schema_lists_every_operation(api_schema):
    found = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert set(OPERATIONS) <= found


# GET operations take no input, so only their valid form is generated.
CASES = [(m, p, mode) for m, p in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if m == "POST" or mode is GenerationMode.POSITIVE]


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{p}-{mode.value}" for _, p, mode in CASES])
def test_fuzzed_requests_never_fail_and_errors_are_openai_shaped(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @settings(max_examples=20, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call(headers=AUTH, timeout=60)
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance],
                               additional_checks=[openai_error_shape])

    check()
