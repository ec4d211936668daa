"""`mxext serve`: the flags, the ServeConfig they build, and its round trip through MXEXT_SERVE_*.

The environment is how settings reach an app built by a factory in another process
(`granian --interface asgi --factory app.http.app:create_app_from_env`); `mxext serve` itself runs
granian embedded in this process (see `app.http.server`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping

ENV_PREFIX = "MXEXT_SERVE_"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}  # fmt: skip


def parse_size(text: str) -> int:
    """'512MiB', '2G', '1048576' -> bytes."""
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 512MiB, 2GiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Everything `mxext serve` needs: where to listen, what to serve, and the engine's limits."""

    host: str = "0.0.0.0"
    port: int = 8000
    model: str | None = None  # None: MIM_MODEL_NAME or the embedded default
    served_model_name: tuple[str, ...] = ()  # empty: the model name as given
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    api_key: str | None = None
    shutdown_timeout: float = 30.0
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    kv_cache_memory: int = 2 << 30  # as EngineConfig: room for ~90k tokens of SmolLM2
    num_kv_blocks: int | None = None
    max_waiting: int = 1024
    quantization: str = "auto"
    enable_prefix_caching: bool = True
    max_body_bytes: int = 8 << 20
    num_threads: int | None = None
    # LoRA (None: the environment, then the --lora-config file, then the defaults; see app.adapters.lora_config)
    lora_config: str | None = None
    lora_modules: tuple[str, ...] = ()  # NAME=PATH adapters loaded at start-up
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    max_lora_rank: int | None = None
    admin_key: str | None = None  # guards load/unload of adapters (else $VLLM_MXEXT_ADMIN_KEY)

    def to_env(self) -> dict[str, str]:
        """MXEXT_SERVE_* variables that `from_env` turns back into this config."""
        env = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "1" if value else "0"
            env[ENV_PREFIX + field.name.upper()] = str(value)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeConfig:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is None or raw == "":
                continue
            values[field.name] = _parse_env(field.name, field.default, raw)
        return cls(**values)


_OPTIONAL_INTS = ("max_model_len", "num_kv_blocks", "num_threads", "max_loras", "max_cpu_loras", "max_lora_rank")


def _parse_env(name: str, default: object, raw: str) -> object:
    try:
        if name in ("served_model_name", "lora_modules"):
            return tuple(part for part in raw.split(",") if part)
        if name in ("kv_cache_memory", "max_body_bytes"):
            return parse_size(raw)
        if isinstance(default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, int) or name in _OPTIONAL_INTS:
            return int(raw)
        return raw
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from None


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` on the `mxext` subcommands."""
    defaults = ServeConfig()
    p = sub.add_parser("serve", help="Serve a model over the OpenAI-compatible HTTP API (granian + Litestar)")
    p.add_argument("--host", default=defaults.host, help="Address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=defaults.port, help="Port to listen on (default %(default)s)")
    p.add_argument("--model", default=None,
                   help="Model name in the store or an HF folder (default: $MIM_MODEL_NAME or smollm2-135m-instruct)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="Name(s) clients use in `model`; the first is reported (default: --model as given)")
    p.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default=defaults.device, help="auto, cpu or cuda (default %(default)s)")
    p.add_argument("--max-model-len", type=int, default=None, help="Context length (default: the model's, capped)")
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY") or None,
                   help="Require `Authorization: Bearer KEY` on model routes (default: $VLLM_API_KEY, else open)")
    p.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout,
                   help="Seconds in-flight requests get to finish after SIGTERM (default %(default)s)")
    p.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-memory", type=parse_size, default=defaults.kv_cache_memory,
                    help="KV-cache budget, e.g. 512MiB or 2GiB (default 512MiB)")
    kv.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache size in blocks (wins over memory)")
    p.add_argument("--max-waiting", type=int, default=defaults.max_waiting,
                   help="Bound of the waiting queue; beyond it requests get 503 (default %(default)s)")
    p.add_argument("--quantization", default=defaults.quantization, choices=["auto", "none", "int8"])
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--max-request-body", type=parse_size, default=defaults.max_body_bytes, dest="max_body_bytes",
                   help="Largest request body accepted; larger ones get 413 (default 8MiB)")
    p.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads on CPU")
    lora = p.add_argument_group("LoRA adapters (see docs/LORA.md)")
    lora.add_argument("--lora-config", default=None, metavar="FILE",
                      help="YAML file: adapters to serve, LoRA limits, auto_load (the environment wins over it)")
    lora.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                      help="Adapters to load at start-up (vLLM's flag); their folders become allowed roots")
    lora.add_argument("--max-loras", type=int, default=None,
                      help="Adapters on the device at once (default: $MIM_MAX_GPU_LORAS or $VLLM_MAX_LORAS, else 8)")
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="Adapters kept in host memory (default: $MIM_MAX_CPU_LORAS, else 16)")
    lora.add_argument("--max-lora-rank", type=int, default=None,
                      help="Largest adapter rank accepted (default: $VLLM_MAX_LORA_RANK, else 32)")
    lora.add_argument("--admin-key", default=None,
                      help="Require `Authorization: Bearer KEY` on adapter load/unload (default: $VLLM_MXEXT_ADMIN_KEY)")
    p.set_defaults(func=run)
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        served_model_name=tuple(args.served_model_name or ()),
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        api_key=args.api_key,
        shutdown_timeout=args.shutdown_timeout,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
        num_kv_blocks=args.num_kv_blocks,
        max_waiting=args.max_waiting,
        quantization=args.quantization,
        enable_prefix_caching=args.enable_prefix_caching,
        max_body_bytes=args.max_body_bytes,
        num_threads=args.num_threads,
        lora_config=args.lora_config,
        lora_modules=tuple(args.lora_modules or ()),
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=args.max_lora_rank,
        admin_key=args.admin_key,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of `mxext serve`."""
    import sys

    from app.http import server
    from app.http.state import lora_serving_of

    config = config_from_args(args)
    try:  # a bad LoRA config file or LoRA variable ends here, before anything listens
        lora_serving_of(config)
    except ValueError as exc:
        print(f"mxext serve: error: {exc}", file=sys.stderr)
        return 2
    return server.run(config)
