"""`hf://org/model[@revision]` through huggingface_hub's snapshot_download.

Files are fetched into the user's normal HF cache (so a cached model costs no download, and an
offline machine serves from it), then copied into the store with checksums. huggingface_hub reads
its environment once at import; we read it at each pull and pass it explicitly, so a worker honours
the env it runs with: HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT, HF_TOKEN.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from app.hub.sources.files import PICKLE_PATTERNS, Listing, SourceFile
from app.hub.sources.local import folder_files
from app.hub.sources.spec import SourceSpec
from app.jobs.context import JobContext, JobError, TransientJobError

_TRUE = ("1", "true", "yes", "on")


def hf_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """snapshot_download's cache/offline/endpoint/token arguments, from the environment as the
    library itself reads it (same variables, same precedence)."""
    home = environ.get("HF_HOME") or os.path.join(environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = environ.get("HF_HUB_CACHE") or environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    offline = (environ.get("HF_HUB_OFFLINE") or environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower() in _TRUE
    return {
        "cache_dir": str(Path(os.path.expandvars(cache)).expanduser()),
        "local_files_only": offline,
        "endpoint": environ.get("HF_ENDPOINT") or None,
        # None lets the library fall back to the token saved by `hf auth login`.
        "token": environ.get("HF_TOKEN") or None,
    }


def job_tqdm(ctx: JobContext, report: Callable[[float], None]):
    """A silent tqdm class for snapshot_download: each update checks the job's cancel flag and
    reports the byte bars' fraction (the library calls it between files and download chunks)."""
    from tqdm.auto import tqdm

    class JobTqdm(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.job_unit = kwargs.get("unit", "it")
            self.job_done = 0.0

        def update(self, n: float | None = 1) -> bool | None:
            ctx.check_cancelled()
            self.job_done += n or 0
            if self.job_unit == "B" and self.total:
                report(min(self.job_done / self.total, 1.0))
            return super().update(n)

    return JobTqdm


def hf_listing(spec: SourceSpec, ctx: JobContext, report: Callable[[float], None]) -> Listing:
    """Download (or find in the cache) the snapshot, and list its files with their LFS sha256."""
    from huggingface_hub import snapshot_download

    options = hf_options(os.environ)
    try:
        folder = Path(snapshot_download(
            spec.location, revision=spec.revision, ignore_patterns=PICKLE_PATTERNS,
            tqdm_class=job_tqdm(ctx, report), **options,
        ))  # fmt: skip
    except Exception as exc:
        mapped = _job_error(exc, spec, options)
        if mapped is exc:
            raise
        raise mapped from exc
    files = folder_files(folder)
    published = _published_sha256(folder)
    files = [SourceFile(f.name, f.size, f.read, published.get(f.name)) for f in files]
    return Listing(files, {"revision": spec.revision or "main", "commit": folder.name})


def _published_sha256(snapshot: Path) -> dict[str, str]:
    """LFS sha256 per file from the cached tree listing (`<repo>/trees/<commit>.json`), when present.

    Read as plain JSON rather than through the library's private module; a missing or unknown
    format just means nothing to cross-check (we still hash every file ourselves).
    """
    import json

    tree = snapshot.parent.parent / "trees" / f"{snapshot.name}.json"
    try:
        data = json.loads(tree.read_text(encoding="utf-8"))
        if data.get("format_version") != 1:
            return {}
        return {name: info["lfs_sha256"] for name, info in data["files"].items() if info.get("lfs_sha256")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _job_error(exc: Exception, spec: SourceSpec, options: dict[str, Any]) -> Exception:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from app.jobs.context import JobCancelled

    if isinstance(exc, (JobCancelled, JobError)):
        return exc
    if isinstance(exc, GatedRepoError):
        return JobError(f"source {spec}: the repository is gated; accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):
        return JobError(f"source {spec}: repository not found on the Hub (private ones need HF_TOKEN); check org/model")
    if isinstance(exc, RevisionNotFoundError):
        return JobError(f"source {spec}: revision {spec.revision!r} not found; give an existing branch, tag or commit")
    if isinstance(exc, LocalEntryNotFoundError):
        cache = options["cache_dir"]
        if options["local_files_only"]:
            return JobError(
                f"source {spec}: not in the Hugging Face cache at {cache} and HF_HUB_OFFLINE is set; "
                "download it there first or unset HF_HUB_OFFLINE"
            )
        # Online, the library only gives up on the cache after the Hub was unreachable or failing.
        return TransientJobError(f"source {spec}: the Hub could not be reached and {cache} has no copy; will retry")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", 0) or 0
        if status >= 500 or status == 429:
            return TransientJobError(f"source {spec}: the Hub answered HTTP {status}; will retry")
        if status in (401, 403):
            return JobError(f"source {spec}: the Hub refused access (HTTP {status}); set HF_TOKEN to a token with access")
        return JobError(f"source {spec}: the Hub answered HTTP {status}: {exc}")
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.startswith(("httpx", "httpcore")):
        return TransientJobError(f"source {spec}: network error talking to the Hub ({type(exc).__name__}); will retry")
    return exc
