"""Schemathesis against /v1/openapi.json on a real server: every generated request to every
operation gets an answer the schema documents (status, content type, body), and never a 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from tests.helpers import API_KEY

# Bounded generation: a random request may ask for 128 choices of thousands of tokens, which a
# real engine would faithfully generate; the shapes under test do not need that many.
LIMITS = {"max_tokens": 8, "max_completion_tokens": 8, "max_output_tokens": 8, "n": 2}
EXAMPLES = 20  # per operation
# What the schema promises: no 5xx, documented statuses, content types and bodies. (Schemathesis'
# "positive data accepted" check is left out: a schema-valid request may still be a 400, e.g. a
# tool message without tool_call_id, which no JSON schema here expresses.)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


def clamp(body) -> None:
    if isinstance(body, dict):
        for name, limit in LIMITS.items():
            if isinstance(body.get(name), int) and body[name] > limit:
                body[name] = limit


def test_every_operation_answers_generated_requests_as_its_schema_says(server):
    schema = schemathesis.openapi.from_url(server.url + "/v1/openapi.json")
    failures: dict[str, str] = {}
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case) -> None:
            clamp(case.body)
            case.call_and_validate(
                headers={"Authorization": f"Bearer {API_KEY}"}, checks=CHECKS, timeout=120
            )

        try:
            run()
        except Exception as exc:  # every operation is tried; all failures are reported
            failures[operation.label] = str(exc)[:2000]
        checked += 1
    assert checked >= 10  # chat, completions, embeddings, responses (3), messages (2), models (2)
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
