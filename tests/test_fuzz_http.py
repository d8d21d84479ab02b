"""schemathesis against the real edge's own OpenAPI document (GET /openapi.json), every route in it.

Cases are generated from the document, valid ones and ones that break it (positive and negative modes),
and sent to a real edge whose node runs SmolLM2 through llama.cpp. Checks: no 5xx (not_a_server_error),
what breaks the document is refused with a 4xx (negative_data_rejection), every answer's status, media
type and JSON body are the documented ones (status_code_conformance, content_type_conformance,
response_schema_conformance). ignored_auth runs against an edge that requires API keys, whose document
declares them (tests/test_api_keys.py).

A generated request names the model the edge serves when its `model` is a valid name (else nearly every
case would stop at 404 MODEL_NOT_FOUND, and a field the document forbids but the edge took would go
unseen), and asks for at most 4 tokens (a valid max_tokens is kept valid; an invalid one is left alone),
so each case costs a fraction of a second of generation.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from mesh.inference_requests import UINT32_MAX
from tests.conftest import Mesh

# Per operation and mode (6 operations, 2 modes; GETs without parameters have 1 case): ~60 s here.
MAX_EXAMPLES = 40
CHECKS = [
    not_a_server_error,
    negative_data_rejection,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _cheap(body: dict[str, Any], model: str) -> None:
    """The served model and a few tokens, without making an invalid case valid (see the docstring)."""
    if isinstance(body.get("model"), str) and body["model"].strip():
        body["model"] = model
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(field)
        if (field in body and value is None) or (type(value) is int and 4 < value <= UINT32_MAX):
            body[field] = 4  # null is valid too, and means the rest of the context
    for field in ("max_tokens", "max_output_tokens"):  # each route ignores the other's (/v1/responses: the second)
        if field not in body:
            body[field] = 4


def run_operation(
    operation: Any,
    mode: GenerationMode,
    http: str,
    model: str,
    checks: list[Any] = CHECKS,
    examples: int = MAX_EXAMPLES,
) -> int:
    """`examples` cases of one operation in one mode, each run through `checks`; returns how many were sent."""
    sent = 0

    @given(operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    def one(case: Any) -> None:
        nonlocal sent
        if isinstance(case.body, dict):
            _cheap(case.body, model)
        sent += 1
        case.call_and_validate(base_url=http, checks=checks, timeout=120)

    try:
        one()
    except Unsatisfiable:
        # A GET has no body, and its one parameter, if any, is a free string in the path: nothing can break it.
        if mode is not GenerationMode.NEGATIVE or operation.method.upper() != "GET":
            raise
    return sent


@pytest.mark.cluster
@pytest.mark.model
def test_the_edge_keeps_to_its_openapi_document(mesh: Mesh, capsys: pytest.CaptureFixture[str]) -> None:
    schema = schemathesis.openapi.from_url(f"{mesh.http}/openapi.json")
    # A refusal of what breaks the document may also be the edge's size limit: a string under the
    # document's maxLength of characters may still be a body over the byte limit (413).
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    cases: Counter[str] = Counter()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            cases[f"{operation.method.upper()} {operation.path} {mode.value}"] = run_operation(
                operation, mode, mesh.http, mesh.model
            )
    with capsys.disabled():
        print(f"\nschemathesis: {sum(cases.values())} cases against the edge in {time.monotonic() - started:.0f} s")
        for key, count in sorted(cases.items()):
            print(f"  {key}: {count}")
    paths = {key.split()[1] for key in cases}
    assert {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/tokenize",
        "/detokenize",
    } <= paths
