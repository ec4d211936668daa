"""`modelscope://org/model[@revision]` through the modelscope library's snapshot_download.

Like the HF source, files come through the user's ModelScope cache and are then copied into the
store with checksums. The cache is `$MODELSCOPE_CACHE/models/<org>--<model>/snapshots/<revision>/`
(the library also reuses the older `models/<org>/<model>` layout). The library has no offline
environment switch, only `local_files_only`; we set it from MODELSCOPE_OFFLINE=1, and online we fall
back to the cache when the hub is unreachable (what huggingface_hub does on its own).
MODELSCOPE_ENDPOINT and MODELSCOPE_API_TOKEN are passed through.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from app.hub.sources.files import PICKLE_PATTERNS, Listing
from app.hub.sources.local import folder_files
from app.hub.sources.spec import SourceSpec
from app.jobs.context import JobCancelled, JobContext, JobError, TransientJobError

logger = logging.getLogger(__name__)
_TRUE = ("1", "true", "yes", "on")


def modelscope_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """snapshot_download's cache/offline/endpoint/token arguments from the environment, read per pull
    (the library caches its config at first use)."""
    cache = environ.get("MODELSCOPE_CACHE")
    return {
        "cache_dir": str(Path(cache).expanduser()) if cache else None,
        "local_files_only": (environ.get("MODELSCOPE_OFFLINE") or "").strip().lower() in _TRUE,
        "endpoint": environ.get("MODELSCOPE_ENDPOINT") or None,
        "token": environ.get("MODELSCOPE_API_TOKEN") or None,
    }


def job_callback(ctx: JobContext, report: Callable[[float], None]):
    """A ProgressCallback class (the library makes one per file): checks cancel on every chunk and
    reports the file's fraction done."""
    from modelscope.hub.callback import ProgressCallback

    class JobCallback(ProgressCallback):
        def __init__(self, filename: str, file_size: int) -> None:
            super().__init__(filename, file_size)
            self.done = 0

        def update(self, size: int) -> None:
            ctx.check_cancelled()
            self.done += size
            if self.file_size > 0:
                report(min(self.done / self.file_size, 1.0))

    return JobCallback


def modelscope_listing(spec: SourceSpec, ctx: JobContext, report: Callable[[float], None]) -> Listing:
    from modelscope.hub.snapshot_download import snapshot_download

    options = modelscope_options(os.environ)

    def download(local_files_only: bool) -> str:
        return snapshot_download(
            spec.location, revision=spec.revision, cache_dir=options["cache_dir"], ignore_patterns=PICKLE_PATTERNS,
            local_files_only=local_files_only, token=options["token"], endpoint=options["endpoint"],
            progress_callbacks=[job_callback(ctx, report)],
        )  # fmt: skip

    try:
        try:
            folder = download(options["local_files_only"])
        except Exception as exc:
            if options["local_files_only"] or not isinstance(_job_error(exc, spec, options), TransientJobError):
                raise
            logger.warning("ModelScope unreachable (%s); trying the local cache for %s", exc, spec)
            try:
                folder = download(True)
            except Exception:
                raise exc from None
    except Exception as exc:
        mapped = _job_error(exc, spec, options)
        if mapped is exc:
            raise
        raise mapped from exc
    folder_path = Path(folder)
    return Listing(folder_files(folder_path), {"revision": spec.revision or "master", "snapshot": folder_path.name})


def _job_error(exc: Exception, spec: SourceSpec, options: dict[str, Any]) -> Exception:
    import requests
    from modelscope_hub.errors import (
        AuthenticationError,
        CacheNotFound,
        NetworkError,
        NotExistError,
        PermissionDeniedError,
        RateLimitError,
        ServerError,
    )

    if isinstance(exc, (JobCancelled, JobError)):
        return exc
    if isinstance(exc, CacheNotFound):
        where = options["cache_dir"] or "the default ModelScope cache (~/.cache/modelscope)"
        return JobError(
            f"source {spec}: not in {where} and MODELSCOPE_OFFLINE is set; download it there first "
            "(MODELSCOPE_CACHE picks the folder) or unset MODELSCOPE_OFFLINE"
        )
    if isinstance(exc, (NetworkError, ServerError, RateLimitError, requests.ConnectionError, requests.Timeout)):
        return TransientJobError(f"source {spec}: ModelScope could not be reached or failed ({type(exc).__name__}); will retry")
    if isinstance(exc, (AuthenticationError, PermissionDeniedError)):
        return JobError(f"source {spec}: ModelScope refused access; set MODELSCOPE_API_TOKEN to a token with access")
    # The library turns not-found and auth errors into requests' HTTPError.
    if isinstance(exc, (NotExistError, requests.HTTPError)):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None and status >= 500:
            return TransientJobError(f"source {spec}: ModelScope answered HTTP {status}; will retry")
        return JobError(f"source {spec}: not found on ModelScope or not accessible ({exc}); check org/model and the revision")
    return exc
