"""LoRA routes, model resolution, the admin key and start-up loading, on the fake engine (in process)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from app.http.serve_cli import ServeConfig
from app.http.state import ServerState
from app.http.testing import FakeEngine, fake_client
from app.settings import get_settings

CHAT = "/v1/chat/completions"
LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
HI = [{"role": "user", "content": "hi"}]


def make_adapter(folder: Path, rank: int = 8, weights: str = "adapter_model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": ["q_proj", "v_proj"]}))
    (folder / weights).write_bytes(b"\0" * 16)
    return folder


@pytest.fixture
def lora_env(tmp_path, monkeypatch):
    """Runtime updating on, the store in tmp, one extra allowed root; settings re-read."""
    monkeypatch.setenv("MXEXT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VLLM_MXEXT_LORA_ROOTS", str(tmp_path / "root"))
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
    for name in ("VLLM_MXEXT_ADMIN_KEY", "MIM_MAX_GPU_LORAS", "VLLM_MAX_LORAS", "MIM_MAX_CPU_LORAS", "VLLM_MAX_LORA_RANK"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def assert_error(response, status: int, contains: str = "", code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert contains.lower() in error["message"].lower(), error["message"]
    if code:
        assert error["code"] == code
    return error


async def test_load_chat_list_unload_then_404(lora_env, caplog):
    adapter = make_adapter(lora_env / "root" / "sql")
    async with fake_client() as (client, engine):
        response = await client.post(LOAD, json={"lora_name": "sql", "lora_path": str(adapter)})
        assert response.status_code == 200, response.text
        assert response.text == "Success: LoRA adapter 'sql' added successfully."

        models = (await client.get("/v1/models")).json()["data"]
        assert [(m["id"], m["parent"], m["root"]) for m in models] == [("fake", None, "fake"), ("sql", "fake", str(adapter))]

        base = await client.post(CHAT, json={"messages": HI, "max_tokens": 8, "seed": 1})
        with caplog.at_level(logging.INFO, logger="app.http.requests"):
            for model in ("sql", "fake:sql", "base_model:sql"):
                reply = await client.post(CHAT, json={"model": model, "messages": HI, "max_tokens": 8, "seed": 1})
                assert reply.status_code == 200, reply.text
                assert reply.json()["model"] == model
                assert reply.json()["choices"][0]["message"] != base.json()["choices"][0]["message"]
        assert [r.adapter for r in caplog.records if r.name == "app.http.requests"] == ["sql"] * 3
        assert sorted(set(engine.lora_of.values()), key=str) == [None, "sql"]

        listed = (await client.get("/v1/lora_adapters")).json()
        assert listed["object"] == "list"
        (card,) = listed["data"]
        assert card["name"] == "sql" and card["format"] == "peft" and card["rank"] == 8 and card["version"] == 1
        assert card["tier"] in ("gpu", "cpu") and card["requests_served"] == 3 and card["path"] == str(adapter)
        assert card["target_modules"] == ["q_proj", "v_proj"] and card["loaded_at"] > 0

        response = await client.post(UNLOAD, json={"lora_name": "sql"})
        assert response.status_code == 200 and response.text == "Success: LoRA adapter 'sql' removed successfully."
        for model in ("sql", "fake:sql", "base_model:sql"):
            gone = await client.post(CHAT, json={"model": model, "messages": HI, "max_tokens": 2})
            assert_error(gone, 404, contains="no adapter named `sql`", code="model_not_found")
        assert_error(await client.post(UNLOAD, json={"lora_name": "sql"}), 404, "cannot be found")
        assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == ["fake"]


async def test_loading_a_loaded_name_replaces_it_with_a_new_version(lora_env):
    async with fake_client() as (client, engine):
        for rank in (8, 16):
            adapter = make_adapter(lora_env / "root" / f"r{rank}", rank=rank)
            assert (await client.post(LOAD, json={"lora_name": "a", "lora_path": str(adapter)})).status_code == 200
        (card,) = (await client.get("/v1/lora_adapters")).json()["data"]
        assert (card["version"], card["rank"]) == (2, 16)


async def test_model_names_that_resolve_to_nothing_are_404(lora_env):
    adapter = make_adapter(lora_env / "root" / "a")
    async with fake_client() as (client, _):
        await client.post(LOAD, json={"lora_name": "a", "lora_path": str(adapter)})
        for model in ("nope", "fake:nope", "other:a", "base_model:"):
            response = await client.post(CHAT, json={"model": model, "messages": HI})
            error = assert_error(response, 404, contains=f"`{model}` does not exist", code="model_not_found")
            assert error["param"] == "model" and "the adapters a" in error["message"]
        # the tokenizer routes take adapter names too
        assert (await client.post("/tokenize", json={"model": "fake:a", "prompt": "x"})).status_code == 200


async def test_runtime_updating_off_is_403_before_the_body_is_read(lora_env, monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    get_settings.cache_clear()
    async with fake_client() as (client, _):
        for path in (LOAD, UNLOAD):
            for body in ({"lora_name": "a", "lora_path": "/x"}, {"junk": 1}):
                error = assert_error(await client.post(path, json=body), 403, code="runtime_lora_updating_disabled")
                assert error["message"] == (
                    "runtime LoRA updating is disabled; set VLLM_ALLOW_RUNTIME_LORA_UPDATING=true"
                )
        assert (await client.get("/v1/lora_adapters")).json()["data"] == []


async def test_admin_key_guards_load_and_unload(lora_env):
    adapter = make_adapter(lora_env / "root" / "a")
    body = {"lora_name": "a", "lora_path": str(adapter)}
    api, admin = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}
    async with fake_client(ServeConfig(model="fake", api_key="user-key", admin_key="admin-key")) as (client, _):
        assert_error(await client.post(LOAD, json=body), 401, "missing admin key", code="invalid_api_key")
        assert_error(await client.post(LOAD, json=body, headers=api), 403, "needs the admin key")
        assert_error(await client.post(LOAD, json=body, headers={"Authorization": "Bearer x"}), 401, "incorrect")
        assert (await client.post(LOAD, json=body, headers=admin)).status_code == 200
        # the API key still serves the OpenAI routes, the admin key is accepted there too
        for headers in (api, admin):
            reply = await client.post(CHAT, json={"model": "a", "messages": HI, "max_tokens": 2}, headers=headers)
            assert reply.status_code == 200
            assert (await client.get("/v1/lora_adapters", headers=headers)).status_code == 200
        assert_error(await client.get("/v1/lora_adapters"), 401)
        assert_error(await client.post(UNLOAD, json={"lora_name": "a"}, headers=api), 403)
        assert (await client.post(UNLOAD, json={"lora_name": "a"}, headers=admin)).status_code == 200


async def test_admin_key_from_the_environment_without_an_api_key(lora_env, monkeypatch):
    monkeypatch.setenv("VLLM_MXEXT_ADMIN_KEY", "admin-key")
    get_settings.cache_clear()
    async with fake_client() as (client, _):
        assert_error(await client.post(UNLOAD, json={"lora_name": "a"}), 401)
        response = await client.post(UNLOAD, json={"lora_name": "a"}, headers={"Authorization": "Bearer admin-key"})
        assert_error(response, 404, "cannot be found")
        assert (await client.post(CHAT, json={"messages": HI, "max_tokens": 2})).status_code == 200


@pytest.mark.parametrize(
    ("make_path", "contains"),
    [
        (lambda tmp: str(tmp / "elsewhere"), "outside the folders adapters may be loaded from"),
        (lambda tmp: str(tmp / "root" / ".." / "elsewhere"), "contains '..'"),
        (lambda tmp: str(tmp / "root" / "missing"), "does not exist"),
        (lambda tmp: str(tmp / "root" / "escape"), "symlink"),
        (lambda tmp: "", "length >= 1 at `lora_path`"),
    ],
)
async def test_bad_paths_are_400_before_the_engine_sees_them(lora_env, make_path, contains):
    make_adapter(lora_env / "elsewhere")
    (lora_env / "root").mkdir()
    os.symlink(lora_env / "elsewhere", lora_env / "root" / "escape")
    async with fake_client() as (client, engine):
        response = await client.post(LOAD, json={"lora_name": "a", "lora_path": make_path(lora_env)})
        error = assert_error(response, 400, contains)
        if "outside" in contains:
            assert str(lora_env / "root") in error["message"] and str(lora_env / "home" / "adapters") in error["message"]
        assert engine.lora_paths_seen == []


@pytest.mark.parametrize(
    ("setup", "contains"),
    [
        (lambda f: make_adapter(f, weights="adapter_model.bin"), "pickle"),
        (lambda f: make_adapter(f, rank=64), "rank 64"),
        (lambda f: make_adapter(f).joinpath("adapter_config.json").write_text("{not json"), "not valid json"),
        (lambda f: f.mkdir(parents=True), "adapter_config.json"),
    ],
)
async def test_adapters_the_engine_refuses_are_400_with_its_reason(lora_env, setup, contains):
    setup(lora_env / "root" / "bad")
    async with fake_client() as (client, _):
        response = await client.post(LOAD, json={"lora_name": "bad", "lora_path": str(lora_env / "root" / "bad")})
        error = assert_error(response, 400, contains)
        assert error["message"].startswith("Loading LoRA adapter 'bad' failed: ") and error["param"] == "lora_path"


@pytest.mark.parametrize(
    ("name", "contains"),
    [("a:b", "not a valid adapter name"), ("../x", "not a valid adapter name"), ("fake", "base model's name"),
     ("base_model", "base model's name")],
)  # fmt: skip
async def test_bad_adapter_names_are_400(lora_env, name, contains):
    adapter = make_adapter(lora_env / "root" / "a")
    async with fake_client() as (client, _):
        assert_error(await client.post(LOAD, json={"lora_name": name, "lora_path": str(adapter)}), 400, contains)


async def test_relative_paths_are_inside_the_store_adapter_folder(lora_env):
    make_adapter(lora_env / "home" / "adapters" / "mine")
    async with fake_client() as (client, engine):
        assert (await client.post(LOAD, json={"lora_name": "m", "lora_path": "mine"})).status_code == 200
        assert engine.lora_paths_seen == [str(lora_env / "home" / "adapters" / "mine")]


async def test_unknown_body_field_is_400(lora_env):
    async with fake_client() as (client, _):
        response = await client.post(LOAD, json={"lora_name": "a", "lora_path": "x", "lora_int_idd": 3})
        assert_error(response, 400, "unrecognized request argument supplied: lora_int_idd")


async def test_config_file_adapters_load_before_ready_and_limits_reach_the_engine_config(lora_env, monkeypatch):
    make_adapter(lora_env / "cfg" / "adapters" / "one")
    make_adapter(lora_env / "cfg" / "adapters" / "two", rank=4)
    config_file = lora_env / "cfg" / "lora_config.yaml"
    config_file.write_text(
        "base_model: smollm2-135m-instruct\n"
        "lora_adapters:\n"
        "  - {name: one, path: adapters/one, format: peft, description: first}\n"
        "  - {name: two, path: adapters/two}\n"
        "lora_settings: {max_lora_rank: 16, max_loras: 3, cache_size: 5, enable_dynamic_loading: false}\n"
        "auto_load: true\n"
    )
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    monkeypatch.setenv("MIM_MAX_CPU_LORAS", "7")  # the environment wins over the file
    engine = FakeEngine()
    state = ServerState(ServeConfig(model="fake", lora_config=str(config_file)), engine_factory=lambda _: engine)
    assert not state.ready
    await state.load()
    assert state.ready and sorted(engine.loras) == ["one", "two"]
    settings = state.lora.settings
    assert (settings.max_lora_rank, settings.max_gpu_loras, settings.max_cpu_loras) == (16, 3, 7)
    assert settings.allow_runtime_updating is False
    assert state.resolve_model("smollm2-135m-instruct:one") == "one"  # the file's base_model names the base
    assert state.resolve_model("smollm2-135m-instruct") is None

    from app.http.state import lora_engine_fields

    assert lora_engine_fields(state.lora) == {"max_loras": 3, "max_cpu_loras": 7, "max_lora_rank": 16}
    from app.engine import EngineConfig

    config = EngineConfig(model="m", **lora_engine_fields(state.lora))  # the engine takes them as they are
    assert (config.max_loras, config.max_cpu_loras, config.max_lora_rank) == (3, 7, 16)


async def test_a_start_up_adapter_that_fails_is_fatal_with_its_reason(lora_env):
    make_adapter(lora_env / "root" / "big", rank=64)
    engine = FakeEngine()
    config = ServeConfig(model="fake", lora_modules=(f"big={lora_env / 'root' / 'big'}",))
    state = ServerState(config, engine_factory=lambda _: engine)
    reasons: list[str] = []
    state.on_fatal = reasons.append
    await state.load()
    assert not state.ready and engine.is_shut_down
    assert reasons and "big" in reasons[0] and "rank 64" in reasons[0]


def test_serve_flags_reach_the_config_and_survive_the_env_round_trip(lora_env):
    import argparse

    from app.http import serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "serve", "--lora-config", "l.yaml", "--lora-modules", "a=/x", "b=/y", "--max-loras", "2",
        "--max-cpu-loras", "3", "--max-lora-rank", "64", "--admin-key", "boss",
    ])  # fmt: skip
    config = serve_cli.config_from_args(args)
    assert (config.lora_config, config.lora_modules, config.admin_key) == ("l.yaml", ("a=/x", "b=/y"), "boss")
    assert (config.max_loras, config.max_cpu_loras, config.max_lora_rank) == (2, 3, 64)
    assert ServeConfig.from_env(config.to_env()) == config


def test_serve_with_a_bad_lora_config_exits_2_before_listening(lora_env, capsys):
    from app.cli import main

    (lora_env / "bad.yaml").write_text("lora_settings: {max_loras: -1}\n")
    assert main(["serve", "--lora-config", str(lora_env / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mxext serve: error: LoRA config file") and "lora_settings.max_loras" in err
    assert main(["serve", "--lora-config", str(lora_env / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
