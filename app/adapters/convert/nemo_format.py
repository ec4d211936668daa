"""NeMo (1.x, Megatron-core GPT) LoRA: a `.nemo` tar with `model_config.yaml` and `model_weights.ckpt`.

Layout, from NVIDIA/NeMo:
* keys `model.decoder.layers.{i}.self_attention.adapter_layer.lora_kqv_adapter.linear_{in,out}.weight`,
  `...self_attention.adapter_layer.lora_dense_attention_adapter...`, `...mlp.adapter_layer.lora_hto4h_adapter...`,
  `...mlp.adapter_layer.lora_4htoh_adapter...` (scripts/nlp_language_modeling/merge_lora_weights/merge.py);
  linear_in is A [r, in], linear_out is B [out, r]; the canonical variant spells the unfused ones
  `lora_unfused_kqv_adapter.{q,k,v}_adapter` and `lora_unfused_hto4h_adapter.{gate,up}_adapter`.
* the fused QKV output follows linear_qkv: per query group, its query heads, then one key head,
  then one value head, each head_dim rows (nemo/export/utils/lora_converter.py,
  convert_lora_weights_to_canonical: reshape to (heads + 2 * groups, head_dim, r) and slice).
* the fused h-to-4h output is [gate; up] halves (same file; merge.py adds it to linear_fc1).
* scale = alpha / adapter_dim for every adapter (ParallelLinearAdapter.forward: x * (alpha / dim)).
* the checkpoint is a torch.save'd flat dict of tensors; a TP=1 archive keeps it at the top
  (`./model_weights.ckpt`; TensorRT-LLM's unpack_nemo_weights looks for both spellings).

NeMo has one adapter_dim and one alpha per adapter, and one A for q, k and v together. A PEFT
adapter with its own A per projection is written exactly by stacking the distinct A's and placing
each B in its own columns (zeros elsewhere); modules are zero-padded to one adapter_dim, and alpha
is chosen so alpha / adapter_dim is the adapter's scale, bit for bit (rsLoRA included).
"""

from __future__ import annotations

import io
import json
import pickle
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from app.adapters.convert.adapter import (
    DTYPE_NAMES,
    SIDECAR_FILE,
    SIDECAR_VERSION,
    Adapter,
    LoraModule,
    ModelLayout,
    build_peft_config,
    check_tensor_pair,
    module_scale,
    parse_sidecar,
    peft_module_params,
    usable_peft_config,
)
from app.adapters.convert.detect import NEMO_CONFIG, NEMO_WEIGHTS
from app.jobs.context import JobError

_KEY = re.compile(
    r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>self_attention|mlp)\.adapter_layer\.(?P<adapter>lora_\w+?_adapter)"
    r"\.(?:(?P<member>q|k|v|gate|up)_adapter\.)?linear_(?P<io>in|out)\.weight$"
)
# NeMo adapter -> (block, the HF projections it covers, NeMo's target_modules name)
_FUSED = {
    "lora_kqv_adapter": ("self_attention", ("q_proj", "k_proj", "v_proj"), "attention_qkv"),
    "lora_hto4h_adapter": ("mlp", ("gate_proj", "up_proj"), "mlp_fc1"),
}
_SINGLE = {
    "lora_dense_attention_adapter": ("self_attention", "o_proj", "attention_dense"),
    "lora_4htoh_adapter": ("mlp", "down_proj", "mlp_fc2"),
}
_UNFUSED = {"lora_unfused_kqv_adapter": "self_attention", "lora_unfused_hto4h_adapter": "mlp"}
_PRECISION = {torch.float32: 32, torch.float16: 16, torch.bfloat16: "bf16"}


# -- reading ---------------------------------------------------------------------------------------


