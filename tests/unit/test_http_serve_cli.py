"""`mxext serve` flags, the ServeConfig they make, and its round trip through MXEXT_SERVE_*."""

from __future__ import annotations

import argparse

import pytest

from app.http import serve_cli
from app.http.serve_cli import ServeConfig, config_from_args, parse_size


def parse(argv: list[str]) -> ServeConfig:
    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers(dest="command"))
    return config_from_args(parser.parse_args(["serve", *argv]))


def test_defaults_serve_the_embedded_model_on_port_8000(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    config = parse([])
    assert (config.port, config.model, config.api_key, config.max_body_bytes) == (8000, None, None, 8 << 20)


def test_flags_reach_the_config():
    config = parse([
        "--host", "127.0.0.1", "--port", "9001", "--model", "/models/x", "--served-model-name", "a", "b",
        "--dtype", "float32", "--max-model-len", "512", "--api-key", "k", "--shutdown-timeout", "5",
        "--max-num-seqs", "4", "--max-num-batched-tokens", "256", "--kv-cache-memory", "64MiB",
        "--max-waiting", "3", "--quantization", "none", "--no-enable-prefix-caching",
    ])  # fmt: skip
    assert config.served_model_name == ("a", "b") and config.kv_cache_memory == 64 << 20
    assert (config.max_model_len, config.max_waiting, config.enable_prefix_caching) == (512, 3, False)
    assert (config.host, config.port, config.dtype, config.shutdown_timeout) == ("127.0.0.1", 9001, "float32", 5.0)


def test_kv_memory_and_blocks_are_exclusive():
    with pytest.raises(SystemExit):
        parse(["--kv-cache-memory", "1GiB", "--num-kv-blocks", "100"])


def test_env_round_trip():
    config = ServeConfig(model="m", served_model_name=("a", "b"), api_key="k", num_kv_blocks=64,
                         enable_prefix_caching=False, shutdown_timeout=2.5)  # fmt: skip
    assert ServeConfig.from_env(config.to_env()) == config
    assert ServeConfig.from_env({}) == ServeConfig()


def test_bad_env_value_names_the_variable():
    with pytest.raises(ValueError, match="MXEXT_SERVE_PORT"):
        ServeConfig.from_env({"MXEXT_SERVE_PORT": "eighty"})


@pytest.mark.parametrize(("text", "size"), [("512MiB", 512 << 20), ("2G", 2 * 10**9), ("1024", 1024), ("1.5KiB", 1536)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
