"""The LoRA config file, and the precedence flags > environment > file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.adapters.lora_config import LoraConfigError, load_lora_config, parse_lora_module, resolve_lora_serving
from app.settings import LoraSettings, get_settings

LORA_VARS = ("MIM_MAX_GPU_LORAS", "VLLM_MAX_LORAS", "MIM_MAX_CPU_LORAS", "VLLM_MAX_LORA_RANK",
             "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_MXEXT_ADMIN_KEY", "VLLM_MXEXT_LORA_ROOTS")  # fmt: skip

SEED = """\
base_model: smollm2-135m-instruct
lora_adapters:
  - name: customer-support
    path: ./adapters/customer-support
    format: peft
    description: Customer support fine-tune
  - name: sql-expert
    path: /opt/adapters/sql
lora_settings:
  max_lora_rank: 64
  max_loras: 4
  enable_dynamic_loading: true
  cache_size: 10
auto_load: false
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in LORA_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MXEXT_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lora_config.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(LoraConfigError) as info:
        load_lora_config(write(tmp_path, text))
    return str(info.value)


def test_the_seed_file_parses_with_paths_relative_to_it(tmp_path):
    config = load_lora_config(write(tmp_path, SEED))
    assert config.base_model == "smollm2-135m-instruct" and config.auto_load is False
    assert [(a.name, a.path) for a in config.adapters] == [
        ("customer-support", tmp_path.resolve() / "adapters" / "customer-support"),
        ("sql-expert", Path("/opt/adapters/sql")),
    ]
    assert config.adapters[0].description == "Customer support fine-tune"
    settings = config.over(LoraSettings())
    assert (settings.max_lora_rank, settings.max_gpu_loras, settings.max_cpu_loras) == (64, 4, 10)
    assert settings.allow_runtime_updating is True


def test_parent_steps_in_the_file_and_in_modules_are_folded_away(tmp_path):
    config = load_lora_config(write(tmp_path, "lora_adapters: [{name: a, path: ../shared/a}]\n"))
    assert config.adapters[0].path == tmp_path.resolve().parent / "shared" / "a"
    assert parse_lora_module("b=/srv/x/../b").path == Path("/srv/b")


def test_defaults_when_sections_are_left_out(tmp_path):
    config = load_lora_config(write(tmp_path, "lora_adapters: []\n"))
    assert config.auto_load is True and config.adapters == () and config.over(LoraSettings()) == LoraSettings()


