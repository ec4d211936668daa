"""Format names (with the aliases people type) and detection from what lies at the source path."""

from __future__ import annotations

import tarfile
from pathlib import Path

from app.adapters.peft import CONFIG_FILE as PEFT_CONFIG
from app.adapters.peft import WEIGHTS_FILE as PEFT_WEIGHTS
from app.jobs.context import JobError

FORMATS = ("peft", "nemo", "trtllm")
_ALIASES = {
    "peft": "peft", "hf": "peft", "huggingface": "peft", "hugging-face": "peft", "hf-peft": "peft",
    "nemo": "nemo", ".nemo": "nemo",
    "trtllm": "trtllm", "trt-llm": "trtllm", "tensorrt-llm": "trtllm", "tensorrtllm": "trtllm", "trt": "trtllm",
}
TRT_CONFIG = "model.lora_config.npy"
TRT_WEIGHTS = "model.lora_weights.npy"
NEMO_CONFIG = "model_config.yaml"
NEMO_WEIGHTS = "model_weights.ckpt"

_NEEDS = (
    f"peft: a folder with {PEFT_CONFIG} and {PEFT_WEIGHTS}; "
    f"nemo: a .nemo archive (or its unpacked folder) with {NEMO_CONFIG} and {NEMO_WEIGHTS}; "
    f"trtllm: a folder with {TRT_CONFIG} and {TRT_WEIGHTS}"
)


def normalise_format(name: str | None, role: str) -> str | None:
    """'HF', 'tensorrt-llm', ... -> 'peft', 'trtllm', ...; None stays None (auto-detect)."""
    if name is None or (isinstance(name, str) and not name.strip()):
        return None
    if not isinstance(name, str):
        raise JobError(f"{role} must be a format name ({', '.join(FORMATS)}), got {name!r}")
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key not in _ALIASES:
        raise JobError(f"{role} {name!r} is not a LoRA format this service converts; use one of "
                       f"{', '.join(FORMATS)} (aliases: hf, huggingface, tensorrt-llm, trt-llm)")
    return _ALIASES[key]


def detect_format(source: Path) -> str:
    """The format of the adapter at `source` (a resolved, existing path)."""
    if source.is_file():
        if source.name in (PEFT_CONFIG, PEFT_WEIGHTS):
            return "peft"
        if source.name in (TRT_CONFIG, TRT_WEIGHTS):
            return "trtllm"
        if source.suffix == ".nemo" or _is_tar(source):
            return "nemo"
        raise JobError(f"cannot tell the format of the file {source.name}: {_NEEDS}. Name from_format, or point "
                       "source at the adapter's folder")
    names = sorted(p.name for p in source.iterdir())
    found = []
    if PEFT_CONFIG in names:
        found.append("peft")
    if TRT_CONFIG in names or TRT_WEIGHTS in names:
        found.append("trtllm")
    if NEMO_CONFIG in names or NEMO_WEIGHTS in names or any(n.endswith(".nemo") for n in names):
        found.append("nemo")
    if len(found) == 1:
        return found[0]
    shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "nothing"
    if not found:
        raise JobError(f"cannot detect the adapter format of {source}: it holds {shown}. Expected {_NEEDS}")
    raise JobError(f"{source} looks like several formats ({', '.join(found)}): it holds {shown}. Name from_format")


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False
