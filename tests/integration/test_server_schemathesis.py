"""Schemathesis over the server's own OpenAPI schema: no input, valid or not, gets a 5xx.

Bounded to run in about a minute on two cores: few examples per operation, no shrinking, and
generation capped (max_tokens <= 4, n <= 2) so the fuzzer spends its time on inputs, not decoding.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from collections import Counter  # noqa: E402

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

MAX_EXAMPLES = {"POST": 120, "GET": 5}
GENERATING = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def schema(server, auth):
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", headers=auth)


def _is_number(value: object) -> bool:  # JSON Schema integers include 4.0
    return isinstance(value, (int, float)) and not isinstance(value, bool)


UNSERVED = ("tools", "tool_choice", "functions", "function_call", "response_format", "suffix", "best_of")


def cap_generation(path: str, body: object, *, valid: bool) -> None:
    """Keep generating requests cheap (a few tokens, at most two choices); for valid input, also
    drop the parameters we answer 400 to on purpose (the unit tests cover those) so the fuzzer
    reaches the engine."""
    if path not in GENERATING or not isinstance(body, dict):
        return
    keys = ("max_tokens", "max_completion_tokens") if path.endswith("chat/completions") else ("max_tokens",)
    present = [k for k in keys if k in body and body[k] is not None]
    for key in present:
        if _is_number(body[key]) and body[key] > 4:
            body[key] = 4
    if not present:
        body["max_tokens"] = 4
    if _is_number(body.get("n")) and body["n"] > 2:
        body["n"] = 2
    if _is_number(body.get("min_tokens")) and body["min_tokens"] > 4:
        body["min_tokens"] = 4
    if not valid:
        return
    for key in UNSERVED:
        body.pop(key, None)
    if body.get("top_logprobs") is not None:
        body["logprobs"] = True
    if body.get("echo") and body.get("logprobs") is not None:
        body["echo"] = False
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            if message.get("role") in ("tool", "function"):
                message["role"] = "user"
            for key in ("audio", "tool_calls", "function_call"):
                message.pop(key, None)


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_input_gets_a_server_error(schema, server, auth, mode):
    failures: list[str] = []
    statuses: Counter[str] = Counter()
    for operation in operations(schema):

        @settings(
            max_examples=MAX_EXAMPLES.get(operation.method.upper(), 5),
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            cap_generation(operation.path, case.body, valid=mode == GenerationMode.POSITIVE)
            response = case.call(base_url=server.base_url, headers=auth, timeout=60)
            statuses[f"{case.method} {case.path} {response.status_code}"] += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r:.600} -> {response.status_code} {response.text[:300]}")

        try:
            run()
        except Unsatisfiable:  # no invalid input exists for an operation without parameters
            assert mode == GenerationMode.NEGATIVE
    print(f"\n{mode}: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
    assert not failures, "\n".join(failures[:10])
