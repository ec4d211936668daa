"""Engine behaviour a user notices: seeds, stops, n > 1, abort, Chinese text, the async API."""

from __future__ import annotations

import asyncio

import pytest

from app.engine import LLM, AsyncEngine, EngineConfig, QueueFullError, SamplingParams


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    return LLM(str(smollm2_dir), dtype="float32", quantization="none")


def test_seeded_sampling_is_the_same_whatever_else_is_in_the_batch(llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=20, seed=1234)
    alone = llm.generate(["Tell me a story about a dragon."], seeded)[0].token_ids
    others = ["Hello there", "What is 2+2?", "List three colours:", "Explain gravity to a child."]
    mixed = llm.generate(
        others[:2] + ["Tell me a story about a dragon."] + others[2:],
        [SamplingParams(temperature=1.0, max_tokens=n) for n in (5, 30)] + [seeded]
        + [SamplingParams(temperature=0.7, max_tokens=n, seed=n) for n in (12, 25)],
    )[2].token_ids
    assert alone == mixed
    different = llm.generate(["Tell me a story about a dragon."], SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, max_tokens=20, seed=4321))[0].token_ids
    assert different != alone


def test_stop_string_across_token_boundaries_is_cut_from_the_text(llm):
    prompt = "1, 2, 3, 4,"
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16))[0].text
    assert "7, 8" in full  # the stop below spans several tokens: "7", ",", " 8"
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, stop=["7, 8"]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == "7, 8"
    assert out.text == full[: full.index("7, 8")]
    kept = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, stop=["7, 8"],
                                                 include_stop_str_in_output=True))[0]
    assert kept.text == full[: full.index("7, 8") + len("7, 8")]


def test_stop_token_ids_max_tokens_and_ignore_eos(llm):
    ids = llm.tokenizer.encode("1, 2, 3, 4,")
    full = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=10))[0]
    at = next(i for i, t in enumerate(full.token_ids) if i > 0 and t not in full.token_ids[:i])
    stop_id = full.token_ids[at]
    out = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == full.token_ids[: at + 1] and out.outputs[0].stop_reason == stop_id
    assert out.finish_reason == "stop"
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}])
    ended = llm.generate([chat], SamplingParams(temperature=0.0, max_tokens=200))[0]
    assert ended.finish_reason == "stop" and ended.token_ids[-1] in llm.tokenizer.eos_token_ids
    forced = llm.generate([chat], SamplingParams(temperature=0.0, max_tokens=len(ended.token_ids) + 5,
                                                 ignore_eos=True))[0]
    assert forced.finish_reason == "length"


def test_chinese_round_trips_and_streams_without_broken_characters(llm):
    text = "你好，你好吗？"
    ids = llm.tokenizer.encode(text)
    assert llm.tokenizer.decode(ids) == text
    out = llm.generate([llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])],
                       SamplingParams(temperature=0.0, max_tokens=30))[0]
    assert "\ufffd" not in out.text
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_n_samples_share_the_prompt_blocks(llm):
    prompt = "Once upon a time, in a land far far away, there lived a king who had three daughters."
    hits_before = llm.engine.block_manager.prefix_hits
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7))[0]
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 12 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    n_prompt = len(llm.tokenizer.encode(prompt))
    assert llm.engine.block_manager.prefix_hits - hits_before >= 2 * (n_prompt // 16) * 16


def test_logit_bias_forces_a_token(llm):
    token = llm.tokenizer.encode(" banana")[0]
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=3, logit_bias={token: 100}))[0]
    assert out.token_ids == [token] * 3


def test_invalid_requests_say_what_to_change(llm):
    with pytest.raises(ValueError, match="maximum context length"):
        llm.generate([[1] * 10], SamplingParams(max_tokens=llm.engine.max_model_len))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[10**7]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        llm.generate(["hi"], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate(["hi"], SamplingParams(logprobs=21))
    assert not llm.engine.has_work()


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    eng = AsyncEngine.from_config(EngineConfig(model=str(smollm2_dir), dtype="float32", quantization="none",
                                               max_waiting=4))
    yield eng
    eng.shutdown()


async def test_async_generate_streams_deltas_that_add_up(engine, llm):
    ids = engine.tokenizer.encode("The capital of France is")
    params = SamplingParams(temperature=0.0, max_tokens=12)
    text, tokens, last = "", [], None
    async for out in engine.generate(ids, params):
        for c in out.outputs:
            text += c.text
            tokens += c.token_ids
        last = out
    assert last.finished and last.finish_reason == "length"
    offline = llm.generate([ids], params)[0]
    assert tokens == offline.token_ids and text == offline.text


async def test_abort_mid_stream_frees_every_block(engine):
    ids = engine.tokenizer.encode("Write a long essay about the history of Rome.")
    gens = [engine.generate(ids, SamplingParams(temperature=0.8, max_tokens=500, ignore_eos=True)) for _ in range(3)]
    for g in gens:
        await g.__anext__()
    assert engine.stats().kv_cache_usage > 0
    for g in gens:
        await g.aclose()  # what a client disconnect does
    for _ in range(100):
        if engine.stats().kv_cache_usage == 0 and engine.stats().num_running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().kv_cache_usage == 0.0 and engine.stats().num_running == 0


async def test_abort_by_id_ends_the_stream_with_abort(engine):
    ids = engine.tokenizer.encode("Count to one thousand:")
    stream = engine.generate(ids, SamplingParams(max_tokens=400, ignore_eos=True), request_id="to-abort")
    first = await stream.__anext__()
    assert not first.finished
    engine.abort("to-abort")
    reasons = [c.finish_reason async for out in stream for c in out.outputs]
    assert reasons[-1] == "abort"


async def test_full_waiting_queue_is_refused(engine):
    ids = engine.tokenizer.encode("hi")
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    # Fill the queue (max_waiting=4) without letting the engine thread drain it: one more is refused.
    engine.core.scheduler.waiting.extend([object()] * 4)  # type: ignore[list-item]
    try:
        with pytest.raises(QueueFullError, match="waiting queue is full"):
            await engine.generate(ids, params).__anext__()
    finally:
        for _ in range(4):
            engine.core.scheduler.waiting.pop()