class _Archive:
    """Members of a .nemo tar (read in memory, never extracted) or of its unpacked folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, bytes | Path] = {}
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.is_file():
                    self.files[file.relative_to(path).as_posix()] = file
            return
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar.getmembers():
                    name = member.name.removeprefix("./")
                    if member.isfile() and (name.endswith((".yaml", ".ckpt")) or name == SIDECAR_FILE):
                        handle = tar.extractfile(member)
                        data = handle.read() if handle is not None else b""
                        if len(data) != member.size:
                            raise tarfile.ReadError("unexpected end of data")
                        self.files[name] = data
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise JobError(f"{path.name} is not a readable .nemo archive (corrupt or truncated tar: {exc}); "
                           "copy it again or re-export it from NeMo") from None

    def read(self, name: str) -> bytes | None:
        item = self.files.get(name)
        return item.read_bytes() if isinstance(item, Path) else item


def read_nemo(path: Path, tick: Callable[[], None]) -> Adapter:
    archive = _Archive(path)
    raw_cfg = archive.read(NEMO_CONFIG)
    if raw_cfg is None:
        raise JobError(f"{path.name} has no {NEMO_CONFIG}; a NeMo LoRA archive holds {NEMO_CONFIG} and {NEMO_WEIGHTS}")
    try:
        cfg = yaml.safe_load(raw_cfg)
    except yaml.YAMLError as exc:
        raise JobError(f"{path.name}: {NEMO_CONFIG} is not valid YAML ({exc})") from None
    if not isinstance(cfg, dict):
        raise JobError(f"{path.name}: {NEMO_CONFIG} must hold a mapping")
    dim, alpha = _lora_settings(path, cfg)
    state = _load_state(path, archive, cfg)
    layout = _layout(cfg)
    fused = _collect(path, state, tick)

    modules: dict[tuple[int, str], LoraModule] = {}
    for (layer, adapter_name, member), io_pair in sorted(fused.items()):
        tick()
        where = f"{path.name}: layer {layer} {adapter_name}" + (f".{member}_adapter" if member else "")
        if "in" not in io_pair or "out" not in io_pair:
            raise JobError(f"{where} has only linear_{'in' if 'in' in io_pair else 'out'}")
        a, b = io_pair["in"], io_pair["out"]
        check_tensor_pair(where, a, b)
        if a.shape[0] != dim:
            raise JobError(f"{where}: rank {a.shape[0]} differs from adapter_dim={dim} in {NEMO_CONFIG}")
        for module, b_part in _unfuse(where, adapter_name, member, b, layout):
            modules[(layer, module)] = LoraModule(a, b_part, alpha)
    if not modules:
        raise JobError(f"{path.name}: {NEMO_WEIGHTS} holds no LoRA weights")
    base = cfg.get("restore_from_path") or None
    generic = Adapter(modules, base_model=str(base) if base else None, layout=layout)
    return _restore_original(generic, parse_sidecar(archive.read(SIDECAR_FILE)), dim, alpha) or generic


def _lora_settings(path: Path, cfg: dict) -> tuple[int, float]:
    peft = cfg.get("peft")
    tuning = peft.get("lora_tuning") if isinstance(peft, dict) else None
    scheme = str(peft.get("peft_scheme", "lora")).lower() if isinstance(peft, dict) else None
    if not isinstance(tuning, dict) or (scheme and "lora" not in scheme):
        raise JobError(f"{path.name}: {NEMO_CONFIG} has no peft.lora_tuning section (peft_scheme="
                       f"{scheme!r}); only NeMo LoRA adapters convert")
    dim = tuning.get("adapter_dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise JobError(f"{path.name}: peft.lora_tuning.adapter_dim={dim!r} must be a positive integer")
    alpha = tuning.get("alpha")
    alpha = dim if alpha is None else alpha  # NeMo's ParallelLinearAdapter: alpha defaults to dim
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise JobError(f"{path.name}: peft.lora_tuning.alpha={alpha!r} must be a number")
    if tuning.get("weight_tying"):
        raise JobError(f"{path.name}: weight-tied LoRA (peft.lora_tuning.weight_tying) does not convert; "
                       "train without weight tying")
    return dim, float(alpha)


def _load_state(path: Path, archive: _Archive, cfg: dict) -> dict:
    tp, pp = cfg.get("tensor_model_parallel_size", 1) or 1, cfg.get("pipeline_model_parallel_size", 1) or 1
    candidates = [n for n in archive.files if n == NEMO_WEIGHTS or n.endswith("/" + NEMO_WEIGHTS)]
    if tp * pp > 1 or len(candidates) > 1:
        raise JobError(f"{path.name} is sharded (tensor_model_parallel_size={tp}, pipeline_model_parallel_size="
                       f"{pp}, {len(candidates)} weight files); merge it to TP=1 PP=1 first (NeMo's "
                       "scripts/checkpoint_converters/lora_converters/to_tp1.py)")
    if not candidates:
        raise JobError(f"{path.name} has no {NEMO_WEIGHTS}; a NeMo LoRA archive holds {NEMO_CONFIG} and {NEMO_WEIGHTS}")
    raw = archive.read(candidates[0])
    try:
        # weights_only: a checkpoint is data; anything that needs arbitrary unpickling is refused.
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise JobError(f"{path.name}: {candidates[0]} holds objects other than tensors, which torch.load refuses "
                       f"with weights_only=True and this service never unpickles ({str(exc).splitlines()[0]}); "
                       "re-save the adapter's state dict as plain tensors") from None
    except Exception as exc:  # torch reports a damaged zip as RuntimeError, a short file as EOFError, ...
        raise JobError(f"{path.name}: {candidates[0]} is corrupt or truncated ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); copy it again") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint wraps the weights
    if not isinstance(state, dict):
        raise JobError(f"{path.name}: {candidates[0]} must hold a dict of tensors, got {type(state).__name__}")
    return state


def _layout(cfg: dict) -> ModelLayout | None:
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    groups, channels, ffn, layers = (cfg.get(k) for k in ("num_query_groups", "kv_channels", "ffn_hidden_size", "num_layers"))
    return ModelLayout(
        hidden_size=hidden, num_heads=heads, num_kv_heads=int(groups or heads),
        head_dim=int(channels or hidden // heads), intermediate_size=int(ffn) if ffn else None,
        num_layers=int(layers) if layers else None,
    )


def _collect(path: Path, state: dict, tick: Callable[[], None]) -> dict[tuple[int, str, str | None], dict]:
    fused: dict[tuple[int, str, str | None], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        tick()
        m = _KEY.match(str(key))
        known = m and (m["adapter"] in _FUSED or m["adapter"] in _SINGLE or m["adapter"] in _UNFUSED)
        if not known:
            raise JobError(f"{path.name}: {key} is not a LoRA weight this service converts (lora_kqv_adapter, "
                           "lora_dense_attention_adapter, lora_hto4h_adapter, lora_4htoh_adapter, or their "
                           "unfused variants)")
        if (m["adapter"] in _UNFUSED) != (m["member"] is not None):
            raise JobError(f"{path.name}: {key} mixes fused and unfused adapter names")
        if not isinstance(value, torch.Tensor):
            raise JobError(f"{path.name}: {key} is not a tensor")
        fused.setdefault((int(m["layer"]), m["adapter"], m["member"]), {})[m["io"]] = value
    return fused


def _unfuse(where: str, adapter_name: str, member: str | None, b: torch.Tensor,
            layout: ModelLayout | None) -> list[tuple[str, torch.Tensor]]:
    if adapter_name in _SINGLE:
        return [(_SINGLE[adapter_name][1], b)]
    if member is not None:  # canonical (unfused) variant
        return [(f"{member}_proj", b)]
    if adapter_name == "lora_hto4h_adapter":
        if b.shape[0] % 2:
            raise JobError(f"{where}: linear_out has {b.shape[0]} rows; the fused gate+up output must be even")
        gate, up = b.split(b.shape[0] // 2)
        return [("gate_proj", gate), ("up_proj", up)]
    if layout is None:
        raise JobError(f"{where}: the fused QKV adapter needs hidden_size and num_attention_heads in {NEMO_CONFIG}")
    heads, groups, head_dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
    if heads % groups or b.shape[0] != (heads + 2 * groups) * head_dim:
        raise JobError(f"{where}: linear_out has {b.shape[0]} rows, but {NEMO_CONFIG} says (heads {heads} + 2 x "
                       f"groups {groups}) x head_dim {head_dim}; the archive's config does not match its weights")
    per_group = heads // groups
    grouped = b.reshape(groups, per_group + 2, head_dim, b.shape[1])
    return [
        ("q_proj", grouped[:, :per_group].reshape(-1, b.shape[1])),
        ("k_proj", grouped[:, per_group].reshape(-1, b.shape[1])),
        ("v_proj", grouped[:, per_group + 1].reshape(-1, b.shape[1])),
    ]


def _restore_original(generic: Adapter, sidecar: dict | None, dim: int, alpha: float) -> Adapter | None:
    """The adapter as it was before we fused it, if our sidecar is there and agrees with the weights
    (every dropped rank component is exactly zero, ranks and scales match); else None."""
    if sidecar is None or sidecar.get("format") != "nemo":
        return None
    cfg = usable_peft_config(sidecar.get("peft_config"))
    components = sidecar.get("components")
    if cfg is None or not isinstance(components, dict):
        return None
    nemo_scale = module_scale(alpha, dim, False)
    use_rslora = bool(cfg.get("use_rslora", False))
    modules: dict[tuple[int, str], LoraModule] = {}
    for (layer, module), weights in generic.modules.items():
        span = components.get(f"{layer}.{module}")
        if span is None:
            if torch.count_nonzero(weights.b):
                return None
            continue  # a projection the original did not adapt: NeMo's fused adapter carried zeros for it
        if not (isinstance(span, list) and len(span) == 2 and 0 <= span[0] < span[1] <= dim):
            return None
        start, stop = span
        if torch.count_nonzero(weights.b[:, :start]) or torch.count_nonzero(weights.b[:, stop:]):
            return None
        rank, peft_alpha = peft_module_params(cfg, layer, module)
        if rank != stop - start or module_scale(peft_alpha, rank, use_rslora) != nemo_scale:
            return None
        modules[(layer, module)] = LoraModule(weights.a[start:stop], weights.b[:, start:stop], peft_alpha)
    if len(modules) != len(components) or not modules:
        return None
    return Adapter(modules, use_rslora=use_rslora, peft_config=cfg, base_model=cfg.get("base_model_name_or_path"),
                   layout=generic.layout)


# -- writing ---------------------------------------------------------------------------------------


def write_nemo(adapter: Adapter, file: Path, tick: Callable[[], None]) -> int:
    """Write `adapter` as a fused-variant .nemo at `file`; returns the adapter_dim it got."""
    scales = {adapter.scale(key) for key in adapter.modules}
    if len(scales) > 1:
        raise JobError("NeMo keeps one alpha / adapter_dim for all modules, but this adapter's modules are scaled "
                       f"differently ({', '.join(sorted(f'{s:g}' for s in scales))}, from rank_pattern/alpha_pattern); "
                       "convert it to trtllm, which folds each module's scale into its weights")
    scale = scales.pop()
    state, components = _fuse_all(adapter, tick)
    dim = max(t.shape[0] for k, t in state.items() if k.endswith("linear_in.weight"))
    for key in list(state):  # one adapter_dim for all: pad with zero rank components
        tick()
        t = state[key]
        if key.endswith("linear_in.weight") and t.shape[0] < dim:
            state[key] = torch.cat([t, t.new_zeros(dim - t.shape[0], t.shape[1])])
        elif key.endswith("linear_out.weight") and t.shape[1] < dim:
            state[key] = torch.cat([t, t.new_zeros(t.shape[0], dim - t.shape[1])], dim=1)
    nemo_alpha = scale * dim
    if module_scale(nemo_alpha, dim, False) != scale:
        raise JobError(f"the scale {scale!r} cannot be written exactly as NeMo's alpha / adapter_dim ({dim}); "
                       "convert it to trtllm instead")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    sidecar = {"version": SIDECAR_VERSION, "format": "nemo", "peft_config": build_peft_config(adapter), "components": components,
               "dtype": DTYPE_NAMES.get(adapter.dtype, str(adapter.dtype))}
    members = {
        NEMO_CONFIG: yaml.safe_dump(_model_config(adapter, dim, nemo_alpha), sort_keys=False).encode(),
        NEMO_WEIGHTS: buffer.getvalue(),
        SIDECAR_FILE: json.dumps(sidecar, indent=2).encode(),
    }
    with tarfile.open(file, "w") as tar:  # uncompressed, "./"-prefixed names: as NeMo's save_to writes them
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return dim


def _fuse_all(adapter: Adapter, tick: Callable[[], None]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    state: dict[str, torch.Tensor] = {}
    components: dict[str, list[int]] = {}
    layers = sorted({layer for layer, _ in adapter.modules})
    prefix = "model.decoder.layers.{layer}.{block}.adapter_layer.{name}.linear_{io}.weight"
    for layer in layers:
        tick()
        for name, (block, members, _) in _FUSED.items():
            present = {m: adapter.modules.get((layer, m)) for m in members}
            if not any(present.values()):
                continue
            a, b, spans = _fuse(adapter, layer, name, present)
            state[prefix.format(layer=layer, block=block, name=name, io="in")] = a
            state[prefix.format(layer=layer, block=block, name=name, io="out")] = b
            components.update({f"{layer}.{m}": list(span) for m, span in spans.items()})
        for name, (block, module, _) in _SINGLE.items():
            weights = adapter.modules.get((layer, module))
            if weights is not None:
                state[prefix.format(layer=layer, block=block, name=name, io="in")] = weights.a.contiguous()
                state[prefix.format(layer=layer, block=block, name=name, io="out")] = weights.b.contiguous()
                components[f"{layer}.{module}"] = [0, weights.rank]
    return state, components


def _fuse(adapter: Adapter, layer: int, name: str, present: dict[str, LoraModule | None]):
    """One A for the fused projections: the distinct A's stacked (projections with bit-identical A,
    e.g. read from NeMo, share one block), each B in its block's columns, zeros elsewhere."""
    blocks: list[tuple[torch.Tensor, tuple[int, int]]] = []
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for module, weights in present.items():
        if weights is None:
            continue
        for block, span in blocks:
            if block.shape == weights.a.shape and block.dtype == weights.a.dtype and torch.equal(block, weights.a):
                spans[module] = span
                break
        else:
            spans[module] = (offset, offset + weights.rank)
            blocks.append((weights.a, spans[module]))
            offset += weights.rank
    a = torch.cat([block for block, _ in blocks])
    out_rows = _out_rows(adapter, layer, name, present)
    outs = {}
    for module, rows in out_rows.items():
        b = a.new_zeros(rows, offset)
        if present[module] is not None:
            start, stop = spans[module]
            b[:, start:stop] = present[module].b
        outs[module] = b
    if name == "lora_hto4h_adapter":
        return a, torch.cat([outs["gate_proj"], outs["up_proj"]]), spans
    layout = adapter.layout
    per_group = layout.num_heads // layout.num_kv_heads
    q = outs["q_proj"].reshape(layout.num_kv_heads, per_group, layout.head_dim, offset)
    k = outs["k_proj"].reshape(layout.num_kv_heads, 1, layout.head_dim, offset)
    v = outs["v_proj"].reshape(layout.num_kv_heads, 1, layout.head_dim, offset)
    return a, torch.cat([q, k, v], dim=1).reshape(-1, offset), spans


