"""`mxext lora ...`: what it sends, what it prints, and how it fails (the server is a stub)."""

from __future__ import annotations

import json

import httpx
import pytest

from app.cli import main

ADAPTER = {"name": "sql", "path": "/srv/adapters/sql", "format": "peft", "rank": 8, "target_modules": ["q_proj"],
           "version": 2, "tier": "gpu", "loaded_at": 1_700_000_000.0, "requests_served": 5, "object": "lora_adapter"}  # fmt: skip


@pytest.fixture
def server(monkeypatch):
    """Records each request; answers from `server.answers[path]` (status, body)."""

    class Stub:
        calls: list[dict] = []
        answers: dict[str, tuple[int, object]] = {}

    def request(method, url, json=None, headers=None, timeout=None):
        Stub.calls.append({"method": method, "url": url, "json": json, "headers": headers or {}})
        path = url.split("://", 1)[1].split("/", 1)[1]
        status, body = Stub.answers.get("/" + path, (200, ""))
        if isinstance(body, str):
            return httpx.Response(status, text=body, request=httpx.Request(method, url))
        return httpx.Response(status, json=body, request=httpx.Request(method, url))

    for name in ("VLLM_API_KEY", "VLLM_MXEXT_ADMIN_KEY", "MXEXT_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(httpx, "request", request)
    return Stub


def test_load_sends_an_absolute_local_path_with_the_admin_key(server, tmp_path, monkeypatch, capsys):
    (tmp_path / "sql").mkdir()
    monkeypatch.chdir(tmp_path)
    server.answers["/v1/load_lora_adapter"] = (200, "Success: LoRA adapter 'sql' added successfully.")
    assert main(["lora", "load", "sql", "sql", "--api-key", "user", "--admin-key", "boss"]) == 0
    (call,) = server.calls
    assert call["method"] == "POST" and call["url"] == "http://0.0.0.0:8000/v1/load_lora_adapter"
    assert call["json"] == {"lora_name": "sql", "lora_path": str(tmp_path / "sql")}
    assert call["headers"] == {"Authorization": "Bearer boss"}
    assert capsys.readouterr().out == "Success: LoRA adapter 'sql' added successfully.\n"


def test_a_path_that_is_not_here_is_sent_as_given(server):
    assert main(["lora", "load", "sql", "store-relative/sql", "--server-url", "http://h:1/"]) == 0
    assert server.calls[0]["json"]["lora_path"] == "store-relative/sql"
    assert server.calls[0]["url"] == "http://h:1/v1/load_lora_adapter" and server.calls[0]["headers"] == {}


def test_list_prints_a_table_or_json(server, capsys, monkeypatch):
    server.answers["/v1/lora_adapters"] = (200, {"object": "list", "data": [ADAPTER]})
    monkeypatch.setenv("VLLM_API_KEY", "user")
    assert main(["lora", "list"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "RANK", "TIER", "VERSION", "REQUESTS", "LOADED", "PATH"]
    assert row.split()[:5] == ["sql", "8", "gpu", "2", "5"] and row.endswith("/srv/adapters/sql")
    assert server.calls[0]["headers"] == {"Authorization": "Bearer user"}
    assert main(["lora", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"][0] == ADAPTER


def test_list_when_none_are_loaded(server, capsys):
    server.answers["/v1/lora_adapters"] = (200, {"object": "list", "data": []})
    assert main(["lora", "list"]) == 0
    assert capsys.readouterr().out == "no adapters loaded\n"


def test_unload(server, capsys):
    server.answers["/v1/unload_lora_adapter"] = (200, "Success: LoRA adapter 'sql' removed successfully.")
    assert main(["lora", "unload", "sql", "--admin-key", "boss"]) == 0
    assert server.calls[0]["json"] == {"lora_name": "sql"}
    assert "removed" in capsys.readouterr().out


def test_test_chats_through_the_adapter_and_prints_the_reply(server, capsys):
    reply = {"choices": [{"message": {"role": "assistant", "content": "SELECT 1;"}}]}
    server.answers["/v1/chat/completions"] = (200, reply)
    assert main(["lora", "test", "sql", "count the rows", "--max-tokens", "5"]) == 0
    body = server.calls[0]["json"]
    assert body["model"] == "sql" and body["messages"] == [{"role": "user", "content": "count the rows"}]
    assert (body["max_tokens"], body["temperature"]) == (5, 0.0)
    assert capsys.readouterr().out == "SELECT 1;\n"


def test_server_errors_print_its_message_and_exit_1(server, capsys):
    message = "runtime LoRA updating is disabled; set VLLM_ALLOW_RUNTIME_LORA_UPDATING=true"
    error = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    server.answers["/v1/load_lora_adapter"] = (403, error)
    assert main(["lora", "load", "sql", "/x"]) == 1
    assert capsys.readouterr().err == f"mxext lora load: error: {message} (HTTP 403)\n"


def test_an_unreachable_server_exits_1(capsys):
    assert main(["lora", "list", "--server-url", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "cannot reach the server at http://127.0.0.1:9" in capsys.readouterr().err
