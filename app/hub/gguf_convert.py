"""Convert a llama.cpp GGUF file into a plain Hugging Face model folder.

Why our own converter: transformers' GGUF *weights* loader keeps nothing on disk and re-dequantizes on
every load, and its result cannot be served by code that expects a normal HF folder. We dequantize once
and write config.json + model.safetensors + tokenizer files + generation_config.json.

Supported: llama.cpp architectures "llama" (Llama 2/3, Mistral, SmolLM2, ...) and "qwen2", with tensors
in F32/F16/BF16/Q8_0/Q4_0/Q4_1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tqdm import tqdm

from app.hub import CONVERTER_VERSION

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "conversion.json"

QT = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1})

# llama.cpp architecture -> (HF model_type, HF architecture class).
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# llama.cpp stores Llama 3.x rope scaling as this tensor of per-frequency divisors, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"
# The big tokenizer arrays: transformers reads them itself, we never need them as Python lists.
_SKIPPED_META = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> Path:
    """Convert `gguf_path` into the HF folder `out_dir` (replaced if present) and return `out_dir`.

    Everything is written into a hidden sibling folder first and renamed into place at the end, so a
    reader never sees a half-converted model.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    started = time.monotonic()
    reader = GGUFReader(gguf_path)
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{gguf_path.name}: llama.cpp architecture {arch!r} is not supported (supported: {sorted(ARCHITECTURES)})")
    # Fail on an unsupported tensor type before spending minutes on the others.
    for t in reader.tensors:
        _check_type(t.name, t.tensor_type)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        config = _build_config(meta, reader, dtype)
        state = _convert_tensors(reader, config, arch, dtype, progress)
        _check_complete(state, config)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # safetensors creates the file 0600; the store may be shared by several users/containers.
        os.chmod(tmp / "model.safetensors", 0o644)
        del state
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", _generation_config(meta))
        _write_tokenizer(gguf_path, tmp, meta, config["max_position_embeddings"])
        provenance = {"converter_version": CONVERTER_VERSION, **source_fingerprint(gguf_path), "dtype": config["torch_dtype"]}
        _write_json(tmp / PROVENANCE_FILE, provenance)
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s -> %s in %.1f s", gguf_path.name, out_dir, time.monotonic() - started)
    return out_dir


def source_fingerprint(gguf_path: Path) -> dict[str, Any]:
    """What identifies a GGUF for the store's "is the cached conversion still current?" check.

    Content, not path or mtime: the same package installed into another virtualenv (a fresh clone,
    CI) is the same model and must not trigger a reconversion. Size plus a hash of the first and
    last MiB is cheap and tells any two GGUF files apart in practice.
    """
    import hashlib

    size = gguf_path.stat().st_size
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return {"source": str(gguf_path), "size": size, "sample_sha256": digest.hexdigest()}


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """GGUF key/values as Python values, without the (large) tokenizer vocab arrays."""
    return {key: field.contents() for key, field in reader.fields.items() if key not in _SKIPPED_META}


def _check_type(name: str, qtype: GGMLQuantizationType) -> None:
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(
            f"tensor {name!r} has GGML type {qtype.name}, which this converter does not support "
            f"(supported: {names}); use a GGUF quantized to one of those"
        )


def _f32(value: Any) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.999999747378752e-06; the shortest float32 repr is 1e-05.
    return float(str(np.float32(value)))