def _out_rows(adapter: Adapter, layer: int, name: str, present: dict[str, LoraModule | None]) -> dict[str, int]:
    if name == "lora_hto4h_adapter":
        rows = {w.b.shape[0] for w in present.values() if w is not None}
        if adapter.layout and adapter.layout.intermediate_size:
            rows.add(adapter.layout.intermediate_size)
        if len(rows) != 1:
            raise JobError(f"layer {layer}: gate_proj and up_proj LoRA outputs differ in size ({sorted(rows)})")
        size = rows.pop()
        return {"gate_proj": size, "up_proj": size}
    layout = adapter.layout
    if layout is None or not layout.q_size or not layout.kv_size:
        raise JobError("writing q/k/v LoRA as NeMo's fused QKV adapter needs the base model's attention layout "
                       "(heads, KV heads, head size): pass base_model (a model in the store, or a folder with its "
                       "config.json inside the allowed adapter folders)")
    want = {"q_proj": layout.q_size, "k_proj": layout.kv_size, "v_proj": layout.kv_size}
    for module, weights in present.items():
        if weights is not None and weights.b.shape[0] != want[module]:
            raise JobError(f"layer {layer} {module}: LoRA output has {weights.b.shape[0]} rows but the base model's "
                           f"{module} has {want[module]}; was the adapter trained for another model?")
    return want


