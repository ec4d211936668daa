"""Engine builds: a model made ready for one engine profile, as a new folder in the store.

A profile names an engine and a dtype. There is no MX Hub manifest module yet, so the profiles are
the small built-in table below (`native-bf16`, `native-fp16`, `native-fp32`, `trtllm-bf16`,
`trtllm-fp16`), or an object `{"engine": "native", "dtype": "bfloat16"}`.

* native: the model materialised as HF safetensors in the profile's dtype (from a GGUF, a registered
  model, a store name or a folder). Floating tensors are cast one at a time; the rest is copied.
* trtllm: TensorRT-LLM's engine build through its LLM API, where `tensorrt_llm` is importable; on
  any other worker the job fails saying what to install.

The output goes through `atomic_folder`, so a failed or cancelled build leaves nothing in the store;
its manifest (app.jobs.outputs) names the job, so a redelivered build completes from an output it
already renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from app.jobs.context import JobContext, JobError, atomic_folder
from app.jobs.outputs import own_output, timestamp, write_manifest

ENGINES = ("native", "trtllm")
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                  **{d: d for d in DTYPES}}  # fmt: skip
PROFILES = {f"{engine}-{short}": (engine, dtype) for engine in ENGINES for dtype, short in DTYPES.items()}
PROFILES.pop("trtllm-fp32")  # TensorRT-LLM builds in half precision
BUILD_FILE = "build.json"
_RESULT_KEYS = ("engine", "dtype", "profile", "format", "source", "files", "size_bytes", "sha256")


@dataclasses.dataclass(frozen=True)
class Profile:
    engine: str
    dtype: str  # torch dtype name

    @property
    def name(self) -> str:
        return f"{self.engine}-{DTYPES[self.dtype]}"


def parse_profile(raw: object) -> Profile:
    """A profile name from the table or {"engine", "dtype"}; JobError says what is accepted."""
    if isinstance(raw, str):
        key = raw.strip().lower()
        if key in PROFILES:
            return Profile(*PROFILES[key])
        raise JobError(f"profile {raw!r} is not known; use one of {', '.join(sorted(PROFILES))} "
                       'or an object like {"engine": "native", "dtype": "bfloat16"}')  # fmt: skip
    if isinstance(raw, dict):
        unknown = set(raw) - {"engine", "dtype"}
        if unknown:
            raise JobError(f"profile: unknown key(s) {', '.join(sorted(unknown))}; give engine and dtype")
        engine = str(raw.get("engine", "native")).lower()
        dtype = _DTYPE_ALIASES.get(str(raw.get("dtype", "bfloat16")).lower())
        if engine not in ENGINES:
            raise JobError(f"profile.engine {raw.get('engine')!r}: use one of {', '.join(ENGINES)}")
        if dtype is None:
            raise JobError(f"profile.dtype {raw.get('dtype')!r}: use one of {', '.join(DTYPES)}")
        return Profile(engine, dtype)
    raise JobError("profile: give a profile name (e.g. native-bf16) or {\"engine\": ..., \"dtype\": ...}")


def build_engine(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """The engine-build job: returns {path, engine, dtype, profile, source, files, size_bytes, sha256, format}."""
    profile = parse_profile(params.get("profile", "native-bf16"))
    source, source_name = resolve_model(str(params["model"]), ctx)
    name = params.get("name") or f"{source_name}-{profile.name}"
    final = ctx.settings.store.models_dir / name
    done = own_output(final, ctx.job_id, model=params["model"], profile=profile.name)  # JobError: taken
    if done is not None:  # a redelivery after the rename but before the job row was updated
        return {"path": str(final), **{k: done.get(k) for k in _RESULT_KEYS}}
    ctx.check_cancelled()
    with atomic_folder(final, ctx.job_id) as staging:
        if profile.engine == "native":
            _build_native(source, staging, profile.dtype, ctx)
            fmt = "safetensors"
        else:
            _build_trtllm(source, staging, profile.dtype, ctx)
            fmt = "trtllm-engine"
        (staging / BUILD_FILE).write_text(json.dumps(
            {"source": str(source), "model": params["model"], "profile": profile.name, "job_id": ctx.job_id}, indent=2
        ) + "\n", encoding="utf-8")  # fmt: skip
        files = _checksums(staging, ctx)
        digest = hashlib.sha256("".join(f"{f['name']}:{f['sha256']}\n" for f in files).encode()).hexdigest()
        result = {"engine": profile.engine, "dtype": profile.dtype, "profile": profile.name, "format": fmt,
                  "source": str(source), "files": files, "size_bytes": sum(f["size"] for f in files), "sha256": digest}
        write_manifest(staging, ctx.job_id, model=params["model"], built_at=timestamp(), **result)  # hidden: not in files
        ctx.check_cancelled()
    ctx.progress(100.0)
    return {"path": str(final), **result}


def resolve_model(model: str, ctx: JobContext) -> tuple[Path, str]:
    """(an HF folder or a .gguf file, a short name) for what the user named: a registered model
    (ModelArtifact), a store name, a folder, a .gguf file, or the embedded default model."""
    from app.hub.store import DEFAULT_MODEL, embedded_gguf

    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path, path.stem.lower()
    if path.is_dir() and (path / "config.json").is_file():
        return path, path.name
    registered = _registered_path(model, ctx)
    if registered is not None:
        return registered, model
    folder = ctx.settings.store.models_dir / model
    if "/" not in model and (folder / "config.json").is_file():
        return folder, model
    if model == DEFAULT_MODEL and (gguf := embedded_gguf()) is not None:
        return gguf, model
    raise JobError(f"model {model!r}: not a registered model, a model in the store ({ctx.settings.store.models_dir}), "
                   "a folder with config.json or a .gguf file; pull it first (POST /v1/jobs/model-pulls)")  # fmt: skip


def _registered_path(name: str, ctx: JobContext) -> Path | None:
    from sqlalchemy import select

    from app.db.models import ModelArtifact
    from app.db.session import sync_sessions

    with sync_sessions(ctx.settings)() as session:
        row = session.execute(
            select(ModelArtifact).where(ModelArtifact.name == name, ModelArtifact.status == "ready")
        ).scalar_one_or_none()
    if row is None or not (Path(row.path) / "config.json").is_file():
        return None
    return Path(row.path)


def _build_native(source: Path, out: Path, dtype: str, ctx: JobContext) -> None:
    import torch

    if source.is_file():  # a GGUF: our converter writes the dtype directly
        from app.hub.gguf_convert import convert_gguf

        ctx.progress(5.0)
        try:
            convert_gguf(source, out / ".converted", dtype=getattr(torch, dtype), progress=False)
        except (ValueError, KeyError, IndexError) as exc:
            raise JobError(f"{source.name}: cannot convert this GGUF: {exc}") from exc
        for item in (out / ".converted").iterdir():
            os.replace(item, out / item.name)
        (out / ".converted").rmdir()
        ctx.progress(90.0)
        return
    _cast_folder(source, out, getattr(torch, dtype), ctx)


def _cast_folder(source: Path, out: Path, dtype: Any, ctx: JobContext) -> None:
    """Copy an HF folder, casting every floating tensor of its safetensors to `dtype`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise JobError(f"{source}: no *.safetensors weights; the native engine reads safetensors only")
    total = sum(p.stat().st_size for p in shards) or 1
    done = 0
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), framework="pt") as fh:
            metadata = fh.metadata() or {}
            for key in fh.keys():
                ctx.check_cancelled()
                tensor = fh.get_tensor(key)
                tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        save_file(tensors, str(out / shard.name), metadata={**metadata, "format": "pt"})
        os.chmod(out / shard.name, 0o644)
        del tensors
        done += shard.stat().st_size
        ctx.progress(90.0 * done / total)
    for item in sorted(source.iterdir()):
        if item.name.startswith(".") or item.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf") or not item.is_file():
            continue
        shutil.copy2(item, out / item.name)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _build_trtllm(source: Path, out: Path, dtype: str, ctx: JobContext) -> None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise JobError("a trtllm profile needs TensorRT-LLM, which this worker lacks: run the worker on a CUDA "
                       "host with `pip install tensorrt_llm` (or build a native-* profile instead)")  # fmt: skip
    if source.is_file():  # TensorRT-LLM reads HF folders: convert the GGUF first (kept out of the output)
        scratch = out.parent / f".trtllm-src-{ctx.job_id}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        _build_native(source, scratch, dtype, ctx)
        source = scratch
    try:
        from tensorrt_llm import LLM  # its LLM API runs checkpoint conversion + trtllm-build

        ctx.progress(10.0)
        llm = LLM(model=str(source), dtype=dtype)
        ctx.check_cancelled()
        llm.save(str(out))
    except JobError:
        raise
    except Exception as exc:  # noqa: BLE001 - TensorRT-LLM raises many types; say which step failed
        raise JobError(f"TensorRT-LLM engine build failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if source.name.startswith(".trtllm-src-"):
            shutil.rmtree(source, ignore_errors=True)
    ctx.progress(90.0)


def _checksums(folder: Path, ctx: JobContext) -> list[dict[str, Any]]:
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in Path(name).parts):
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        ctx.check_cancelled()
        files.append({"name": name, "size": path.stat().st_size, "sha256": digest.hexdigest()})
    return files
