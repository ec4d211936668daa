"""The LoRA conversion job: read an adapter in one format, write it in another into the store.

Everything is read and checked before a byte is written; the output goes through `atomic_folder`,
so a failed or cancelled job leaves nothing in the adapters folder. Its manifest (app.jobs.outputs)
names the job, so a redelivered job completes from an output it already renamed into place.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from app.adapters.convert.adapter import Adapter, ModelLayout
from app.adapters.convert.detect import FORMATS, NEMO_CONFIG, detect_format, normalise_format
from app.adapters.convert.nemo_format import read_nemo, write_nemo
from app.adapters.convert.peft_format import read_peft, write_peft
from app.adapters.digest import folder_digest, folder_files
from app.adapters.convert.trtllm_format import OUTPUT_DTYPES, read_trtllm, write_trtllm
from app.adapters.lora_config import ADAPTER_NAME_PATTERN, ADAPTER_NAME_RULE
from app.adapters.security import AdapterPathError, check_adapter_path
from app.jobs.context import JobContext, JobError, atomic_folder
from app.jobs.outputs import own_output, timestamp, write_manifest
from app.settings import Settings

logger = logging.getLogger("app.adapters")


def convert_lora(params: dict, ctx: JobContext) -> dict:
    """Convert the adapter at params["source"] to params["to_format"] as the store adapter params["name"].

    Optional params: "from_format" (detected when omitted), "base_model" (a store model name or a
    folder with config.json: the attention layout NeMo's fused QKV needs, and the dimensions bare
    TensorRT-LLM files lack), "dtype" (float16 | float32, for trtllm output). `register` is the
    caller's business. Returns the output's path, formats, rank, targets, base model, files and sha256.
    """
    if not isinstance(params, dict):
        raise JobError("the job's params must be an object with source, name and to_format")
    name = _adapter_name(params.get("name"))
    to_format = normalise_format(params.get("to_format"), "to_format")
    if to_format is None:
        raise JobError(f"to_format is required: one of {', '.join(FORMATS)}")
    from_format = normalise_format(params.get("from_format"), "from_format")
    out_dtype = _output_dtype(params.get("dtype"), to_format)
    final = ctx.settings.store.adapters_dir / name
    done = own_output(final, ctx.job_id, source=params.get("source"), format=to_format)  # JobError: taken
    if done is not None:  # a redelivery after the rename but before the job row was updated
        return _result(final, done)
    roots = _roots(ctx.settings)
    source = _source_path(params.get("source"), roots)
    detected = from_format or detect_format(source)
    if detected == to_format:
        raise JobError(f"the source is already {to_format}; nothing to convert (to_format must differ from the "
                       "source's format)")
    base_layout = _base_layout(params.get("base_model"), ctx.settings, required=True)

    def tick() -> None:
        ctx.check_cancelled()

    ctx.progress(1)
    adapter = _read(detected, source, roots, base_layout, tick)
    if adapter.layout is None:
        adapter.layout = base_layout or _base_layout(adapter.base_model, ctx.settings, required=False)
    ctx.progress(45)
    with atomic_folder(final, ctx.job_id) as staging:
        rank = adapter.rank
        if to_format == "peft":
            write_peft(adapter, staging, tick)
        elif to_format == "nemo":
            rank = write_nemo(adapter, staging / f"{name}.nemo", tick)
        else:
            write_trtllm(adapter, staging, out_dtype, tick)
        ctx.check_cancelled()
        ctx.progress(90)
        manifest = write_manifest(staging, ctx.job_id, source=params.get("source"), format=to_format,
                                  from_format=detected, rank=rank, target_modules=adapter.target_modules,
                                  base_model=adapter.base_model, converted_at=timestamp())  # fmt: skip
        result = _result(staging, manifest)
    ctx.progress(100)
    logger.info("converted LoRA %s (%s) to %s at %s", source, detected, to_format, final)
    return {**result, "path": str(final)}


def _result(folder: Path, manifest: dict) -> dict:
    """The job's result for the output in `folder`, from its manifest and its files."""
    files, digest = folder_files(folder), folder_digest(folder)  # both leave the manifest out
    keys = ("format", "from_format", "rank", "target_modules", "base_model")
    return {"path": str(folder), **{k: manifest.get(k) for k in keys}, "sha256": digest, "files": files}


def _adapter_name(name: object) -> str:
    if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME_PATTERN, name):
        raise JobError(f"name {name!r} is not a valid adapter name: {ADAPTER_NAME_RULE}")
    return name


def _output_dtype(raw: object, to_format: str):
    if raw is None:
        return None
    if to_format != "trtllm" or raw not in OUTPUT_DTYPES:
        raise JobError(f"dtype {raw!r}: only trtllm output takes a dtype, one of {', '.join(OUTPUT_DTYPES)} (the "
                       "base engine's dtype)")
    return OUTPUT_DTYPES[raw]


def _roots(settings: Settings) -> list[Path]:
    """The server's adapter roots (app.adapters.security.allowed_roots), taken from the job's settings."""
    return list(dict.fromkeys([settings.store.adapters_dir, *settings.lora.roots]))


def _check(raw: str, roots: list[Path]) -> Path:
    try:
        return check_adapter_path(raw, roots)
    except AdapterPathError as exc:
        raise JobError(str(exc).replace("lora_path", "source")) from None


def _source_path(raw: object, roots: list[Path]) -> Path:
    if not isinstance(raw, str) or not raw.strip():
        raise JobError("source is required: the path of the adapter (a folder or a .nemo file)")
    return _check(raw, roots)


def _read(fmt: str, source: Path, roots: list[Path], layout: ModelLayout | None, tick) -> Adapter:
    if fmt == "nemo":
        return read_nemo(_nemo_file(source), tick)
    folder = source.parent if source.is_file() else source
    if folder != source:
        folder = _check(str(folder), roots)
    return read_peft(folder, tick) if fmt == "peft" else read_trtllm(folder, layout, tick)


def _nemo_file(source: Path) -> Path:
    """A .nemo file, an unpacked archive folder, or a folder holding exactly one .nemo file."""
    if source.is_file() or (source / NEMO_CONFIG).is_file():
        return source
    archives = sorted(source.glob("*.nemo"))
    if len(archives) != 1:
        found = ", ".join(p.name for p in archives) or "none"
        raise JobError(f"{source} should hold one .nemo archive (found: {found}); point source at the file")
    return archives[0]


def _base_layout(raw: object, settings: Settings, *, required: bool) -> ModelLayout | None:
    """The layout of the base model named by `raw` (a store name or a folder with config.json inside
    the store or the adapter roots). `required`: a name that does not resolve is an error, not None."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise JobError(f"base_model must be a model name or folder, got {raw!r}")
    candidate = settings.store.models_dir / raw if "/" not in raw and not raw.startswith(".") else Path(raw).expanduser()
    config = candidate / "config.json" if candidate.name != "config.json" else candidate
    allowed = [settings.store.models_dir, settings.store.adapters_dir, *settings.lora.roots]
    try:
        resolved = config.resolve(strict=True)
        inside = any(resolved.is_relative_to(Path(root).expanduser().resolve()) for root in allowed)
    except (OSError, RuntimeError):
        inside = False
    if not inside or not resolved.is_file():
        if required:
            raise JobError(f"base_model {raw!r}: no config.json found for it in the model store "
                           f"({settings.store.models_dir}) or the allowed adapter folders")
        return None
    try:
        return ModelLayout.from_hf_config(json.loads(resolved.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise JobError(f"base_model {raw!r}: {resolved} is not a usable model config.json ({exc})") from None
