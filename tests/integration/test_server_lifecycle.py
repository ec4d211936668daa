"""Disconnects free the KV cache, a full queue answers 503, SIGTERM drains and exits 0."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CHAT = "/v1/chat/completions"
LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400, "ignore_eos": True}


def gauge(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_for(condition, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def kv_is_free(http: httpx.Client) -> bool:
    return gauge(http, "vllm:kv_cache_usage_perc") == 0 and gauge(http, "vllm:num_requests_running") == 0


def test_stream_disconnect_frees_kv(http):
    assert wait_for(lambda: kv_is_free(http))
    with http.stream("POST", CHAT, json={**LONG, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk
        for _ in range(6):
            next(lines)
        assert gauge(http, "vllm:kv_cache_usage_perc") > 0
    # leaving the block closed the connection mid-stream
    assert wait_for(lambda: kv_is_free(http), timeout=5), "KV blocks still held after the client left"


def test_non_stream_disconnect_frees_kv(http):
    assert wait_for(lambda: kv_is_free(http))
    with pytest.raises(httpx.ReadTimeout):
        http.post(CHAT, json=LONG, timeout=1.5)
    assert wait_for(lambda: kv_is_free(http), timeout=5), "KV blocks still held after the client left"


@pytest.fixture(scope="module")
def small_server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory, server_process) -> Iterator:
    """One running and one waiting request at most; a generous shutdown timeout."""
    proc = server_process(
        smollm2_dir, tmp_path_factory.mktemp("small") / "server.log",
        "--max-num-seqs", "1", "--max-waiting", "1", "--max-model-len", "512", "--num-kv-blocks", "64",
        "--shutdown-timeout", "60",
    )  # fmt: skip
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


class StreamInBackground:
    """A streamed chat read on a thread: its events, and whether it reached [DONE]."""

    def __init__(self, base_url: str, max_tokens: int) -> None:
        self.events: list[str] = []
        self.first = threading.Event()
        self.status: int | None = None
        body = {**LONG, "max_tokens": max_tokens, "stream": True}
        self.thread = threading.Thread(target=self._run, args=(base_url, body), daemon=True)
        self.thread.start()
        assert self.first.wait(60), "no first event"

    def _run(self, base_url: str, body: dict) -> None:
        with httpx.stream("POST", base_url + CHAT, json=body, timeout=120) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[len("data: ") :])
                    self.first.set()
        self.first.set()

    def finish_reasons(self) -> list[str]:
        return re.findall(r'"finish_reason":"(\w+)"', "".join(self.events))


def test_full_waiting_queue_is_503_with_retry_after(small_server):
    http = httpx.Client(base_url=small_server.base_url, timeout=120)
    running = StreamInBackground(small_server.base_url, max_tokens=60)
    waiting_result: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: waiting_result.append(http.post(CHAT, json={**LONG, "max_tokens": 3})), daemon=True
    )
    waiter.start()
    assert wait_for(lambda: gauge(http, "vllm:num_requests_waiting") == 1, timeout=20)
    refused = http.post(CHAT, json={**LONG, "max_tokens": 3})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["message"] and int(refused.headers["retry-after"]) >= 1
    running.thread.join(120)
    waiter.join(120)
    assert running.events[-1] == "[DONE]" and waiting_result[0].status_code == 200


def test_sigterm_finishes_in_flight_refuses_new_and_exits_0(small_server):
    http = httpx.Client(base_url=small_server.base_url, timeout=30)
    in_flight = StreamInBackground(small_server.base_url, max_tokens=40)
    small_server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    refused = http.post(CHAT, json={**LONG, "max_tokens": 2})
    assert refused.status_code == 503 and "retry-after" in refused.headers
    assert "shutting down" in refused.json()["error"]["message"]
    assert http.get("/health").status_code == 503
    assert not in_flight.events or in_flight.events[-1] != "[DONE]", "the request finished before the signal"
    in_flight.thread.join(60)
    assert in_flight.status == 200 and in_flight.events[-1] == "[DONE]"
    assert in_flight.finish_reasons() == ["length"]
    assert small_server.process.wait(30) == 0


def test_a_model_that_cannot_load_exits_1_with_the_reason(tmp_path, server_process):
    proc = server_process(tmp_path / "no-such-model", tmp_path / "server.log")
    assert proc.process.wait(120) == 1
    proc.stop()
    assert "cannot serve" in proc.log() and "no-such-model" in proc.log()
