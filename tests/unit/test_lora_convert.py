"""LoRA format conversion: PEFT <-> NeMo <-> TensorRT-LLM round trips are exact, NeMo's fused
layouts read as NeMo defines them, and converted adapters serve token-identical output."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from app.adapters.convert import convert_lora
from app.jobs.context import JobCancelled, JobContext, JobError
from app.settings import LoraSettings, Settings, StoreSettings
from tests.engine.reference import make_random_model

# name -> peft LoraConfig arguments. Scales: 2, 32/sqrt(16) = 8, 24/8 = 3, and 2 and 4 mixed.
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "all8": dict(r=8, lora_alpha=16, target_modules=ALL),
    "rs16": dict(r=16, lora_alpha=32, use_rslora=True, target_modules=ALL),
    "qv8a24": dict(r=8, lora_alpha=24, target_modules=["q_proj", "v_proj", "up_proj"]),
    "mixed": dict(r=8, lora_alpha=16, rank_pattern={"down_proj": 4}, target_modules=["q_proj", "down_proj"]),
}
SEMANTIC_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "base_model_name_or_path")


@pytest.fixture(scope="module")
def world(smollm2_dir, tmp_path_factory):
    """A random-weight Llama (GQA: 4 heads, 2 KV heads) and peft adapters on it with random B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora_convert")
    base_dir = make_random_model(root / "src" / "base", smollm2_dir, arch="llama")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    paths = {}
    for k, (name, spec) in enumerate(ADAPTERS.items()):
        torch.manual_seed(200 + k)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**spec))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.1)
        paths[name] = root / "src" / name
        model.save_pretrained(paths[name])
    return {"root": root, "base": base_dir, "paths": paths}


def _ctx(home: Path, roots=(), cancel=lambda: False, job="job1") -> JobContext:
    settings = Settings(store=StoreSettings(home=home), lora=LoraSettings(roots=tuple(roots)))
    return JobContext(job_id=job, settings=settings, cancel_requested=cancel)


def _convert(ctx: JobContext, source, name: str, to: str, **extra) -> dict:
    return convert_lora({"source": str(source), "name": name, "to_format": to, "register": False, **extra}, ctx)


