"""Bad input against the real server: OpenAI's error shape, the right status, a message that helps."""

from __future__ import annotations

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        (CHAT, {"messages": []}, 400, "length >= 1"),
        (CHAT, {"messages": HI, "max_tokens": "ten"}, 400, "expected `int"),
        (CHAT, {"messages": HI, "n": 17}, 400, "<= 16"),
        (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 21}, 400, "<= 20"),
        (CHAT, {"messages": HI, "max_tokens": 1020}, 400, "maximum context length is 1024"),
        (CHAT, {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "not supported"),
        (CHAT, {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {}}}, 400, "not supported"),
        (CHAT, {"messages": HI, "model": "gpt-4o"}, 404, "does not exist"),
        (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "<= 20"),
        (COMPLETIONS, {"prompt": [1, 2, 49152]}, 400, "outside the vocabulary"),
        (COMPLETIONS, {"prompt": "hi " * 1100, "max_tokens": 1}, 400, "maximum context length"),
        (COMPLETIONS, {"prompt": "hi", "logit_bias": {"49152": 1}}, 400, "outside the vocabulary"),
        ("/detokenize", {"tokens": [10**6]}, 400, "outside the vocabulary"),
    ],
)  # fmt: skip
def test_bad_input(http, path, body, status, fragment):
    error = error_of(http.post(path, json=body), status)
    assert fragment.lower() in error["message"].lower()


def test_malformed_json(http):
    error = error_of(http.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"}), 400)
    assert "not valid json" in error["message"].lower()


def test_oversized_body_is_413(http):
    error_of(http.post(CHAT, json={"messages": [{"role": "user", "content": "x" * (2 << 20)}]}), 413)


def test_missing_or_wrong_key_is_401(server):
    assert error_of(httpx.post(server.base_url + CHAT, json={"messages": HI}), 401)["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer wrong"}
    error_of(httpx.get(server.base_url + "/v1/models", headers=wrong), 401)


def test_unknown_route_is_404(http):
    error_of(http.get("/v1/embeddingz"), 404)
