"""The tokenizer layer: encode/decode, incremental detokenization, stop strings, chat templates."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from app.engine.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

CHINESE = "你好，你好吗？"


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def hf(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def _copy_tokenizer(src: Path, dst: Path, chat_template: bool = True) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    if not chat_template:
        config.pop("chat_template", None)
    elif (src / "chat_template.jinja").is_file():
        shutil.copy(src / "chat_template.jinja", dst / "chat_template.jinja")
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


# -- basics ------------------------------------------------------------------------------------------------


def test_basic_attributes(tok: Tokenizer, hf):
    assert tok.vocab_size == len(hf) == 49152
    assert tok.bos_token_id == hf.bos_token_id
    assert hf.eos_token_id in tok.eos_token_ids
    assert set(hf.all_special_ids) <= tok.all_special_ids
    assert tok.has_chat_template


@pytest.mark.parametrize(
    "text", ["Hello world", " leading space", "multi\nline\n\ttabs  ", CHINESE, "emoji 🙂 ok", "<|im_start|>user\nhi", ""]
)
def test_encode_decode_round_trip(tok: Tokenizer, hf, text: str):
    for flag in (True, False):
        assert tok.encode(text, add_special_tokens=flag) == hf.encode(text, add_special_tokens=flag)
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens_skipped(tok: Tokenizer):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_add_special_tokens_follows_hf(smollm2_dir: Path, hf):
    from tokenizers.processors import TemplateProcessing

    t = Tokenizer.from_pretrained(smollm2_dir)
    # A tokenizer whose post-processor adds BOS: encode follows it, and only with add_special_tokens.
    t._backend.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    assert t.encode("hi") == t._hf.encode("hi") and t.encode("hi")[0] == 1
    assert t.encode("hi", add_special_tokens=False) == hf.encode("hi", add_special_tokens=False)


def test_bad_inputs_raise_value_error(tok: Tokenizer):
    with pytest.raises(ValueError, match="string"):
        tok.encode(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token ids"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="vocabulary"):
        tok.token_text(10**7)
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_pretrained("/nonexistent/model/folder")


def test_token_text(tok: Tokenizer):
    ids = tok.encode("Hello world")
    assert [tok.token_text(i) for i in ids] == ["Hello", " world"]  # 'Ġworld' turned into real text
    assert tok.token_text(2) == "<|im_end|>"
    pieces = [tok.token_text(i) for i in tok.encode(CHINESE)]
    assert "，" in pieces
    partial = [p for p in pieces if p.startswith("bytes:")]
    assert partial and all("\ufffd" not in p for p in pieces)
    assert partial[0] == "bytes:\\xe4\\xbd"  # the first two bytes of 你 (e4 bd a0)


# -- incremental detokenization ----------------------------------------------------------------------------


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], skip: bool = True) -> list[str]:
    d = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    pieces = [d.add(i) for i in ids]
    pieces.append(d.flush())
    assert d.text == "".join(pieces)
    return pieces


def test_incremental_equals_full_decode_random(tok: Tokenizer):
    rng = random.Random(1234)
    for n in range(200):
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 12))]
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        if n % 4 == 0:  # mix in special tokens
            ids[rng.randrange(len(ids))] = rng.randrange(17)
        skip = n % 2 == 0
        assert "".join(_stream(tok, prompt, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), (prompt, ids)


def test_incremental_real_text(tok: Tokenizer):
    text = "The quick brown fox — 日本語 🙂 and\nnew lines,   spaces; 你好！ done."
    prompt = tok.encode("<|im_start|>user\nWrite something<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    pieces = _stream(tok, prompt, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_chinese_never_broken(tok: Tokenizer):
    ids = tok.encode(CHINESE)
    assert len(ids) > len(CHINESE)  # byte-level BPE: characters span several tokens
    for prompt in ([], tok.encode("Say hello in Chinese:")):
        d = IncrementalDetokenizer(tok, prompt)
        pieces = [d.add(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces), pieces
        assert "".join(pieces) == CHINESE == d.text
        assert [p for p in pieces if p] == list(CHINESE)
        assert d.flush() == ""


def test_incremental_prompt_ending_mid_character(tok: Tokenizer):
    ids = tok.encode(CHINESE)
    prompt, gen = ids[:1], ids[1:]  # the prompt ends inside 你
    assert "".join(_stream(tok, prompt, gen)) == tok.decode(gen)


def test_incremental_skips_special_tokens(tok: Tokenizer):
    ids = tok.encode("Hi there") + [2]
    assert "".join(_stream(tok, [], ids)) == "Hi there"
    assert "".join(_stream(tok, [], ids, skip=False)) == "Hi there<|im_end|>"


# -- stop strings ------------------------------------------------------------------------------------------


def _feed_all(m: StopStringMatcher, pieces: list[str]) -> tuple[str, str | None, list[str]]:
    out, emitted = [], []
    for p in pieces:
        text, stop = m.feed(p)
        emitted.append(text)
        out.append(text)
        if stop is not None:
            return "".join(out), stop, emitted
    out.append(m.flush())
    return "".join(out), None, emitted


def test_stop_across_pieces():
    m = StopStringMatcher(["lo w"])
    assert m.feed("Hel") == ("He", None)  # "l" may start "lo w": held back
    assert m.feed("lo wor") == ("l", "lo w")  # "Hello wor": matched across the boundary, "Hel" emitted in all
    assert m.feed("ld") == ("", None)  # nothing after a stop is ever emitted
    assert m.flush() == ""


def test_stop_across_pieces_include():
    out, stop, _ = _feed_all(StopStringMatcher(["lo w"], include_stop_str_in_output=True), ["Hel", "lo wor", "ld"])
    assert (out, stop) == ("Hello w", "lo w")


def test_held_back_prefix_released():
    m = StopStringMatcher(["lo w"])
    assert m.feed("Hel") == ("He", None)
    assert m.feed("lo") == ("l", None)  # "Hello": the first "l" is released, "lo" is still a prefix of "lo w"
    assert m.feed(" there") == ("lo there", None)  # "lo " then "t": not a stop after all
    assert m.feed("l") == ("", None)
    assert m.flush() == "l"  # finished without a match: the held-back text comes out


def test_no_stops_passthrough():
    m = StopStringMatcher([])
    assert m.feed("abc") == ("abc", None)
    assert m.flush() == ""
    assert StopStringMatcher(["", "x"]).stops == ["x"]


def test_multiple_stops_earliest_wins():
    out, stop, _ = _feed_all(StopStringMatcher(["world", "lo"]), ["Hello ", "world"])
    assert (out, stop) == ("Hel", "lo")
    out, stop, _ = _feed_all(StopStringMatcher(["STOP", "END"]), ["a END b STOP c"])
    assert (out, stop) == ("a ", "END")
    out, stop, _ = _feed_all(StopStringMatcher(["b", "ab"]), ["xa", "b"])  # same end: the earlier start wins
    assert (out, stop) == ("x", "ab")
    out, stop, _ = _feed_all(StopStringMatcher(["ab", "abc"], include_stop_str_in_output=True), ["xabcd"])
    assert (out, stop) == ("xab", "ab")


def test_stop_independent_of_chunking():
    rng = random.Random(7)
    alphabet = "ab c\n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
        for include in (False, True):
            whole = _feed_all(StopStringMatcher(stops, include), [text])[:2]
            cuts = sorted(rng.sample(range(1, len(text) + 1), k=min(len(text), rng.randrange(1, 6))))
            pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)]) if j > i]
            assert _feed_all(StopStringMatcher(stops, include), pieces)[:2] == whole, (text, stops, pieces)
            out, stop = whole
            if stop is None:
                assert out == text
            else:
                i = out.find(stop) if include else len(out)
                assert text.startswith(out) and (stop in out) == include
                assert all(s not in text[: i + len(stop) - 1] for s in stops)


def test_stop_held_text_never_emitted_before_match():
    m = StopStringMatcher(["</answer>"])
    emitted = []
    for ch in "42</ans":
        emitted.append(m.feed(ch)[0])
    assert "".join(emitted) == "42"
    assert m.feed("wer> trailing") == ("", "</answer>")


# -- chat template -----------------------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "你好 — tell me a joke"},
    ],
]


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf, chat, add_generation_prompt):
    expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected


CUSTOM_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for message in messages %}
  {% if message['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}
  {% set ns.n = ns.n + 1 %}
  [{{ ns.n }}] {{ message['role'] }}: {{ message['content'] }}
  {% if message.tool_calls is defined %}{{ message.tool_calls | tojson }}{% endif %}
  {% if loop.index > 10 %}{% break %}{% endif %}
{% endfor %}
{% if tools %}TOOLS {{ tools | tojson(indent=2) }}{% endif %}
{% generation %}{% if add_generation_prompt %}assistant ({{ strftime_now('%Y') | length }}):{% endif %}{% endgeneration %}
{{ eos_token }}"""