def _model_config(adapter: Adapter, dim: int, alpha: float) -> dict:
    layout = adapter.layout
    layers = sorted({layer for layer, _ in adapter.modules})
    present = set(adapter.target_modules)
    targets = [nemo for _, members, nemo in _FUSED.values() if present & set(members)]
    targets += [nemo for _, module, nemo in _SINGLE.values() if module in present]
    num_layers = layout.num_layers if layout and layout.num_layers else layers[-1] + 1
    cfg: dict = {"mcore_gpt": True, "precision": _PRECISION.get(adapter.dtype, 32),
                 "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "num_layers": num_layers}
    if layout is not None:
        cfg.update(hidden_size=layout.hidden_size, ffn_hidden_size=layout.intermediate_size,
                   num_attention_heads=layout.num_heads, num_query_groups=layout.num_kv_heads,
                   kv_channels=layout.head_dim)
    else:
        cfg["hidden_size"] = _hidden_size(adapter)
    cfg["restore_from_path"] = adapter.base_model
    cfg["peft"] = {
        "peft_scheme": "lora",
        "restore_from_path": None,
        "lora_tuning": {
            "variant": "nemo",
            "target_modules": targets,
            "adapter_dim": dim,
            "alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "adapter_dropout": 0.0,
            "column_init_method": "xavier",
            "row_init_method": "zero",
            # NeMo numbers layers from 1 here; null means every layer.
            "layer_selection": None if len(layers) == num_layers else [layer + 1 for layer in layers],
            "weight_tying": False,
            "position_embedding_strategy": None,
        },
    }
    return cfg


def _hidden_size(adapter: Adapter) -> int:
    """The model width, from any module: the input of q/k/v/gate/up, the output of o/down."""
    (_, module), weights = adapter.sorted_items()[0]
    return weights.b.shape[0] if module in ("o_proj", "down_proj") else weights.a.shape[1]
