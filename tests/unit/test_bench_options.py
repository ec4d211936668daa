"""Settings of the benchmark: compound flags, checks, the YAML file, precedence, the log folder."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from bench.serving.cli import build_parser, options_from_args
from bench.serving.config_runner import load_config, settings_from_mapping
from bench.serving.options import (
    BenchOptions,
    OptionError,
    parse_float,
    parse_goodput,
    parse_lora,
    parse_sweep,
    resolve_log_dir,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "bench" / "examples" / "performance_config.yaml"


def opts_of(argv: list[str]) -> BenchOptions:
    return options_from_args(build_parser().parse_args(argv))


def test_defaults_match_the_issue(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    o = opts_of(["--model", "m"])
    assert o.server_url == "http://0.0.0.0:8000"
    assert (o.num_prompts, o.max_tokens, o.temperature, o.concurrent_requests) == (10, 100, 0.7, 1)
    assert o.stream is True and o.log_dir == "/opt/mim/log" and o.save is True and o.save_individual is False
    assert math.isinf(o.request_rate) and o.burstiness == 1.0 and o.dataset_name == "prompts"
    assert o.api_key is None


def test_flags(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    o = opts_of(["--model", "m", "--no-stream", "--no-save", "--save-individual", "--request-rate", "4",
                 "--burstiness", "0.5", "--dataset", "random", "--input-len", "32", "--output-len", "8",
                 "--lora", "a:3,b:1", "--goodput", "ttft:500", "tpot:50", "--sweep", "1,2,4", "--json",
                 "--lang", "zh", "--endpoint", "completions", "--max-concurrency", "3"])  # fmt: skip
    assert o.stream is False and o.save is False and o.save_individual is True
    assert o.request_rate == 4.0 and o.burstiness == 0.5
    assert o.lora == {"a": 3.0, "b": 1.0} and o.goodput == {"ttft": 500.0, "tpot": 50.0}
    assert o.sweep == [1, 2, 4] and o.json and o.lang == "zh" and o.concurrent_requests == 3
    assert o.api_key == "env-key" and o.completion_tokens_target == 8
    assert opts_of(["--model", "m", "--stream"]).stream is True


def test_model_required():
    with pytest.raises(OptionError, match="--model is required"):
        opts_of([])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-prompts", "0"], "num-prompts"),
        (["--request-rate", "0"], "request-rate"),
        (["--request-rate", "fast"], "not a number"),
        (["--burstiness", "-1"], "burstiness"),
        (["--dataset", "sharegpt"], "dataset-path"),
        (["--server-url", "localhost:8000"], "http://"),
        (["--goodput", "ttft500"], "KEY:MILLISECONDS"),
        (["--goodput", "latency:5"], "not one of"),
        (["--sweep", "1,x"], "integers"),
        (["--sweep", "0,2"], "at least 1"),
        (["--lora", "a:-1"], "positive"),
        (["--temperature", "3"], "temperature"),
    ],
)
def test_bad_settings(argv, message):
    with pytest.raises(OptionError, match=message):
        opts_of(["--model", "m", *argv])


def test_parsers():
    assert parse_float("inf") == math.inf and parse_float(2) == 2.0
    assert parse_sweep([1, 2]) == [1, 2] and parse_sweep(" 1, 8 ") == [1, 8]
    assert parse_goodput({"e2el": 1000}) == {"e2el": 1000.0}
    assert parse_goodput("ttft:1 e2el:2") == {"ttft": 1.0, "e2el": 2.0}
    assert parse_lora("sql") == {"sql": 1.0}
    assert parse_lora({"sql": 2, "chat": 1}) == {"sql": 2.0, "chat": 1.0}
    assert parse_lora(["org/adapter:1", "x"]) == {"org/adapter": 1.0, "x": 1.0}


def test_example_config_loads():
    settings = load_config(EXAMPLE)
    o = BenchOptions()
    for key, value in settings.items():
        setattr(o, key, value)
    o.check()
    assert o.model and o.server_url.startswith("http")
    assert o.prompts and all(isinstance(p, str) for p in o.prompts)


def test_config_sections_and_prompt_forms(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    data = {
        "server": {"url": "http://h:1", "model": "m", "api_key": "k", "endpoint": "completions"},
        "test_params": {"num_prompts": "5", "stream": "false", "request_rate": "inf", "lora": {"a": 1}, "sweep": [1, 2]},
        "prompts": {"file": "p.txt"},
        "output": {"log_dir": "/x", "save_individual": True, "plot": False, "lang": "zh"},
    }
    s = settings_from_mapping(data, tmp_path)
    assert s["server_url"] == "http://h:1" and s["api_key"] == "k" and s["num_prompts"] == 5 and s["stream"] is False
    assert s["prompts_file"] == str(tmp_path / "p.txt") and s["lora"] == {"a": 1.0} and s["sweep"] == [1, 2]
    assert s["save_individual"] is True and s["plot"] is False and s["lang"] == "zh"
    assert settings_from_mapping({"prompts": ["a", "b"]})["prompts"] == ["a", "b"]
    for bad, message in (
        ({"servers": {}}, "unknown section"),
        ({"test_params": {"num_promts": 1}}, "unknown key"),
        ({"prompts": {"path": "x"}}, "prompts must be"),
        ({"test_params": {"stream": "maybe"}}, "true or false"),
        ([1, 2], "mapping"),
    ):
        with pytest.raises(OptionError, match=message):
            settings_from_mapping(bad)


def test_command_line_beats_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server: {model: from-yaml, url: 'http://a:1'}\ntest_params: {num_prompts: 7, max_tokens: 9}\n")
    o = opts_of(["--config", str(path), "--num-prompts", "3"])
    assert (o.model, o.server_url, o.num_prompts, o.max_tokens) == ("from-yaml", "http://a:1", 3, 9)
    with pytest.raises(OptionError, match="cannot read"):
        opts_of(["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "bad.yaml").write_text("server: [\n")
    with pytest.raises(OptionError, match="not valid YAML"):
        opts_of(["--config", str(tmp_path / "bad.yaml")])


def test_log_dir_fallback(tmp_path, monkeypatch):
    ok, warning = resolve_log_dir(str(tmp_path / "logs"))
    assert ok == tmp_path / "logs" and ok.is_dir() and warning is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MXEXT_HOME", str(tmp_path / "home"))
    folder, warning = resolve_log_dir(str(blocker / "sub"))  # a file in the way: not creatable
    assert folder == tmp_path / "home" / "bench-logs" and "not writable" in warning
    assert os.access(folder, os.W_OK)


def test_mxext_bench_registration():
    """app.bench_cli.add_parser on a top-level parser, as app/cli.py registers it."""
    import argparse

    from app.bench_cli import add_parser

    top = argparse.ArgumentParser(prog="mxext")
    sub = top.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = top.parse_args(["bench", "--model", "m", "--sweep", "1,2", "--no-stream"])
    assert callable(args.func)
    o = options_from_args(args)
    assert (o.model, o.sweep, o.stream) == ("m", [1, 2], False)