@pytest.mark.parametrize(
    ("text", "contains"),
    [
        ("lora_adapter: []\n", "unknown key `lora_adapter` in the top level (known: base_model, lora_adapters,"),
        ("lora_settings: {max_rank: 8}\n", "unknown key `max_rank` in lora_settings (known: max_lora_rank,"),
        ("lora_adapters: [{name: a, path: b, weights: c}]\n", "unknown key `weights` in lora_adapters[0] (known: name,"),
        ("lora_settings: {max_loras: many}\n", "lora_settings.max_loras: Expected `int | null`, got `str`"),
        ("lora_settings: {max_lora_rank: 0}\n", "lora_settings.max_lora_rank: Expected `int` >= 1"),
        ("auto_load: sometimes\n", "auto_load: Expected `bool`, got `str`"),
        ("lora_adapters: [{name: a}]\n", "lora_adapters[0]: Object missing required field `path`"),
        ("lora_adapters: [{name: 'a:b', path: x}]\n", "lora_adapters[0].name: an adapter name is 1-128 characters"),
        ("lora_adapters: [{name: a, path: x, format: nemo}]\n", "lora_adapters[0].format: 'nemo' is not served"),
        ("lora_adapters: [{name: a, path: x}, {name: a, path: y}]\n", "lora_adapters[1].name: 'a' is listed twice"),
        ("lora_adapters: {name: a}\n", "lora_adapters: Expected `array`, got `object`"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("", "is empty"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_invalid_files_say_what_and_where(tmp_path, text, contains):
    message = error_of(tmp_path, text)
    assert message.startswith(f"LoRA config file {tmp_path / 'lora_config.yaml'}"), message
    assert contains in message, message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(LoraConfigError, match="nope.yaml' does not exist"):
        load_lora_config(tmp_path / "nope.yaml")


def test_defaults_without_a_file():
    serving = resolve_lora_serving()
    assert serving.settings == LoraSettings()
    assert (serving.settings.max_gpu_loras, serving.settings.max_cpu_loras, serving.settings.max_lora_rank) == (8, 16, 32)
    assert serving.settings.allow_runtime_updating is False and serving.adapters == ()
    assert serving.base_aliases == ("base_model",)


def test_environment_wins_over_the_file_and_flags_over_both(tmp_path, monkeypatch):
    path = write(tmp_path, SEED)
    monkeypatch.setenv("VLLM_MAX_LORAS", "6")  # vLLM's name, an alias
    monkeypatch.setenv("VLLM_MAX_LORA_RANK", "16")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "false")
    settings = resolve_lora_serving(path).settings
    assert (settings.max_gpu_loras, settings.max_cpu_loras, settings.max_lora_rank) == (6, 10, 16)
    assert settings.allow_runtime_updating is False
    monkeypatch.setenv("MIM_MAX_GPU_LORAS", "5")  # the project's name wins over the alias
    assert resolve_lora_serving(path).settings.max_gpu_loras == 5
    flagged = resolve_lora_serving(path, max_loras=2, max_cpu_loras=3, max_lora_rank=8, admin_key="k").settings
    assert (flagged.max_gpu_loras, flagged.max_cpu_loras, flagged.max_lora_rank, flagged.admin_key) == (2, 3, 8, "k")


def test_bad_environment_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("MIM_MAX_CPU_LORAS", "0")
    with pytest.raises(ValueError, match="MIM_MAX_CPU_LORAS=0: must be at least 1"):
        LoraSettings.from_env()
    monkeypatch.setenv("MIM_MAX_CPU_LORAS", "lots")
    with pytest.raises(ValueError, match="MIM_MAX_CPU_LORAS='lots': expected an integer"):
        LoraSettings.from_env()


def test_settings_read_the_lora_group_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MIM_MAX_GPU_LORAS", "3")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    monkeypatch.setenv("VLLM_MXEXT_LORA_ROOTS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    lora = get_settings().lora
    assert lora.max_gpu_loras == 3 and lora.allow_runtime_updating is True
    assert lora.roots == (tmp_path / "a", tmp_path / "b")


def test_roots_are_the_store_the_environment_and_the_listed_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_MXEXT_LORA_ROOTS", str(tmp_path / "extra"))
    serving = resolve_lora_serving(write(tmp_path, SEED), modules=(f"m={tmp_path / 'mod'}",))
    assert serving.roots == (
        tmp_path / "home" / "adapters", tmp_path / "extra", tmp_path.resolve() / "adapters" / "customer-support",
        Path("/opt/adapters/sql"), tmp_path / "mod",
    )  # fmt: skip
    # auto_load is false: only --lora-modules load at start-up
    assert [a.name for a in serving.adapters] == ["m"]
    assert serving.base_aliases == ("base_model", "smollm2-135m-instruct")


def test_auto_load_loads_every_listed_adapter_and_a_module_of_the_same_name_wins(tmp_path):
    path = write(tmp_path, SEED.replace("auto_load: false", "auto_load: true"))
    serving = resolve_lora_serving(path, modules=(f"sql-expert={tmp_path / 'sql2'}",))
    assert [(a.name, a.path) for a in serving.adapters] == [
        ("customer-support", tmp_path.resolve() / "adapters" / "customer-support"),
        ("sql-expert", tmp_path / "sql2"),
    ]


def test_device_slots_never_exceed_the_host_cache(monkeypatch):
    monkeypatch.setenv("MIM_MAX_CPU_LORAS", "2")
    get_settings.cache_clear()
    settings = resolve_lora_serving().settings
    assert (settings.max_gpu_loras, settings.max_cpu_loras) == (2, 2)
    assert resolve_lora_serving(max_loras=5, max_cpu_loras=4).settings.max_gpu_loras == 4


@pytest.mark.parametrize("text", ["noequals", "=path", "name=", "a:b=/x"])
def test_bad_lora_modules(text):
    with pytest.raises(ValueError, match="--lora-modules"):
        parse_lora_module(text)