def _build_config(meta: dict[str, Any], reader: GGUFReader, dtype: torch.dtype) -> dict[str, Any]:
    arch = meta["general.architecture"]
    model_type, hf_class = ARCHITECTURES[arch]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF has no token_embd.weight tensor")
    n_embd = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_head_kv = get("attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):  # per-layer counts: only a uniform list maps onto an HF config
        if len(set(n_head_kv)) != 1:
            raise ValueError(f"per-layer attention.head_count_kv {n_head_kv} is not supported")
        n_head_kv = n_head_kv[0]
    head_dim = int(get("attention.key_length", n_embd // n_head))
    theta = _f32(get("rope.freq_base", 10000.0))
    ctx = int(get("context_length", 2048))
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": n_embd,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(n_head_kv),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "max_position_embeddings": ctx,
        # The embedding's row count is the truth; tokenizer lists are sometimes padded or short.
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if head_dim != n_embd // n_head:
        config["head_dim"] = head_dim
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    for key in ("bos", "eos", "pad"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[f"{key}_token_id"] = int(token_id)

    rope_freqs = tensors.get(_ROPE_FREQS)
    orig_ctx = get("rope.scaling.original_context_length")
    scaling_type = get("rope.scaling.type")
    factor = get("rope.scaling.factor", get("rope.scale_linear"))
    if rope_freqs is not None:
        factors = dequantize(rope_freqs.data, rope_freqs.tensor_type).reshape(-1)
        config["rope_scaling"] = llama3_rope_scaling(factors, theta, head_dim, int(orig_ctx or 8192))
    elif scaling_type in ("linear", None) and factor not in (None, 1.0):
        config["rope_scaling"] = {"rope_type": "linear", "factor": _f32(factor)}
    elif scaling_type == "yarn":
        config["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": _f32(factor),
            "original_max_position_embeddings": int(orig_ctx or ctx),
        }
    elif scaling_type not in (None, "none", "linear"):
        raise ValueError(f"rope scaling type {scaling_type!r} is not supported")
    return config


def llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int, orig_ctx: int = 8192) -> dict[str, Any]:
    """Recover HF's llama3 `rope_scaling` from llama.cpp's `rope_freqs` tensor.

    llama.cpp's convert_hf_to_gguf.py bakes (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings) into one divisor per frequency: 1 for short wavelengths, `factor`
    for long ones, and 1 / ((1 - s) / factor + s) in between, with s linear in 1 / wavelength. We take
    `factor` from the maximum, fit the line through the smooth band, and verify the result regenerates
    the tensor. The original context length is not recoverable; llama.cpp itself assumes 8192.
    """
    factors = np.asarray(factors, dtype=np.float64)
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if len(factors) != len(freqs):
        raise ValueError(f"rope_freqs has {len(factors)} entries, expected head_dim / 2 = {len(freqs)}")
    factor = float(factors.max())
    if factor <= 1.0:
        raise ValueError("rope_freqs holds no scaling (all factors <= 1)")
    inv_wavelen = freqs / (2 * math.pi)
    smooth = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6)
    s = (1.0 / factors[smooth] - 1.0 / factor) / (1.0 - 1.0 / factor)
    if smooth.sum() >= 2:
        slope, intercept = np.polyfit(inv_wavelen[smooth], s, 1)
        band = orig_ctx / slope  # high_freq_factor - low_freq_factor
        low = -intercept * band
        high = low + band
    elif smooth.sum() == 1:  # one point: assume Meta's low_freq_factor = 1
        low = 1.0
        high = low + (orig_ctx * inv_wavelen[smooth][0] - low) / s[0]
    else:
        low, high = 1.0, 4.0  # Meta's defaults; the check below says whether they fit
    low, high = round(float(low), 4), round(float(high), 4)
    scaling = {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig_ctx,
    }
    if not np.allclose(llama3_rope_factors(scaling, theta, head_dim), factors, rtol=1e-3, atol=1e-4):
        raise ValueError(f"rope_freqs does not match any llama3 rope scaling (best guess {scaling})")
    return scaling


def llama3_rope_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs for an HF llama3 rope_scaling (the forward direction, used for checking)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            s = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.asarray(out)


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF parameter name for a llama.cpp tensor name, or None when it has no HF counterpart."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{parts[3]}"
    return None


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    HF rotates the two halves of each head (rotate_half); ggml's "normal" rope rotates adjacent pairs,
    so llama.cpp interleaves each head's rows: (head, half, i) -> (head, i, half). We apply the inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _tensor_to_torch(t: Any) -> torch.Tensor:
    _check_type(t.name, t.tensor_type)
    shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists the fastest dimension first
    if t.tensor_type == QT.BF16:
        # Keep BF16 bit-exact instead of going through gguf's float32 path.
        raw = np.ascontiguousarray(t.data).view(np.int16).reshape(shape)
        return torch.from_numpy(raw.copy()).view(torch.bfloat16)
    arr = dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))