def _assert_same_peft(original: Path, converted: Path) -> None:
    want, got = load_file(original / "adapter_model.safetensors"), load_file(converted / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    cfg_want = json.loads((original / "adapter_config.json").read_text())
    cfg_got = json.loads((converted / "adapter_config.json").read_text())
    for key in SEMANTIC_KEYS:
        assert cfg_got.get(key) == cfg_want.get(key), key
    assert set(cfg_got["target_modules"]) == set(cfg_want["target_modules"])


@pytest.mark.parametrize("name", ["all8", "rs16", "qv8a24"])
def test_peft_nemo_peft_round_trip_is_bit_exact(world, tmp_path, name):
    ctx = _ctx(tmp_path, roots=[world["root"] / "src"])
    out = _convert(ctx, world["paths"][name], f"{name}-nemo", "nemo", base_model=str(world["base"]))
    assert out["format"] == "nemo" and out["from_format"] == "peft" and out["files"] == [f"{name}-nemo.nemo"]
    nemo = Path(out["path"]) / out["files"][0]
    back = _convert(ctx, nemo, f"{name}-back", "peft")
    assert back["from_format"] == "nemo"
    _assert_same_peft(world["paths"][name], Path(back["path"]))
    assert back["target_modules"] == [m for m in ALL if m in ADAPTERS[name]["target_modules"]]


@pytest.mark.parametrize("name", ["all8", "rs16", "mixed"])
def test_peft_trtllm_peft_round_trip_is_bit_exact(world, tmp_path, name):
    """Power-of-two scales: dividing the folded scale back out is exact."""
    ctx = _ctx(tmp_path, roots=[world["root"] / "src"])
    out = _convert(ctx, world["paths"][name], f"{name}-trt", "tensorrt-llm")
    assert out["format"] == "trtllm" and out["files"] == ["model.lora_config.npy", "model.lora_weights.npy",
                                                          "mxext_adapter.json"]
    back = _convert(ctx, out["path"], f"{name}-back", "hf")
    assert back["from_format"] == "trtllm"
    _assert_same_peft(world["paths"][name], Path(back["path"]))


def test_trtllm_files_are_what_tensorrt_llm_reads(world, tmp_path):
    """hf_lora_convert.py's layout: config [1, n, 3] int32 rows (module id, layer, r); weights
    [1, n, max] rows A.flatten() ++ (B * alpha/r).flatten(), zero-padded."""
    ctx = _ctx(tmp_path, roots=[world["root"] / "src"])
    out = Path(_convert(ctx, world["paths"]["mixed"], "mixed-trt", "trtllm")["path"])
    config = np.load(out / "model.lora_config.npy", allow_pickle=False)
    weights = np.load(out / "model.lora_weights.npy", allow_pickle=False)
    assert config.dtype == np.int32 and config.shape == (1, 4, 3) and weights.dtype == np.float32
    assert config[0].tolist() == [[1, 0, 8], [6, 0, 4], [1, 1, 8], [6, 1, 4]]
    src = load_file(world["paths"]["mixed"] / "adapter_model.safetensors")
    a = src["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    b = src["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    row = torch.from_numpy(weights[0, 3])
    n = a.numel() + b.numel()
    assert torch.equal(row[: a.numel()], a.flatten())
    assert torch.equal(row[a.numel(): n], (b * (16 / 4)).flatten())
    assert not row[n:].any()


def test_trtllm_non_power_of_two_scale_keeps_config_and_what_it_computes(world, tmp_path):
    """alpha/r = 3: B * 3 / 3 may differ from B in the last bit, B * scale never does."""
    ctx = _ctx(tmp_path, roots=[world["root"] / "src"])
    out = _convert(ctx, world["paths"]["qv8a24"], "q-trt", "trtllm")
    back = Path(_convert(ctx, out["path"], "q-back", "peft")["path"])
    want, got = load_file(world["paths"]["qv8a24"] / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert json.loads((back / "adapter_config.json").read_text())["lora_alpha"] == 24
    for key in want:
        factor = 3.0 if "lora_B" in key else 1.0
        assert torch.equal(got[key] * factor, want[key] * factor), key


def test_trtllm_without_sidecar_needs_base_model_and_gives_alpha_equal_r(world, tmp_path):
    ctx = _ctx(tmp_path, roots=[world["root"] / "src"])
    out = Path(_convert(ctx, world["paths"]["all8"], "t", "trtllm")["path"])
    (out / "mxext_adapter.json").unlink()
    with pytest.raises(JobError, match="pass base_model"):
        _convert(ctx, out, "t-back", "peft")
    back = Path(_convert(ctx, out, "t-back", "peft", base_model=str(world["base"]))["path"])
    cfg = json.loads((back / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and not cfg["use_rslora"]
    want, got = load_file(world["paths"]["all8"] / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    for key in want:
        assert torch.equal(got[key], want[key] * (2.0 if "lora_B" in key else 1.0)), key


def _nemo_archive(path: Path, config: dict, state: dict | bytes, prefix: str = "./") -> Path:
    buf = io.BytesIO()
    if isinstance(state, bytes):
        buf.write(state)
    else:
        torch.save(state, buf)
    import yaml

    with tarfile.open(path, "w") as tar:
        for name, data in ((f"{prefix}model_config.yaml", yaml.safe_dump(config).encode()),
                           (f"{prefix}model_weights.ckpt", buf.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


NEMO_CFG = {"hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 128,
            "num_layers": 2, "precision": 32, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
            "peft": {"peft_scheme": "lora", "lora_tuning": {"variant": "nemo", "adapter_dim": 4, "alpha": 8,
                                                            "target_modules": ["attention_qkv", "mlp_fc1"]}}}


def test_nemo_fused_layout_reads_as_nemo_defines_it(tmp_path):
    """A NeMo-native archive: one A for q/k/v, linear_out per query group [q heads, k head, v head]
    (lora_converter.py), hto4h = [gate; up]. Built here head by head, independently of the reader."""
    g = torch.Generator().manual_seed(0)
    head, groups, per_group, r = 16, 2, 2, 4
    a_qkv, a_fc1 = torch.randn(r, 64, generator=g), torch.randn(r, 64, generator=g)
    q, k, v = (torch.randn(n * head, r, generator=g) for n in (groups * per_group, groups, groups))
    rows = []
    for grp in range(groups):
        rows += [q[(grp * per_group + i) * head:(grp * per_group + i + 1) * head] for i in range(per_group)]
        rows += [k[grp * head:(grp + 1) * head], v[grp * head:(grp + 1) * head]]
    gate, up = torch.randn(128, r, generator=g), torch.randn(128, r, generator=g)
    prefix = "model.decoder.layers.1"
    state = {
        f"{prefix}.self_attention.adapter_layer.lora_kqv_adapter.linear_in.weight": a_qkv,
        f"{prefix}.self_attention.adapter_layer.lora_kqv_adapter.linear_out.weight": torch.cat(rows),
        f"{prefix}.mlp.adapter_layer.lora_hto4h_adapter.linear_in.weight": a_fc1,
        f"{prefix}.mlp.adapter_layer.lora_hto4h_adapter.linear_out.weight": torch.cat([gate, up]),
    }
    src = tmp_path / "src"
    src.mkdir()
    archive = _nemo_archive(src / "native.nemo", NEMO_CFG, state, prefix="")
    ctx = _ctx(tmp_path, roots=[src])
    out = _convert(ctx, archive, "native", "peft")  # from_format detected
    assert out["from_format"] == "nemo" and out["rank"] == 4
    got = load_file(Path(out["path"]) / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.{}.{}.lora_{}.weight"
    for block, module, a, b in (("self_attn", "q_proj", a_qkv, q), ("self_attn", "k_proj", a_qkv, k),
                                ("self_attn", "v_proj", a_qkv, v), ("mlp", "gate_proj", a_fc1, gate),
                                ("mlp", "up_proj", a_fc1, up)):
        assert torch.equal(got[key.format(block, module, "A")], a) and torch.equal(got[key.format(block, module, "B")], b)
    cfg = json.loads((Path(out["path"]) / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8, False)
    # ... and back to NeMo: the shared A stays one block, so the archive is the same adapter again.
    (src / "layout").mkdir()
    (src / "layout" / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4,
                                                            "num_key_value_heads": 2, "intermediate_size": 128}))
    again = _convert(ctx, out["path"], "native2", "nemo", base_model=str(src / "layout"))
    with tarfile.open(Path(again["path"]) / "native2.nemo") as tar:
        state2 = torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=True)
    assert state2.keys() == state.keys() and all(torch.equal(state2[k], state[k]) for k in state)


def test_nemo_without_sidecar_reads_the_fused_adapter_as_stored(world, tmp_path):
    """A .nemo written from separate q/k/v A's, sidecar removed: same deltas (B @ A * scale)."""
    ctx = _ctx(tmp_path, roots=[world["root"] / "src"])
    out = _convert(ctx, world["paths"]["all8"], "n", "nemo", base_model=str(world["base"]))
    nemo = Path(out["path"]) / "n.nemo"
    stripped = tmp_path / "adapters" / "bare.nemo"
    with tarfile.open(nemo) as src, tarfile.open(stripped, "w") as dst:
        for member in src.getmembers():
            if "mxext" not in member.name:
                dst.addfile(member, src.extractfile(member))
    back = Path(_convert(ctx, stripped, "bare", "peft")["path"])
    cfg = json.loads((back / "adapter_config.json").read_text())
    assert cfg["r"] == out["rank"] == 24 and cfg["lora_alpha"] == 48  # 3 x 8 stacked; 48 / 24 == 16 / 8
    want, got = load_file(world["paths"]["all8"] / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    for key in [k for k in want if "lora_A" in k]:
        delta_want = want[key.replace("lora_A", "lora_B")] @ want[key] * 2
        delta_got = got[key.replace("lora_A", "lora_B")] @ got[key] * 2
        torch.testing.assert_close(delta_got, delta_want, rtol=1e-6, atol=1e-6)


def test_nemo_refuses_modules_with_different_scales(world, tmp_path):
    ctx = _ctx(tmp_path, roots=[world["root"] / "src"])
    with pytest.raises(JobError, match="one alpha / adapter_dim.*convert it to trtllm"):
        _convert(ctx, world["paths"]["mixed"], "m", "nemo", base_model=str(world["base"]))
    assert not any((tmp_path / "adapters").iterdir())


def test_converted_adapters_serve_token_identical_output(world, tmp_path):
    from app.engine import LLM, LoRARequest, SamplingParams

    ctx = _ctx(tmp_path, roots=[world["root"] / "src"])
    converted = {}
    for name in ("all8", "rs16", "qv8a24"):
        nemo = _convert(ctx, world["paths"][name], f"{name}-n", "nemo", base_model=str(world["base"]))
        converted[f"{name}-nemo"] = _convert(ctx, Path(nemo["path"]) / nemo["files"][0], f"{name}-nb", "peft")["path"]
        trt = _convert(ctx, world["paths"][name], f"{name}-t", "trtllm")
        converted[f"{name}-trt"] = _convert(ctx, trt["path"], f"{name}-tb", "peft")["path"]
    llm = LLM(str(world["base"]), dtype="float32", quantization="none", max_lora_rank=64)
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    base_out = [o.token_ids for o in llm.generate(prompts, greedy)]
    for name in ("all8", "rs16", "qv8a24"):
        want = [o.token_ids for o in llm.generate(prompts, greedy, lora_request=LoRARequest(name, str(world["paths"][name])))]
        assert want != base_out, name  # the adapter changes the output, so the comparison means something
        for kind in ("nemo", "trt"):
            lora = LoRARequest(f"{name}-{kind}", converted[f"{name}-{kind}"])
            assert [o.token_ids for o in llm.generate(prompts, greedy, lora_request=lora)] == want, (name, kind)


# -- bad inputs: a JobError that says what to change, and nothing in the adapters folder -----------


@pytest.fixture
def bad(tmp_path, world):
    src = tmp_path / "src"
    src.mkdir()
    ctx = _ctx(tmp_path, roots=[src, world["root"] / "src"])

    def run(source, name="out", to="peft", **extra):
        with pytest.raises(JobError) as info:
            _convert(ctx, source, name, to, **extra)
        adapters = tmp_path / "adapters"
        assert not adapters.exists() or sorted(p.name for p in adapters.iterdir()) == run.expected_left
        return str(info.value)

    run.expected_left = []
    return src, run


def test_unknown_format_names(bad, world):
    _, run = bad
    assert "'safetensors' is not a LoRA format" in run(world["paths"]["all8"], to="safetensors")
    assert "from_format 'gguf' is not a LoRA format" in run(world["paths"]["all8"], from_format="gguf")


def test_autodetect_failure_lists_files_and_needs(bad):
    src, run = bad
    folder = src / "mystery"
    folder.mkdir()
    (folder / "weights.pt").write_bytes(b"x")
    msg = run(folder)
    assert "cannot detect" in msg and "weights.pt" in msg and "adapter_config.json" in msg and "model.lora_config.npy" in msg


def test_missing_and_outside_sources(bad, tmp_path):
    src, run = bad
    assert "does not exist" in run(str(src / "nope"))
    assert "outside the folders" in run(str(tmp_path.parent))
    peft_dir = src / "half"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text("{}")
    assert "adapter_model.safetensors is missing" in run(peft_dir, to="nemo")


def test_pickle_where_safetensors_expected_is_never_loaded(bad, world):
    src, run = bad
    folder = src / "pickled"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((world["paths"]["all8"] / "adapter_config.json").read_text())
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not unpickled")
    assert "pickle" in run(folder, to="trtllm") and "adapter_model.safetensors" in run(folder, to="trtllm")
    npy = src / "trt-pickle"
    npy.mkdir()
    np.save(npy / "model.lora_config.npy", np.array([[[1, 0, 8]]], dtype=np.int32))
    np.save(npy / "model.lora_weights.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    assert "pickled objects" in run(npy)


def test_corrupt_archives(bad, world, tmp_path):
    src, run = bad
    good = _nemo_archive(src / "good.nemo", NEMO_CFG, {})
    (src / "cut.nemo").write_bytes(good.read_bytes()[:700])
    assert "corrupt or truncated" in run(src / "cut.nemo")
    (src / "noise.nemo").write_bytes(b"\x00garbage" * 100)
    assert "corrupt or truncated" in run(src / "noise.nemo", from_format="nemo")
    weights = _nemo_archive(src / "w.nemo", NEMO_CFG, b"PK\x03\x04 half a zip")
    assert "model_weights.ckpt is corrupt or truncated" in run(weights)
    sf = src / "bad-sf"
    sf.mkdir()
    (sf / "adapter_config.json").write_text((world["paths"]["all8"] / "adapter_config.json").read_text())
    (sf / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert "not a valid safetensors file" in run(sf, to="nemo")


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to rebuild it."""


def test_nemo_checkpoint_with_objects_is_refused_by_weights_only(bad):
    src, run = bad
    archive = _nemo_archive(src / "obj.nemo", NEMO_CFG, {"payload": Payload()})
    msg = run(archive)
    assert "weights_only=True" in msg and "plain tensors" in msg


def test_unsupported_adapter_features(bad, world):
    src, run = bad
    dora = src / "dora"
    dora.mkdir()
    cfg = json.loads((world["paths"]["all8"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes((world["paths"]["all8"] / "adapter_model.safetensors").read_bytes())
    assert "DoRA" in run(dora, to="nemo")
    tp2 = _nemo_archive(src / "tp2.nemo", {**NEMO_CFG, "tensor_model_parallel_size": 2}, {})
    assert "merge it to TP=1 PP=1" in run(tp2)


def test_bad_names_existing_output_and_same_format(bad, world, tmp_path):
    _, run = bad
    for name in ("../escape", "", "a/b", ".hidden"):
        assert "is not a valid adapter name" in run(world["paths"]["all8"], name=name)
    (tmp_path / "adapters" / "taken").mkdir(parents=True)
    run.expected_left = ["taken"]
    assert "already exists" in run(world["paths"]["all8"], name="taken", to="trtllm")
    assert "already peft" in run(world["paths"]["all8"], to="peft")


def test_cancel_between_tensors_leaves_nothing(world, tmp_path):
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 5

    ctx = _ctx(tmp_path, roots=[world["root"] / "src"], cancel=cancel)
    with pytest.raises(JobCancelled):
        _convert(ctx, world["paths"]["all8"], "c", "trtllm")
    adapters = tmp_path / "adapters"
    assert len(calls) == 6 and (not adapters.exists() or not any(adapters.iterdir()))
