"""The model-pull job: bring a model from a source into the model store, checksummed, atomically.

The model is written into a hidden staging folder next to its final place and renamed into place
only when every file is copied and verified, so the store never shows a half-pulled model; a
failure or a cancel removes the staging folder. `.mxext-manifest.json` in the model folder records
the source, each file's size and sha256, and when it was pulled.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from app.hub.sources.dispatch import DOWNLOAD_SHARE, list_source_files
from app.hub.sources.files import ByteProgress, copy_files, hash_file, is_hidden, select_model_files, write_pull_manifest
from app.hub.sources.spec import check_model_name, parse_source
from app.jobs.context import JobContext, JobError, atomic_folder
from app.jobs.outputs import own_output

logger = logging.getLogger(__name__)

# A GGUF is converted after the copy; leave that step the last tenth of the progress bar.
_GGUF_COPY_END = 90.0


def pull_model(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Pull `params["source"]` into the store as `params["name"]`; returns the folder and checksums."""
    if not isinstance(params, dict):
        raise JobError('params: give an object like {"source": "hf://org/model", "name": "my-model"}')
    name = check_model_name(params.get("name"))
    spec = parse_source(params.get("source"))
    final = ctx.settings.store.models_dir / name
    done = own_output(final, ctx.job_id, source=str(spec))  # JobError when another job's model has the name
    if done is not None:  # a redelivery after the rename but before the job row was updated
        return _result(final, str(spec), done)
    ctx.check_cancelled()

    listing = list_source_files(spec, ctx)
    selection = select_model_files(listing.files, str(spec))
    start = DOWNLOAD_SHARE.get(spec.scheme, 0.0)
    progress = ByteProgress(ctx, sum(f.size for f in selection.files), start, _GGUF_COPY_END if selection.gguf else 100.0)
    extra: dict[str, Any] = dict(listing.details)
    with atomic_folder(final, ctx.job_id) as staging:
        if selection.gguf is None:
            entries = copy_files(selection.files, staging, ctx, progress, str(spec))
        else:
            scratch = staging / ".gguf-source"
            (extra["converted_from"],) = copy_files(selection.files, scratch, ctx, progress, str(spec))
            entries = _convert_gguf(scratch / selection.gguf.name, staging, ctx, str(spec))
        manifest = write_pull_manifest(staging, str(spec), entries, ctx.job_id, **extra)
        ctx.check_cancelled()  # the last moment a cancel can still leave nothing behind
    ctx.progress(100.0)
    result = _result(final, str(spec), manifest)
    logger.info("pulled %s into %s (%d files, %d bytes)", spec, final, len(entries), result["size_bytes"])
    return result


def _result(final: Path, source: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The pull's result, from its manifest (a fresh pull's, or the one a redelivery finds)."""
    files = manifest.get("files") or []
    return {"path": str(final), "source": source, "files": files,
            "size_bytes": sum(int(f["size"]) for f in files), "sha256": manifest.get("sha256")}  # fmt: skip


def _convert_gguf(gguf: Path, staging: Path, ctx: JobContext, where: str) -> list[dict[str, Any]]:
    """Convert the pulled GGUF into an HF folder in `staging` (the store serves HF folders only);
    the GGUF itself is not kept. Returns the entries of the converted files."""
    import torch

    from app.hub.gguf_convert import convert_gguf

    converted = staging / ".converted"
    try:
        convert_gguf(gguf, converted, dtype=torch.bfloat16, progress=False)
    except (ValueError, KeyError, IndexError) as exc:
        raise JobError(f"{where}: cannot convert {gguf.name}: {exc}") from exc
    shutil.rmtree(gguf.parent)
    for item in converted.iterdir():
        os.replace(item, staging / item.name)
    converted.rmdir()
    ctx.progress(95.0)
    entries = []
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        name = path.relative_to(staging).as_posix()
        if not is_hidden(name):
            ctx.check_cancelled()
            entries.append({"name": name, "size": path.stat().st_size, "sha256": hash_file(path, ctx)})
    return entries
