"""OpenAI response shapes, SSE framing, metrics and the request log (fake engine, in process)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from app.http.generation import ClientDisconnected, race_disconnect
from app.http.sse import _SSEApp
from app.http.testing import FakeEngine, fake_client

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


def sse_events(text: str) -> list:
    payloads = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


@pytest.fixture
async def client():
    async with fake_client() as (client, _):
        yield client


async def test_chat_answer_has_openai_shape_and_usage(client):
    body = (await client.post(CHAT, json={"messages": HI, "max_tokens": 4, "n": 3, "seed": 7})).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant"
        assert len(choice["message"]["content"]) == 4
        assert choice["finish_reason"] == "length"
    prompt_tokens = (await client.post("/tokenize", json={"messages": HI})).json()["count"]
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == prompt_tokens + 12


async def test_chat_stream_sends_role_first_then_content_then_finish_then_done(client):
    request = {"messages": HI, "max_tokens": 3, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    response = await client.post(CHAT, json=request)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    for index in (0, 1):
        mine = [e["choices"][0] for e in events[2:] if e["choices"] and e["choices"][0]["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in mine[:-1]) != ""
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "length"
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6


async def test_chat_stream_without_usage_option_has_no_usage_key(client):
    response = await client.post(CHAT, json={"messages": HI, "max_tokens": 2, "stream": True})
    assert all("usage" not in e for e in sse_events(response.text))


async def test_chat_logprobs_list_top_alternatives(client):
    request = {"messages": HI, "max_tokens": 3, "logprobs": True, "top_logprobs": 3}
    content = (await client.post(CHAT, json=request)).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for token in content:
        assert token["bytes"] == list(token["token"].encode())
        assert 1 <= len(token["top_logprobs"]) <= 3
        assert token["top_logprobs"][0]["logprob"] >= token["top_logprobs"][-1]["logprob"]


async def test_completion_echo_batch_and_logprobs(client):
    body = (await client.post(COMPLETIONS, json={"prompt": ["ab", "cd"], "max_tokens": 2, "n": 2, "echo": True})).json()
    assert body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"][:2] for c in body["choices"]] == ["ab", "ab", "cd", "cd"]
    assert body["usage"]["completion_tokens"] == 8
    body = (await client.post(COMPLETIONS, json={"prompt": [3 + ord("x")], "max_tokens": 3, "logprobs": 2})).json()
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 3
    assert logprobs["text_offset"] == [0, 1, 2]
    assert "".join(logprobs["tokens"]) == body["choices"][0]["text"]


async def test_completion_stream_with_echo_and_usage(client):
    request = {"prompt": "ab", "max_tokens": 3, "echo": True, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events((await client.post(COMPLETIONS, json=request)).text)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text.startswith("ab") and len(text) == 5
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 0}
    }  # fmt: skip


async def test_stop_string_ends_with_reason(client):
    body = (await client.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 50, "stop": [" "], "seed": 1})).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == " "
    assert " " not in choice["text"]


async def test_models_tokenize_detokenize_version(client):
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake"
    assert models["data"][0]["max_model_len"] == 256
    tok = (await client.post("/tokenize", json={"prompt": "hé", "return_token_strs": True})).json()
    assert tok["count"] == len(tok["tokens"]) == 4 and tok["max_model_len"] == 256
    assert len(tok["token_strs"]) == 4
    assert (await client.post("/detokenize", json={"tokens": tok["tokens"][1:]})).json() == {"prompt": "hé"}
    assert (await client.get("/version")).json()["version"]


async def test_metrics_use_vllm_names_labelled_by_model(client):
    await client.post(CHAT, json={"messages": HI, "max_tokens": 2})
    text = (await client.get("/metrics")).text
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
    ):  # fmt: skip
        assert f'{name}{{model_name="fake"}}' in text, name
    assert 'vllm:request_success_total{finished_reason="length",model_name="fake"} 1.0' in text


async def test_one_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="app.http.requests"):
        await client.post(CHAT, json={"messages": HI, "max_tokens": 3}, headers={"X-Request-Id": "log-me"})
        await client.post(CHAT, json={"messages": HI, "n": 99}, headers={"X-Request-Id": "bad-one"})
        await client.post(CHAT, json={"messages": HI, "model": "x"}, headers={"X-Request-Id": "no-model"})
    records = [r for r in caplog.records if r.name == "app.http.requests"]
    by_id = {r.request_id: r for r in records}
    ok = by_id["log-me"]
    assert (ok.status, ok.model, ok.completion_tokens, ok.prompt_tokens > 0) == (200, "fake", 3, True)
    assert ok.ttft_s is not None and ok.total_s >= ok.ttft_s and ok.adapter is None
    assert by_id["no-model"].status == 404
    assert "bad-one" not in by_id  # rejected by the schema before the handler ran


async def test_race_disconnect_cancels_work_when_client_leaves():
    cancelled = asyncio.Event()

    async def work():
        try:
            await asyncio.sleep(10)
        finally:
            cancelled.set()

    async def receive():
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    with pytest.raises(ClientDisconnected):
        await race_disconnect(receive, work())
    assert cancelled.is_set()


async def test_sse_app_closes_events_and_reports_499_on_disconnect():
    closed, sent, statuses = asyncio.Event(), [], []

    async def events():
        try:
            while True:
                yield b"data: {}\n\n"
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async def receive():
        await asyncio.sleep(0.02)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def on_close(status):
        statuses.append(status)

    await _SSEApp(events(), on_close, {"x-request-id": "r"})({}, receive, send)
    assert closed.is_set() and statuses == [499]
    assert sent[0]["status"] == 200 and (b"x-request-id", b"r") in sent[0]["headers"]


async def test_sse_app_cleans_up_when_client_is_gone_before_the_first_byte():
    statuses, started = [], []

    async def events():
        started.append(True)
        yield b"data: {}\n\n"

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("connection reset")

    async def on_close(status):
        statuses.append(status)

    await _SSEApp(events(), on_close, {})({}, receive, send)
    assert statuses == [499] and not started


async def test_abort_all_ends_requests_in_flight_with_abort():
    engine = FakeEngine(step_delay=0.005)
    async with fake_client(engine=engine) as (client, _):
        state = client.app.state.server
        task = asyncio.ensure_future(client.post(CHAT, json={"messages": HI, "max_tokens": 200}))
        for _ in range(400):
            if state.in_flight:
                break
            await asyncio.sleep(0.005)
        state.abort_all()
        response = await task
        assert state.in_flight == 0 and not engine.running
        assert response.status_code == 200
        assert response.json()["choices"][0]["finish_reason"] == "abort"


async def test_continue_final_message_ends_the_prompt_inside_that_message(client):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    tokens = (await client.post("/tokenize", json=body)).json()["tokens"]
    assert bytes(t - 3 for t in tokens).decode().endswith("<assistant>Once upon")
