"""The LoRA config file (`mxext serve --lora-config FILE`) and the LoRA serving setup it feeds.

```yaml
base_model: smollm2-135m-instruct     # optional: also accepted as `<base_model>:<adapter>`
lora_adapters:
  - name: support-bot
    path: adapters/support-bot        # relative to this file's folder
    format: peft                      # the only format served
    description: answers support tickets
lora_settings:
  max_lora_rank: 32                   # VLLM_MAX_LORA_RANK wins over it
  max_loras: 8                        # adapters on the device at once (MIM_MAX_GPU_LORAS wins)
  cache_size: 16                      # adapters kept in host memory (MIM_MAX_CPU_LORAS wins)
  enable_dynamic_loading: false       # runtime load/unload (VLLM_ALLOW_RUNTIME_LORA_UPDATING wins)
auto_load: true                       # load every listed adapter at start-up (default true)
```

Precedence: serve flags > environment > this file > defaults. Every listed adapter's folder becomes
an allowed root for runtime loads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from app.settings import LoraSettings, get_settings

logger = logging.getLogger("app.adapters")

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ADAPTER_NAME_RULE = "1-128 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
FORMATS = ("peft",)
# What a client may put before `:<adapter>` besides the served names: the seed's literal prefix.
BASE_MODEL_ALIAS = "base_model"

Positive = Annotated[int, Meta(ge=1, le=1 << 16)]


class LoraConfigError(ValueError):
    """The LoRA config file is missing or invalid; the message names the file and the key."""


class AdapterEntry(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(pattern=ADAPTER_NAME_PATTERN)]
    path: Annotated[str, Meta(min_length=1)]
    format: str = "peft"
    description: str = ""


class LoraSettingsSection(Struct, forbid_unknown_fields=True, kw_only=True):
    max_lora_rank: Positive | None = None
    max_loras: Positive | None = None
    enable_dynamic_loading: bool | None = None
    cache_size: Positive | None = None


class LoraConfigFile(Struct, forbid_unknown_fields=True, kw_only=True):
    base_model: str | None = None
    lora_adapters: list[AdapterEntry] = msgspec.field(default_factory=list)
    lora_settings: LoraSettingsSection = msgspec.field(default_factory=LoraSettingsSection)
    auto_load: bool = True


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """An adapter to serve from the start: its name and absolute path."""

    name: str
    path: Path
    description: str = ""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A validated LoRA config file, paths made absolute."""

    source: Path
    base_model: str | None
    adapters: tuple[AdapterSpec, ...]
    auto_load: bool
    max_lora_rank: int | None = None
    max_loras: int | None = None
    cache_size: int | None = None
    enable_dynamic_loading: bool | None = None

    def over(self, defaults: LoraSettings) -> LoraSettings:
        """The file's settings over `defaults` (the environment goes on top of the result)."""
        return dataclasses.replace(
            defaults,
            max_lora_rank=self.max_lora_rank or defaults.max_lora_rank,
            max_gpu_loras=self.max_loras or defaults.max_gpu_loras,
            max_cpu_loras=self.cache_size or defaults.max_cpu_loras,
            allow_runtime_updating=(
                defaults.allow_runtime_updating if self.enable_dynamic_loading is None else self.enable_dynamic_loading
            ),
        )


_KNOWN_KEYS = {
    "": LoraConfigFile,
    "lora_settings": LoraSettingsSection,
    "lora_adapters[]": AdapterEntry,
}


def _describe(error: msgspec.ValidationError) -> str:
    """msgspec's message as `where: what`, with the known keys for an unknown one."""
    message = str(error)
    where = ""
    located = re.fullmatch(r"(.*) - at `\$(.*)`", message, flags=re.DOTALL)
    if located:
        message, where = located.group(1), located.group(2).lstrip(".")
    unknown = re.fullmatch(r"Object contains unknown field `(.+)`", message)
    if unknown:
        struct = _KNOWN_KEYS.get(re.sub(r"\[\d+\]$", "[]", where))
        known = f" (known: {', '.join(struct.__struct_fields__)})" if struct else ""
        return f"unknown key `{unknown.group(1)}` in {where or 'the top level'}{known}"
    if "lora_adapters[" in where and where.endswith(".name") and "matching regex" in message:
        return f"{where}: an adapter name is {ADAPTER_NAME_RULE}"
    return f"{where}: {message}" if where else message


