"""A bounded property-based fuzz run (schemathesis) against the live server's own OpenAPI schema:
whatever it is sent, the server answers without a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from test_server_support import serve

pytest_plugins = ["test_server_support"]  # fixtures: tiny_engine

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fuzz_schema(tiny_engine):
    from diffpo_sdk.server import ServerConfig, create_app

    config = ServerConfig(
        max_new_tokens_limit=16,  # valid-by-schema requests may ask for 4096 tokens: keep the run bounded
        request_timeout=30,
        upstream_model="gpt-4o-mini",
        upstream_extra={"mock_response": "A canned upstream answer."},
    )
    with serve(create_app(tiny_engine, config)) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


# (method, path, generation mode): negative cases only exist where there is a body to break
OPERATIONS = [
    ("POST", "/v1/refine", "positive"), ("POST", "/v1/refine", "negative"),
    ("POST", "/v1/chat/completions", "positive"), ("POST", "/v1/chat/completions", "negative"),
    ("GET", "/health", "positive"), ("GET", "/v1/models", "positive"),
]


# schemathesis' own pytest plugin does not run under pytest 9 yet, so drive its strategies with hypothesis.
@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS)
def test_no_server_errors(fuzz_schema, method, path, mode):
    from hypothesis import given
    from schemathesis import GenerationMode

    operation = fuzz_schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    seen = []

    @given(case=strategy)
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def run(case):
        response = case.call_and_validate(checks=[not_a_server_error], timeout=30)
        seen.append(response.status_code)

    run()
    assert seen and all(code < 500 for code in seen)
