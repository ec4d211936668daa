"""Every bad input gets OpenAI's error shape with the right status (fake engine, in process)."""

from __future__ import annotations

import pytest

from app.http.serve_cli import ServeConfig
from app.http.testing import FakeEngine, fake_client

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


def assert_error(response, status: int, *, contains: str = "", param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert contains.lower() in error["message"].lower(), error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture
async def client():
    async with fake_client(ServeConfig(model="fake", max_body_bytes=64 << 10)) as (client, _):
        yield client


BAD_BODIES = [
    # (path, body, status, message fragment, param)
    (CHAT, {"messages": []}, 400, "length >= 1", "messages"),
    (CHAT, {"messages": "hi"}, 400, "expected `array`", "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid enum", "messages[0].role"),
    (CHAT, {"messages": HI, "max_tokens": "many"}, 400, "expected `int", "max_tokens"),
    (CHAT, {"messages": HI, "temperature": 3}, 400, "<= 2.0", "temperature"),
    (CHAT, {"messages": HI, "n": 17}, 400, "<= 16", "n"),
    (CHAT, {"messages": HI, "n": 0}, 400, ">= 1", "n"),
    (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 21}, 400, "<= 20", "top_logprobs"),
    (CHAT, {"messages": HI, "top_logprobs": 2}, 400, "requires logprobs", "top_logprobs"),
    (CHAT, {"messages": HI, "frobnicate": 1}, 400, "unrecognized request argument", "frobnicate"),
    (CHAT, {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "not supported", "tools"),
    (CHAT, {"messages": HI, "tool_choice": "required"}, 400, "not supported", "tool_choice"),
    (CHAT, {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {}}}, 400, "not supported",
     "response_format"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "not supported", "messages[0].content[0].type"),
    (CHAT, {"messages": [{"role": "tool", "content": "42", "tool_call_id": "a"}]}, 400, "tool", "messages[0].role"),
    (CHAT, {"messages": HI, "max_tokens": 10_000}, 400, "maximum context length", "max_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 300}]}, 400, "maximum context length", None),
    (CHAT, {"messages": HI, "logit_bias": {"abc": 1}}, 400, "token ids", "logit_bias"),
    (CHAT, {"messages": HI, "logit_bias": {"99999": 1}}, 400, "outside the vocabulary", None),
    (CHAT, {"messages": HI, "logit_bias": {"5": 101}}, 400, "<= 100", None),
    (CHAT, {"messages": HI, "stop_token_ids": [99999]}, 400, "outside the vocabulary", None),
    (CHAT, {"messages": HI, "min_tokens": 20, "max_tokens": 10}, 400, "min_tokens", None),
    (CHAT, {"messages": HI, "chat_template_kwargs": {"tokenize": True}}, 400, "may not set", None),
    (CHAT, {"messages": HI, "chat_template_kwargs": {"fail": True}}, 400, "chat template", "messages"),
    (CHAT, {"messages": HI, "stream_options": {"include_usage": True}}, 400, "only be set when stream", "stream_options"),
    (CHAT, {"messages": HI, "model": "gpt-4"}, 404, "does not exist", "model"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "<= 20", "logprobs"),
    (COMPLETIONS, {"prompt": "hi", "n": 17}, 400, "<= 16", "n"),
    (COMPLETIONS, {"prompt": [5, 999999]}, 400, "outside the vocabulary", "prompt"),
    (COMPLETIONS, {"prompt": [1, "a"]}, 400, "do not mix", "prompt"),
    (COMPLETIONS, {"prompt": "", "add_special_tokens": False}, 400, "zero tokens", "prompt"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, ">= 1", "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 1000}, 400, "maximum context length", "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "suffix": "x"}, 400, "not supported", "suffix"),
    (COMPLETIONS, {"prompt": "hi", "echo": True, "logprobs": 1}, 400, "not supported", "echo"),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "not supported", "best_of"),
    (COMPLETIONS, {"prompt": "hi", "model": "nope"}, 404, "does not exist", "model"),
    (COMPLETIONS, {}, 400, "missing required field `prompt`", None),
    ("/tokenize", {"prompt": "a", "messages": HI}, 400, "exactly one", None),
    ("/detokenize", {"tokens": [-1]}, 400, ">= 0", "tokens[0]"),
    ("/detokenize", {"tokens": [5000]}, 400, "outside the vocabulary", "tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "contains", "param"), BAD_BODIES)
async def test_bad_input_is_an_openai_error(client, path, body, status, contains, param):
    assert_error(await client.post(path, json=body), status, contains=contains, param=param)


async def test_malformed_json_is_400(client):
    response = await client.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert_error(response, 400, contains="not valid JSON")


async def test_oversized_body_is_413(client):
    body = {"messages": [{"role": "user", "content": "x" * (128 << 10)}]}
    assert_error(await client.post(CHAT, json=body), 413, contains="too large")


async def test_unknown_route_is_404_in_openai_shape(client):
    response = await client.get("/v1/nothing", headers={"X-Request-Id": "lost"})
    assert_error(response, 404, contains="no route")
    assert response.headers["x-request-id"] == "lost"


async def test_api_key_guards_model_routes_but_not_health():
    async with fake_client(ServeConfig(model="fake", api_key="s3cret")) as (client, _):
        assert_error(await client.get("/v1/models"), 401, contains="missing api key")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(await client.post(CHAT, json={"messages": HI}, headers=wrong), 401, contains="incorrect")
        assert_error(await client.post("/tokenize", json={"prompt": "a"}), 401)
        assert_error(await client.get("/v1/nothing"), 401)
        right = {"Authorization": "Bearer s3cret"}
        assert (await client.get("/v1/models", headers=right)).status_code == 200
        for open_path in ("/health", "/v1/health/live", "/v1/health/ready", "/metrics", "/version", "/openapi.json"):
            assert (await client.get(open_path)).status_code == 200, open_path


async def test_full_queue_is_503_with_retry_after():
    engine = FakeEngine(max_running=0)
    async with fake_client(engine=engine) as (client, _):
        response = await client.post(CHAT, json={"messages": HI, "max_tokens": 2})
        assert_error(response, 503, contains="capacity")
        assert int(response.headers["retry-after"]) >= 1


async def test_loading_and_draining_answer_503():
    async with fake_client() as (client, _):
        state = client.app.state.server
        engine, state.engine = state.engine, None  # as while loading
        assert (await client.get("/health")).status_code == 503
        assert (await client.get("/v1/health/ready")).status_code == 503
        assert (await client.get("/v1/health/live")).status_code == 200
        assert_error(await client.post(CHAT, json={"messages": HI}), 503, contains="loading")
        state.engine, state.draining = engine, True
        response = await client.post(CHAT, json={"messages": HI})
        assert_error(response, 503, contains="shutting down")
        assert "retry-after" in response.headers
        assert (await client.get("/health")).status_code == 503


async def test_request_id_is_echoed_and_validated(client):
    response = await client.post(CHAT, json={"messages": HI, "max_tokens": 2}, headers={"X-Request-Id": "req-42"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-42"
    assert response.json()["id"] == "chatcmpl-req-42"
    generated = await client.get("/v1/models")
    assert len(generated.headers["x-request-id"]) >= 16
    assert_error(await client.get("/v1/models", headers={"X-Request-Id": "x" * 300}), 400, param="X-Request-Id")


async def test_fault_mid_stream_sends_error_event_then_done():
    engine = FakeEngine()
    engine.fail_after = 2
    async with fake_client(engine=engine) as (client, _):
        response = await client.post(CHAT, json={"messages": HI, "max_tokens": 10, "stream": True})
        assert response.status_code == 200
        events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert '"error"' in events[-2] and "fake engine fault" in events[-2]
        assert not engine.running


async def test_fault_without_stream_is_500_in_openai_shape():
    engine = FakeEngine()
    engine.fail_after = 1
    async with fake_client(engine=engine) as (client, _):
        assert_error(await client.post(CHAT, json={"messages": HI, "max_tokens": 10}), 500, contains="internal")


async def test_empty_body_is_400(client):
    assert_error(await client.post(CHAT, content=b"", headers={"content-type": "application/json"}), 400, contains="empty")