def load_lora_config(path: str | Path) -> LoraConfig:
    """Read and validate the LoRA config file; LoraConfigError says what is wrong and where."""
    import yaml

    source = Path(path).expanduser()
    if not source.is_file():
        raise LoraConfigError(f"LoRA config file {str(path)!r} does not exist (or is not a file)")
    try:
        raw: Any = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise LoraConfigError(f"LoRA config file {source}: not valid YAML: {exc}") from None
    if raw is None:
        raise LoraConfigError(f"LoRA config file {source} is empty; see docs/LORA.md for its keys")
    if not isinstance(raw, dict):
        raise LoraConfigError(f"LoRA config file {source}: the top level must be a mapping of keys, not a list or value")
    try:
        parsed = msgspec.convert(raw, LoraConfigFile)
    except msgspec.ValidationError as exc:
        raise LoraConfigError(f"LoRA config file {source}: {_describe(exc)}") from None
    seen: set[str] = set()
    adapters = []
    folder = source.resolve().parent
    for i, entry in enumerate(parsed.lora_adapters):
        where = f"LoRA config file {source}: lora_adapters[{i}]"
        if entry.format not in FORMATS:
            raise LoraConfigError(f"{where}.format: {entry.format!r} is not served; use one of {', '.join(FORMATS)}")
        if entry.name in seen:
            raise LoraConfigError(f"{where}.name: {entry.name!r} is listed twice")
        seen.add(entry.name)
        # The operator wrote these paths: `..` is theirs to use, so it is folded away here.
        adapter_path = Path(os.path.normpath(folder / Path(entry.path).expanduser()))
        adapters.append(AdapterSpec(entry.name, adapter_path, entry.description))
    section = parsed.lora_settings
    return LoraConfig(
        source=source,
        base_model=parsed.base_model,
        adapters=tuple(adapters),
        auto_load=parsed.auto_load,
        max_lora_rank=section.max_lora_rank,
        max_loras=section.max_loras,
        cache_size=section.cache_size,
        enable_dynamic_loading=section.enable_dynamic_loading,
    )


def parse_lora_module(text: str) -> AdapterSpec:
    """`NAME=PATH` (vLLM's --lora-modules) -> an AdapterSpec."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError(f"--lora-modules {text!r}: write NAME=PATH")
    if not re.fullmatch(ADAPTER_NAME_PATTERN, name):
        raise ValueError(f"--lora-modules {text!r}: an adapter name is {ADAPTER_NAME_RULE}")
    return AdapterSpec(name, Path(os.path.normpath(Path(path).expanduser().absolute())))


@dataclasses.dataclass(frozen=True)
class LoraServing:
    """Everything the server needs about LoRA: limits, switches, start-up adapters, allowed roots."""

    settings: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    adapters: tuple[AdapterSpec, ...] = ()  # loaded at start-up, before /health turns ready
    roots: tuple[Path, ...] = ()  # where runtime loads may read from
    base_aliases: tuple[str, ...] = (BASE_MODEL_ALIAS,)  # accepted as `<alias>:<adapter>` and as the base


def resolve_lora_serving(
    config_path: str | Path | None = None,
    *,
    modules: tuple[str, ...] = (),
    max_loras: int | None = None,
    max_cpu_loras: int | None = None,
    max_lora_rank: int | None = None,
    admin_key: str | None = None,
) -> LoraServing:
    """Flags (the keyword arguments) > environment > the config file > defaults."""
    from app.adapters.security import allowed_roots

    file = load_lora_config(config_path) if config_path else None
    settings = LoraSettings.from_env(file.over(LoraSettings())) if file else get_settings().lora
    flags = {"max_gpu_loras": max_loras, "max_cpu_loras": max_cpu_loras, "max_lora_rank": max_lora_rank,
             "admin_key": admin_key}  # fmt: skip
    settings = dataclasses.replace(settings, **{k: v for k, v in flags.items() if v is not None})
    if settings.max_gpu_loras > settings.max_cpu_loras:
        # The device holds a subset of the host cache: a host cache of 2 means 2 device slots at most.
        logger.info("max_loras %d is above the host cache (max_cpu_loras %d): %d device slots",
                    settings.max_gpu_loras, settings.max_cpu_loras, settings.max_cpu_loras)  # fmt: skip
        settings = dataclasses.replace(settings, max_gpu_loras=settings.max_cpu_loras)
    adapters = list(file.adapters if file and file.auto_load else ())
    listed = list(file.adapters if file else ())
    for module in modules:
        spec = parse_lora_module(module)
        adapters = [a for a in adapters if a.name != spec.name] + [spec]
        listed.append(spec)
    folders = [spec.path if not spec.path.is_file() else spec.path.parent for spec in listed]
    aliases = (BASE_MODEL_ALIAS,) + ((file.base_model,) if file and file.base_model else ())
    return LoraServing(
        settings=settings,
        adapters=tuple(adapters),
        roots=allowed_roots([*settings.roots, *folders]),
        base_aliases=tuple(dict.fromkeys(aliases)),
    )