def test_custom_template_features_match_transformers(tok: Tokenizer, hf):
    custom = Tokenizer(hf)
    custom.chat_template = CUSTOM_TEMPLATE
    chat = [
        {"role": "user", "content": "ü <b>&</b>"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"x": "é"}}]},
    ]
    tools = [{"type": "function", "function": {"name": "f"}}]
    expected = hf.apply_chat_template(
        chat, chat_template=CUSTOM_TEMPLATE, tokenize=False, add_generation_prompt=True, tools=tools
    )
    assert custom.apply_chat_template(chat, tools=tools) == expected
    with pytest.raises(ValueError, match="bad role robot"):
        custom.apply_chat_template([{"role": "robot", "content": "x"}])


def test_template_errors_are_value_errors(tok: Tokenizer, hf):
    broken = Tokenizer(hf)
    broken.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(ValueError, match="chat template"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="messages"):
        tok.apply_chat_template("hello")  # type: ignore[arg-type]


def test_missing_chat_template(smollm2_dir: Path, tmp_path: Path):
    t = Tokenizer.from_pretrained(_copy_tokenizer(smollm2_dir, tmp_path / "m", chat_template=False))
    assert not t.has_chat_template
    with pytest.raises(ValueError, match="the model has no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


# -- eos ids -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [([2, 0, 7], {0, 2, 7}), (5, {2, 5})])
def test_eos_ids_include_generation_config(smollm2_dir: Path, tmp_path: Path, value, expected):
    folder = _copy_tokenizer(smollm2_dir, tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": value, "bos_token_id": 1}))
    t = Tokenizer.from_pretrained(folder)
    assert t.eos_token_ids == expected


def test_eos_ids_without_generation_config(smollm2_dir: Path, tmp_path: Path):
    t = Tokenizer.from_pretrained(_copy_tokenizer(smollm2_dir, tmp_path / "m"))
    assert t.eos_token_ids == {2}