def _convert_tensors(
    reader: GGUFReader, config: dict[str, Any], arch: str, dtype: torch.dtype, progress: bool
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    n_head, n_head_kv = config["num_attention_heads"], config["num_key_value_heads"]
    bar = tqdm(reader.tensors, desc="Converting GGUF", unit="tensor", disable=not progress)
    for t in bar:
        if t.name == _ROPE_FREQS:
            continue  # folded into config.json's rope_scaling
        name = hf_tensor_name(t.name)
        if name is None:
            raise ValueError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart for architecture {arch!r}")
        w = _tensor_to_torch(t)
        # Only "llama" uses ggml's normal (pairwise) rope and got permuted; qwen2 uses NEOX rope, unpermuted.
        if arch == "llama" and ".attn_q." in t.name:
            w = unpermute_rotary(w, n_head)
        elif arch == "llama" and ".attn_k." in t.name:
            w = unpermute_rotary(w, n_head_kv)
        state[name] = w.to(dtype).contiguous()
    return state


def _check_complete(state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config["tie_word_embeddings"]:
        expected.append("lm_head.weight")
    for i in range(config["num_hidden_layers"]):
        expected += [f"model.layers.{i}.{_BLOCK_TENSORS[k]}.weight" for k in _BLOCK_TENSORS]
    missing = [n for n in expected if n not in state]
    if missing:
        raise ValueError(f"GGUF lacks {len(missing)} required tensors, e.g. {missing[:3]}")


def _eos_ids(meta: dict[str, Any]) -> list[int]:
    # Chat GGUFs often name a separate end-of-turn (eot) / end-of-message (eom) token; generation must
    # stop on those as well as on eos.
    ids: list[int] = []
    for key in ("eos", "eot", "eom"):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    gen: dict[str, Any] = {}
    if meta.get("tokenizer.ggml.bos_token_id") is not None:
        gen["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    eos = _eos_ids(meta)
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        gen["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    return gen


def _write_tokenizer(gguf_path: Path, out: Path, meta: dict[str, Any], ctx: int) -> None:
    if "tokenizer.ggml.model" not in meta:
        logger.warning("%s has no tokenizer metadata; writing no tokenizer files", gguf_path.name)
        return
    from transformers import AutoTokenizer

    # Load through a folder that holds nothing but the GGUF, so stray HF files next to the user's
    # GGUF (or our half-written output) cannot be picked up instead.
    src = out / ".gguf-src"
    src.mkdir()
    try:
        (src / gguf_path.name).symlink_to(gguf_path)
        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_path.name)
        tok.save_pretrained(str(out))
    finally:
        shutil.rmtree(src, ignore_errors=True)

    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for junk in ("is_local", "local_files_only"):  # load-time flags transformers 5 saves along
        cfg.pop(junk, None)
    # "TokenizersBackend" exists only in transformers 5; the 4.x name is an alias there.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = ctx
    template = meta.get("tokenizer.chat_template")
    if template:
        # transformers 5 also wrote chat_template.jinja; keep both so 4.x readers get the template too.
        cfg["chat_template"] = template
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    for key in ("add_bos_token", "add_eos_token"):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            cfg[key] = bool(meta[f"tokenizer.ggml.{key}"])
    _write_json(cfg_path, cfg)
    special = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(tok, k, None)}
    _write_json(out / "special_tokens_map.json", {k: str(v) for k, v in special.items()})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _install(tmp: Path, out: Path) -> None:
    # A rename cannot replace a non-empty folder, so move the old one aside first; readers may briefly
    # see no folder, never a half-written one.
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
