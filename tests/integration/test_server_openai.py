"""The official openai client against a real server on SmolLM2: what an OpenAI user would notice."""

from __future__ import annotations

import json

import pytest

MODEL = "smollm2"
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def test_models_lists_the_served_name(openai_client):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_answer_with_usage_equal_to_the_tokenizer(openai_client, hf_tokenizer):
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, temperature=0, logprobs=True
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    text = hf_tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    prompt_ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(choice.logprobs.content) <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_is_role_then_content_then_finish(openai_client):
    stream = openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    whole = openai_client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0)
    assert text == whole.choices[0].message.content


def test_completion_streamed_and_whole_agree(openai_client, hf_tokenizer):
    prompt = "The capital of France is"
    whole = openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    assert whole.object == "text_completion"
    assert whole.usage.prompt_tokens == len(hf_tokenizer(prompt)["input_ids"])
    assert whole.usage.completion_tokens == 5 or whole.choices[0].finish_reason == "stop"
    stream = openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text


def test_n_choices_and_completion_logprobs(openai_client):
    reply = openai_client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=4, n=2, temperature=1.0, logprobs=2, seed=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sorted(c.index for c in reply.choices) == [0, 1]
    for choice in reply.choices:
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
        assert "".join(logprobs.tokens) == choice.text
        assert all(lp <= 0 for lp in logprobs.token_logprobs)
        assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    assert reply.usage.completion_tokens == 8


def test_chat_top_logprobs(openai_client):
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, logprobs=True, top_logprobs=3, temperature=0
    )
    for token in reply.choices[0].logprobs.content:
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.top_logprobs[-1].logprob
        assert token.token == token.top_logprobs[0].token  # greedy: the sampled token is the best one


def test_stop_string_ends_the_answer(openai_client):
    reply = openai_client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 7"]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and " 7" not in choice.text
    assert choice.model_extra.get("stop_reason") == " 7"


def test_seed_makes_sampling_reproducible(openai_client):
    def sample(seed: int) -> str:
        return openai_client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0, seed=seed
        ).choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_chinese_text_round_trips(openai_client, http):
    messages = [{"role": "user", "content": "请用中文回答：天空是什么颜色？"}]
    reply = openai_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content and "\ufffd" not in reply.choices[0].message.content
    tokens = http.post("/tokenize", json={"prompt": "天空是蓝色的"}).json()
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "天空是蓝色的"


def test_tokenize_counts_match_the_tokenizer(http, hf_tokenizer):
    answer = http.post("/tokenize", json={"prompt": "Hello world, 你好", "return_token_strs": True}).json()
    assert answer["tokens"] == hf_tokenizer("Hello world, 你好")["input_ids"]
    assert answer["count"] == len(answer["tokens"]) == len(answer["token_strs"])
    assert answer["max_model_len"] == 1024
    chat = http.post("/tokenize", json={"messages": HELLO}).json()
    assert chat["count"] > answer["count"]
    ongoing = [*HELLO, {"role": "assistant", "content": "Hello! I am"}]
    body = {"messages": ongoing, "add_generation_prompt": False, "continue_final_message": True}
    text = hf_tokenizer.apply_chat_template(ongoing, continue_final_message=True, tokenize=False)
    assert http.post("/tokenize", json=body).json()["tokens"] == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_vllm_extras_are_honoured(openai_client):
    reply = openai_client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=6, temperature=0.8, seed=5,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 6, "ignore_eos": True,
                    "stop_token_ids": [2], "skip_special_tokens": True, "include_stop_str_in_output": False},
        frequency_penalty=0.5, presence_penalty=0.5, logit_bias={"28": -100},
    )  # fmt: skip
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"


def test_max_completion_tokens_bounds_the_answer(openai_client):
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=HELLO, max_completion_tokens=2, extra_body={"ignore_eos": True}
    )
    assert reply.usage.completion_tokens == 2 and reply.choices[0].finish_reason == "length"


def test_request_id_is_echoed_and_logged(openai_client, server):
    raw = openai_client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=2, extra_headers={"X-Request-Id": "it-request-1"}
    )
    assert raw.headers["x-request-id"] == "it-request-1"
    assert raw.parse().id == "chatcmpl-it-request-1"
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    logged = [e for e in lines if e.get("logger") == "app.http.requests" and e.get("request_id") == "it-request-1"]
    assert len(logged) == 1
    entry = logged[0]
    assert (entry["status"], entry["model"], entry["completion_tokens"]) == (200, MODEL, 2)
    assert entry["prompt_tokens"] > 0 and entry["ttft_s"] is not None and entry["total_s"] > 0


@pytest.mark.parametrize("path", ["/health", "/v1/health/live", "/v1/health/ready", "/version", "/openapi.json"])
def test_open_routes_answer_without_a_key(server, path):
    import httpx

    assert httpx.get(server.base_url + path, timeout=10).status_code == 200


def test_metrics_count_what_was_served(http):
    text = http.get("/metrics").text
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total"):
        line = next((ln for ln in text.splitlines() if ln.startswith(name + '{model_name="smollm2"}')), None)
        assert line is not None and float(line.split()[-1]) > 0, name
    assert 'vllm:request_success_total{finished_reason="length",model_name="smollm2"}' in text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total"):
        assert name + '{model_name="smollm2"}' in text, name
