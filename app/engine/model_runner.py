"""The model runner owns the weights and the KV cache, turns a SchedulerOutput into batch tensors,
runs the model and returns logits for the sequences that sample this step. It decides no policy."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from app.engine.config import EngineConfig
from app.engine.layers.attention import AttentionMetadata, PrefillSlice
from app.engine.lora import LoRAManager
from app.engine.models.llama import LlamaModel, ModelConfig
from app.engine.scheduler import ScheduledSeq, SchedulerOutput

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Steps of at most this many rows use the int8 weights (measured on this project's CPU, see
# docs/BENCHMARKS.md): beyond it the packed bf16 product is as fast or faster.
INT8_MAX_TOKENS = 2


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def resolve_int8_max_tokens(quantization: str, device: torch.device, dtype: torch.dtype) -> int:
    if quantization == "int8":
        if device.type != "cpu":
            raise ValueError("quantization=int8 is a CPU decode path; use quantization=none on CUDA")
        return INT8_MAX_TOKENS
    if quantization == "auto" and device.type == "cpu" and dtype == torch.bfloat16:
        return INT8_MAX_TOKENS
    return 0


class ModelRunner:
    def __init__(self, config: EngineConfig, max_model_len: int) -> None:
        self.config = config
        folder = Path(config.model)
        self.model_config = ModelConfig.from_folder(folder)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            log.warning("float16 on CPU is slow and gains nothing; consider bfloat16 or float32")
        self.int8_max_tokens = resolve_int8_max_tokens(config.quantization, self.device, self.dtype)
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        # Our CPU kernels (compiled once per machine); None on CUDA or without a compiler.
        self.cpu_kernels = None
        if self.device.type == "cpu" and config.cpu_kernels and config.block_size == 16:
            from app.engine.layers import cpu_kernels

            self.cpu_kernels = cpu_kernels.load()
        self.model = LlamaModel(
            self.model_config, folder, self.dtype, self.device, self.int8_max_tokens,
            max_positions=max_model_len, kernels=self.cpu_kernels,
        )
        self.lora: LoRAManager | None = None
        if config.enable_lora:
            self.lora = LoRAManager(
                self.model, max_loras=config.max_loras, max_cpu_loras=config.max_cpu_loras,
                max_lora_rank=config.max_lora_rank, device=self.device, dtype=self.dtype,
                pack=self.model.layers[0].qkv.packed is not None,
                kernels=self.model.kernels,
            )
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        cfg = self.model_config
        k_shape = (self.num_blocks, cfg.num_kv_heads, cfg.head_dim, self.block_size)  # see layers/attention.py
        v_shape = (self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(k_shape, dtype=self.dtype, device=self.device), torch.zeros(v_shape, dtype=self.dtype, device=self.device))
            for _ in range(cfg.num_layers)
        ]
        log.info(
            "model loaded: %s on %s, %s%s, %d KV blocks of %d tokens",
            folder.name, self.device, str(self.dtype).removeprefix("torch."),
            f", int8 weights for steps of <= {self.int8_max_tokens} rows" if self.int8_max_tokens else "",
            self.num_blocks, self.block_size,
        )

    def _num_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        cfg = self.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        per_block = 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * elem
        return max(2, self.config.kv_cache_bytes // per_block)

    # ---- one step -------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor | None, list[ScheduledSeq]]:
        """Run the step; return float32 logits [S, vocab] and the S scheduled items that sample."""
        decodes = [s for s in sched.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in sched.scheduled if s.num_new_tokens > 1]
        lora_batch = None
        if self.lora is not None and any(s.seq.lora is not None for s in sched.scheduled):
            # Rows of one adapter side by side (base rows first): see app/engine/lora.py.
            decodes.sort(key=_slot_of)
            prefills.sort(key=_slot_of)
            self.lora.prepare()
            row_slots = [_slot_of(s) for s in decodes]
            for s in prefills:
                row_slots.extend([_slot_of(s)] * s.num_new_tokens)
            lora_batch = self.lora.batch(row_slots, len(decodes))
        ordered = decodes + prefills

        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for item in ordered:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            table = seq.block_table
            for pos in range(start, end):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode=len(decodes),
            decode_block_tables=None,
            decode_context_lens=[],
            decode_mask=None,
            prefills=[],
        )
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        if self.cpu_kernels is not None and all(p.num_new_tokens <= KERNEL_PREFILL_MAX_ROWS for p in prefills):
            meta.cpu_kernels = self.cpu_kernels  # every row in one kernel call per layer
            self._kernel_rows(meta, ordered, pos_t)
        else:
            self._split_rows(meta, decodes, prefills)
        hidden = self.model.forward(ids_t, pos_t, self.kv_caches, meta, lora_batch)

        sampling = [item for item in ordered if item.sample]
        if not sampling:
            return None, []
        last_rows: list[int] = []
        row = 0
        for item in ordered:
            row += item.num_new_tokens
            if item.sample:
                last_rows.append(row - 1)
        rows = hidden[torch.tensor(last_rows, device=dev)] if len(last_rows) != hidden.shape[0] else hidden
        return self.model.logits(rows), sampling


    def _split_rows(self, meta: AttentionMetadata, decodes: list[ScheduledSeq], prefills: list[ScheduledSeq]) -> None:
        """Decode rows batched over their gathered blocks, each prefill chunk on its own (the path
        without the CPU kernel, and for prefill chunks too long for it)."""
        bs, dev = self.block_size, self.device
        if decodes:
            ctx = [s.seq.num_computed_tokens + 1 for s in decodes]
            max_blocks = max(-(-c // bs) for c in ctx)
            tables = [s.seq.block_table[:max_blocks] + [0] * (max_blocks - len(s.seq.block_table[:max_blocks])) for s in decodes]
            meta.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=dev)
            meta.decode_context_lens = ctx
            if self.cpu_kernels is not None:
                meta.cpu_kernels = self.cpu_kernels
                meta.decode_context_lens_t = torch.tensor(ctx, dtype=torch.long)
            elif len(decodes) > 1:
                ar = torch.arange(max_blocks * bs, device=dev)
                meta.decode_mask = (ar[None, :] < torch.tensor(ctx, device=dev)[:, None]).view(len(decodes), 1, 1, -1)
        row = len(decodes)
        for item in prefills:
            seq = item.seq
            n = item.num_new_tokens
            computed = seq.num_computed_tokens
            ctx_len = computed + n
            mask = None
            table = None
            if computed:
                q_pos = torch.arange(computed, ctx_len, device=dev)
                mask = torch.arange(ctx_len, device=dev)[None, :] <= q_pos[:, None]
                table = torch.tensor(seq.block_table[: -(-ctx_len // bs)], dtype=torch.long, device=dev)
            meta.prefills.append(PrefillSlice(row, row + n, ctx_len, table, mask))
            row += n

    def _kernel_rows(self, meta: AttentionMetadata, ordered: list[ScheduledSeq], pos_t: torch.Tensor) -> None:
        """Every row's block table and context length for the CPU kernel (one call per layer)."""
        bs = self.block_size
        ctx = [item.seq.num_computed_tokens + item.num_new_tokens for item in ordered]
        max_blocks = max(-(-c // bs) for c in ctx)
        tables = [item.seq.block_table[:max_blocks] for item in ordered]
        per_seq = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long)
        counts = [item.num_new_tokens for item in ordered]
        meta.row_block_tables = per_seq if max(counts) == 1 else per_seq.repeat_interleave(torch.tensor(counts), dim=0)
        meta.row_context_lens = pos_t + 1


# Prefill chunks up to this many tokens go through the paged-attention kernel with the decode rows;
# a longer chunk makes the step use torch's flash attention for its prefills (measured on 2 cores,
# one SmolLM2 layer: the kernel is faster up to ~512 causal rows, 1.5x slower at 2048).
KERNEL_PREFILL_MAX_ROWS = 768


def _slot_of(item: ScheduledSeq) -> int:
    lora = item.seq.lora
    return lora.slot if lora is not None else 0
