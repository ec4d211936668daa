"""The benchmark against our real server (`mxext serve` on SmolLM2, tests/integration/conftest.py)."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from bench.serving.cli import main
from bench.serving.report import parse_log

API_KEY = "test-key"  # the shared server's (conftest.py)


def test_random_workload_counts_come_from_usage(server, smollm2_dir, tmp_path, capsys):
    code = main([
        "--model", "smollm2", "--server-url", server.base_url, "--api-key", API_KEY, "--endpoint", "completions",
        "--dataset", "random", "--input-len", "32", "--output-len", "8", "--ignore-eos", "--temperature", "0",
        "--num-prompts", "8", "--concurrent-requests", "4", "--json", "--no-progress", "--log-dir", str(tmp_path),
        "--save-individual", "--tokenizer", str(smollm2_dir),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    m = json.loads(out)
    assert (m["total_requests"], m["failed_requests"]) == (8, 0)
    assert (m["prompt_tokens"], m["completion_tokens"]) == (8 * 32, 8 * 8)  # exact prompt lengths, ignore_eos
    assert m["usage_from_server"] is True
    assert 0 < m["ttft_min"] <= m["ttft_median"] <= m["ttft_max"] < m["e2e_max"]
    assert m["tpot_median"] > 0 and m["itl_median"] > 0 and m["overall_throughput"] > 0
    log = parse_log(next(tmp_path.glob("mim_profile_*.log")))
    assert all(r["completion_tokens"] == 8 and r["prompt_tokens"] == 32 for r in log["requests"])


def test_chat_prompts_through_the_server_tokenizer_free_path(server, capsys):
    code = main([
        "--model", "smollm2", "--server-url", server.base_url, "--api-key", API_KEY, "--num-prompts", "4",
        "--max-tokens", "8", "--concurrent-requests", "2", "--no-save", "--no-progress", "--lang", "zh",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "测试摘要" in out and "失败请求数:" in out


@pytest.mark.slow
def test_server_killed_mid_run(server_process, smollm2_dir, tmp_path):
    """SIGKILL the server while the benchmark runs: the report counts what finished and what failed."""
    proc = server_process(smollm2_dir, tmp_path / "server.log", "--max-model-len", "512")
    proc.wait_ready()
    result: dict = {}
    log_dir = tmp_path / "logs"

    def bench() -> None:
        result["code"] = main([
            "--model", str(smollm2_dir), "--server-url", proc.base_url, "--endpoint", "completions", "--num-prompts", "24",
            "--max-tokens", "24", "--ignore-eos", "--concurrent-requests", "2", "--no-progress", "--log-dir",
            str(log_dir), "--no-plot", "--save-individual",
        ])  # fmt: skip

    thread = threading.Thread(target=bench)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while proc.log().count("status=200") < 5 and time.monotonic() < deadline:  # warm-up + 4 timed
            time.sleep(0.05)
    finally:
        proc.process.send_signal(signal.SIGKILL)
        proc.stop()
    thread.join(60)
    assert result.get("code") == 2
    log = parse_log(next(log_dir.glob("mim_profile_*.log")))
    m = log["aggregate"]
    assert m["total_requests"] == 24 and m["successful_requests"] >= 4 and m["failed_requests"] >= 10
    assert m["successful_requests"] + m["failed_requests"] == 24
    assert m["completion_tokens"] == 24 * m["successful_requests"]
    assert any("connect" in e["error"] for e in m["errors"])
    assert "Failed requests" in log["report"]
