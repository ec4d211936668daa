"""The YAML test description (`mxext bench --config FILE`, `python -m bench.config_runner FILE`).

    server:       {url, model, api_key, endpoint}
    test_params:  {num_prompts, max_tokens, temperature, concurrent_requests, stream, request_rate,
                   burstiness, dataset, dataset_path, input_len, output_len, range_ratio, ignore_eos,
                   tokenizer, lora, seed, goodput, sweep, num_warmups, request_timeout, ready_timeout}
    prompts:      a list of strings, or {file: path} (one prompt a line)
    output:       {log_dir, save, save_individual, plot, json, lang, progress}

Every key is optional except server.model; the rest default as the command line does. Relative
paths (prompts file, dataset_path) are read from the YAML file's folder. `run_config()` is the
entry point for a worker (benchmark jobs): a parsed mapping in, the results out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from bench.serving.options import BenchOptions, OptionError, parse_float, parse_goodput, parse_lora, parse_sweep

SERVER_KEYS = {"url": "server_url", "model": "model", "api_key": "api_key", "endpoint": "endpoint"}
TEST_KEYS = {
    "num_prompts", "max_tokens", "temperature", "concurrent_requests", "stream", "request_rate", "burstiness",
    "dataset", "dataset_path", "prompts_file", "input_len", "output_len", "range_ratio", "ignore_eos", "tokenizer",
    "lora", "seed", "goodput", "sweep", "num_warmups", "request_timeout", "ready_timeout",
}  # fmt: skip
OUTPUT_KEYS = {"log_dir", "save", "save_individual", "plot", "json", "lang", "progress"}
FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(BenchOptions)}


def coerce(name: str, value: Any) -> Any:
    """A setting from YAML or the command line, turned into the type BenchOptions holds."""
    if value is None:
        return None
    if name == "lora":
        return parse_lora(value)
    if name == "goodput":
        return parse_goodput(value)
    if name == "sweep":
        return parse_sweep(value)
    if name in ("request_rate", "burstiness", "temperature", "range_ratio", "request_timeout", "ready_timeout"):
        return parse_float(value)
    kind = str(FIELD_TYPES.get(name, ""))
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"{name} must be true or false, not {value!r}")
    if kind.startswith("int"):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise OptionError(f"{name} must be an integer, not {value!r}") from None
    if name == "prompts":
        if not isinstance(value, list) or not all(isinstance(p, (str, int, float)) for p in value):
            raise OptionError("prompts must be a list of strings or {file: path}")
        return [str(p) for p in value]
    return str(value) if not isinstance(value, (list, dict)) else value


def settings_from_mapping(data: Any, base_dir: Path | None = None) -> dict[str, Any]:
    """The YAML mapping -> {BenchOptions field: value}; unknown sections or keys are an error."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionError("the config file must be a mapping with server, test_params, prompts, output")
    unknown = set(data) - {"server", "test_params", "prompts", "output"}
    if unknown:
        raise OptionError(f"unknown section(s) in the config: {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}

    def section(name: str, allowed: dict[str, str] | set[str]) -> None:
        items = data.get(name) or {}
        if not isinstance(items, dict):
            raise OptionError(f"{name} must be a mapping")
        bad = set(items) - set(allowed)
        if bad:
            raise OptionError(f"unknown key(s) in {name}: {', '.join(sorted(bad))}")
        for key, value in items.items():
            field = allowed[key] if isinstance(allowed, dict) else key
            out[field] = coerce(field, value)

    section("server", SERVER_KEYS)
    section("test_params", TEST_KEYS)
    section("output", OUTPUT_KEYS)
    prompts = data.get("prompts")
    if isinstance(prompts, dict):
        if set(prompts) != {"file"}:
            raise OptionError("prompts must be a list of strings or {file: path}")
        out["prompts_file"] = str(prompts["file"])
    elif isinstance(prompts, str):
        out["prompts_file"] = prompts
    elif prompts is not None:
        out["prompts"] = coerce("prompts", prompts)
    if base_dir is not None:
        for key in ("prompts_file", "dataset_path"):
            if out.get(key) and not Path(out[key]).expanduser().is_absolute():
                out[key] = str((base_dir / out[key]).resolve())
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML test description into {BenchOptions field: value}."""
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise OptionError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise OptionError(f"{path} is not valid YAML: {exc}") from None
    return settings_from_mapping(data, path.parent.resolve())


def options_from(settings: dict[str, Any]) -> BenchOptions:
    opts = BenchOptions()
    for key, value in settings.items():
        setattr(opts, key, value)
    return opts.check()


def run_config(data: dict[str, Any], base_dir: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Run a benchmark described by a parsed YAML mapping (for a job worker): returns
    {"aggregate": ..., "log_file": path or None, "plot_file": path or None, "exit_code": int}."""
    from bench.serving.cli import execute

    settings = settings_from_mapping(data, base_dir)
    settings.update(overrides)
    settings.setdefault("progress", False)
    return execute(options_from(settings), print_report=False)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from bench.serving.cli import main as cli_main

    parser = argparse.ArgumentParser(prog="python -m bench.config_runner", description="run the benchmark a YAML file describes")
    parser.add_argument("config", help="performance_config.yaml (sections server, test_params, prompts, output)")
    args, rest = parser.parse_known_args(argv)
    return cli_main(["--config", args.config, *rest])
