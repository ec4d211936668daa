"""Every setting of one benchmark run, with its default, and the parsers for the compound flags.

One dataclass (`BenchOptions`) is filled from the command line, from a YAML file, or from both
(flags given on the command line win); the runner only ever sees a `BenchOptions`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

DEFAULT_LOG_DIR = "/opt/mim/log"
DATASETS = ("prompts", "random", "sharegpt")
ENDPOINTS = ("chat", "completions")
GOODPUT_KEYS = ("ttft", "tpot", "e2el")


class OptionError(ValueError):
    """A setting that cannot be used; the message says which and why."""


@dataclasses.dataclass
class BenchOptions:
    model: str | None = None
    server_url: str = "http://0.0.0.0:8000"
    api_key: str | None = None
    endpoint: str = "chat"
    # the workload
    dataset: str | None = None  # None: "prompts"
    prompts: list[str] | None = None  # inline prompts (YAML `prompts:`)
    prompts_file: str | None = None
    dataset_path: str | None = None  # ShareGPT JSON
    num_prompts: int = 10
    max_tokens: int = 100
    temperature: float = 0.7
    input_len: int = 128  # random dataset
    output_len: int | None = None  # random/sharegpt: tokens to generate (None: --max-tokens for random)
    range_ratio: float = 0.0  # random lengths uniform in [len*(1-r), len*(1+r)]
    ignore_eos: bool = False
    tokenizer: str | None = None  # a local tokenizer (folder or HF name); None: the server's /tokenize
    lora: dict[str, float] | None = None  # adapter name -> weight
    seed: int = 0
    # the load
    concurrent_requests: int = 1
    request_rate: float = math.inf
    burstiness: float = 1.0
    stream: bool = True
    sweep: list[int] | None = None
    num_warmups: int = 1
    request_timeout: float = 600.0
    ready_timeout: float = 0.0  # wait this long for the server to answer /health (0: no waiting)
    goodput: dict[str, float] | None = None  # "ttft"/"tpot"/"e2el" -> milliseconds
    # the output
    log_dir: str = DEFAULT_LOG_DIR
    save: bool = True
    save_individual: bool = False
    plot: bool = True
    json: bool = False
    lang: str = "en"
    progress: bool = True

    def check(self) -> BenchOptions:
        """Raise OptionError for a combination that cannot run; returns self."""
        if not self.model:
            raise OptionError("--model is required (or server.model in the config file)")
        if not self.server_url.startswith(("http://", "https://")):
            raise OptionError(f"--server-url must start with http:// or https://, not {self.server_url!r}")
        if self.endpoint not in ENDPOINTS:
            raise OptionError(f"--endpoint must be one of {', '.join(ENDPOINTS)}")
        if self.dataset_name not in DATASETS:
            raise OptionError(f"--dataset must be one of {', '.join(DATASETS)}")
        if self.dataset_name == "sharegpt" and not self.dataset_path:
            raise OptionError("--dataset sharegpt needs --dataset-path (a ShareGPT JSON file)")
        for name in ("num_prompts", "max_tokens", "concurrent_requests", "input_len"):
            if int(getattr(self, name)) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be at least 1")
        if self.output_len is not None and self.output_len < 1:
            raise OptionError("--output-len must be at least 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise OptionError("--range-ratio must be in [0, 1)")
        if not self.request_rate > 0:
            raise OptionError("--request-rate must be positive (inf: send as fast as concurrency allows)")
        if not self.burstiness > 0:
            raise OptionError("--burstiness must be positive")
        if not 0.0 <= self.temperature <= 2.0:
            raise OptionError("--temperature must be in [0, 2]")
        if self.sweep is not None and (not self.sweep or min(self.sweep) < 1):
            raise OptionError("--sweep takes concurrency levels of at least 1, e.g. 1,2,4,8")
        if self.lang not in ("en", "zh"):
            raise OptionError("--lang must be en or zh")
        if self.num_warmups < 0:
            raise OptionError("--num-warmups must be 0 or more")
        if self.ready_timeout < 0:
            raise OptionError("--ready-timeout must be 0 or more")
        if not self.request_timeout > 0:
            raise OptionError("--request-timeout must be positive")
        return self

    @property
    def dataset_name(self) -> str:
        return self.dataset or "prompts"

    @property
    def completion_tokens_target(self) -> int:
        """max_tokens sent with each request of the random dataset."""
        return self.output_len if self.output_len is not None else self.max_tokens

    def describe(self) -> dict[str, Any]:
        """The test configuration as it goes into the log file (the API key masked)."""
        out = dataclasses.asdict(self)
        if out.get("api_key"):
            out["api_key"] = "***"
        if out.get("prompts") is not None:
            out["prompts"] = f"<{len(out['prompts'])} inline prompts>"
        out["dataset"] = self.dataset_name
        out["request_rate"] = _num(self.request_rate)
        out["burstiness"] = _num(self.burstiness)
        return out


def _num(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


# ---- parsers for compound values -----------------------------------------------------------


def parse_float(text: Any) -> float:
    """A number, or inf/infinity."""
    if isinstance(text, (int, float)):
        return float(text)
    value = str(text).strip().lower()
    if value in ("inf", "infinity", "+inf"):
        return math.inf
    try:
        return float(value)
    except ValueError:
        raise OptionError(f"{text!r} is not a number") from None


def parse_sweep(text: Any) -> list[int]:
    """'1,2,4,8' (or a YAML list) -> [1, 2, 4, 8]."""
    items = text if isinstance(text, (list, tuple)) else str(text).replace(" ", "").split(",")
    try:
        levels = [int(item) for item in items if str(item) != ""]
    except ValueError:
        raise OptionError(f"--sweep takes integers separated by commas, not {text!r}") from None
    if not levels or min(levels) < 1:
        raise OptionError(f"--sweep takes concurrency levels of at least 1, not {text!r}")
    return levels


def parse_goodput(items: Any) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] / 'ttft:500 tpot:50' / {'ttft': 500} -> {'ttft': 500.0, 'tpot': 50.0} (ms)."""
    if isinstance(items, dict):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        words = items.split() if isinstance(items, str) else [w for item in items for w in str(item).split()]
        pairs = []
        for word in words:
            name, sep, value = word.partition(":")
            if not sep:
                raise OptionError(f"--goodput takes KEY:MILLISECONDS pairs (ttft, tpot, e2el), not {word!r}")
            pairs.append((name, value))
    out: dict[str, float] = {}
    for name, value in pairs:
        name = name.strip().lower()
        if name not in GOODPUT_KEYS:
            raise OptionError(f"--goodput key {name!r} is not one of {', '.join(GOODPUT_KEYS)}")
        number = parse_float(value)
        if not number > 0:
            raise OptionError(f"--goodput {name} must be a positive number of milliseconds")
        out[name] = number
    return out


