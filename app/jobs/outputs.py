"""Who wrote a job's output: the manifest a job puts inside its output folder before the rename that
makes it visible, and the check a job makes when it finds a folder of that name already in place.

Jobs are acknowledged only when they finish (acks_late), so a worker lost between the rename and
the job row's update has its task redelivered, and the new attempt finds its own output. When the
folder's manifest names this job, the attempt completes from it; a folder that another job (or no
job) wrote is someone else's, and the job fails saying which name is free. A staging folder is
never looked at here: only the rename makes an output count.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from app.jobs.context import JobError, staging_path

logger = logging.getLogger("app.jobs")

MANIFEST_NAME = ".mxext-manifest.json"
_MAX_NAME = 128  # store names (models and adapters) are at most this long


def write_manifest(folder: Path, job_id: str, **fields: Any) -> dict[str, Any]:
    """Write `fields` and the job id as `folder`'s manifest (into the staging folder, before the rename)."""
    manifest = {**fields, "job_id": job_id}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def timestamp() -> str:
    """Now, UTC, as the manifests write it (2026-01-01T10:00:00Z)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def own_output(final: Path, job_id: str, **expect: Any) -> dict[str, Any] | None:
    """None when `final` is free. When this same job already wrote it (its manifest names the job,
    and holds `expect`), that manifest: the job completes from it. Otherwise JobError naming a
    free name."""
    if not final.exists() and not final.is_symlink():
        return None
    manifest = read_manifest(final) if final.is_dir() and not final.is_symlink() else None
    if manifest is not None and all(manifest.get(k) == v for k, v in {"job_id": job_id, **expect}.items()):
        shutil.rmtree(staging_path(final, job_id), ignore_errors=True)  # nothing of an earlier attempt is needed
        logger.info("%s: already written by this job (%s); completing from its manifest", final, job_id)
        return manifest
    writer = manifest.get("job_id") if manifest is not None else None
    if not writer:
        origin = f"it has no {MANIFEST_NAME} naming the job that wrote it"
    else:
        origin = f"job {writer} wrote it" if writer != job_id else "this job wrote it from other parameters"
    raise JobError(f"name {final.name!r}: {final} already exists; choose another name, such as "
                   f"{free_name(final)!r}, or remove it first ({origin})")  # fmt: skip


def free_name(final: Path) -> str:
    """`<name>-2`, `<name>-3`, ...: the first sibling of `final` not in use (a suggestion, not a reservation)."""
    candidates = (final.name[: _MAX_NAME - len(f"-{n}")] + f"-{n}" for n in itertools.count(2))
    return next(name for name in candidates if not (final.parent / name).exists())
