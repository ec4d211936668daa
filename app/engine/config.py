"""The engine's frozen configuration. The engine never reads the environment; it gets one of these."""

from __future__ import annotations

import dataclasses

DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "int8")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str  # a folder with config.json + safetensors (already resolved from the store)
    dtype: str = "auto"  # auto: bf16 where the hardware computes it well, else fp32
    device: str = "auto"  # auto: cuda when available, else cpu
    # Weight-only int8 for the linear layers of small steps (decode); larger steps use `dtype`.
    # `auto` picks it on CPU, where decode is memory-bound; never on CUDA.
    quantization: str = "none"
    max_model_len: int | None = None  # None: the model's own limit, capped at 8192
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    # KV cache size: an explicit block count wins; else a memory budget in bytes.
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 2 * 1024**3
    enable_prefix_caching: bool = True
    max_waiting: int = 1024  # the waiting queue's bound: a full queue rejects new requests
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    cpu_kernels: bool = True  # our compiled CPU attention kernel (falls back to PyTorch if it can't build)
    # Multi-LoRA (app/engine/lora.py): adapters on the compute device at once, adapters registered
    # in host memory, the largest rank accepted.
    enable_lora: bool = True
    max_loras: int = 8
    max_cpu_loras: int = 16
    max_lora_rank: int = 32

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS + ("auto",):
            raise ValueError(f"quantization={self.quantization!r}: choose auto, none or int8")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_loras", "max_cpu_loras",
                     "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError("num_kv_blocks must be at least 2")