def parse_lora(text: Any) -> dict[str, float]:
    """'sql' -> {'sql': 1}; 'sql:3,chat:1' -> weights; a YAML mapping or list works too."""
    if isinstance(text, dict):
        pairs = [(str(k), v) for k, v in text.items()]
    else:
        items = text if isinstance(text, (list, tuple)) else str(text).split(",")
        pairs = []
        for item in items:
            item = str(item).strip()
            if not item:
                continue
            name, sep, weight = item.rpartition(":")
            pairs.append((name, weight) if sep else (item, 1.0))
    out: dict[str, float] = {}
    for name, weight in pairs:
        name = name.strip()
        if not name:
            raise OptionError(f"--lora takes NAME or NAME:WEIGHT,..., not {text!r}")
        value = parse_float(weight)
        if not (value > 0 and math.isfinite(value)):
            raise OptionError(f"--lora weight of {name!r} must be a positive number")
        out[name] = out.get(name, 0.0) + value
    if not out:
        raise OptionError("--lora names no adapter")
    return out


def resolve_log_dir(wanted: str) -> tuple[Path, str | None]:
    """The folder to write logs in, and a warning when `wanted` is not writable and another is used."""
    path = Path(wanted).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path, None
    except OSError:
        pass
    home = Path(os.environ.get("MXEXT_HOME") or "~/.cache/mxext").expanduser()
    for fallback in (home / "bench-logs", Path.cwd() / "mim-logs"):
        try:
            fallback.mkdir(parents=True, exist_ok=True)
            if os.access(fallback, os.W_OK):
                return fallback, f"log folder {path} is not writable; writing to {fallback} instead"
        except OSError:
            continue
    raise OptionError(f"no writable log folder ({path} is not writable); pass --log-dir or --no-save")
