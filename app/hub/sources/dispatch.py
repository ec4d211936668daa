"""Pick the source module for a parsed source and list what it offers."""

from __future__ import annotations

from collections.abc import Callable

from app.hub.sources.files import Listing
from app.hub.sources.spec import SourceSpec
from app.jobs.context import JobContext

# The hubs download into their own cache first: that phase gets this share of the job's progress,
# the copy into the store the rest. Local and S3 sources copy straight from the source.
DOWNLOAD_SHARE = {"hf": 50.0, "modelscope": 50.0}


def list_source_files(spec: SourceSpec, ctx: JobContext) -> Listing:
    """The files `spec` names, fetched into the hub's cache first where the source is a hub."""
    share = DOWNLOAD_SHARE.get(spec.scheme, 0.0)
    peak = [0.0]

    def report(fraction: float) -> None:
        # Hub byte totals grow as files are discovered; keep the reported figure from going back.
        peak[0] = max(peak[0], fraction)
        ctx.progress(share * peak[0])

    return _LISTERS[spec.scheme](spec, ctx, report)


def _local(spec: SourceSpec, ctx: JobContext, report: Callable[[float], None]) -> Listing:
    from app.hub.sources.local import local_listing

    return local_listing(spec.location)


def _s3(spec: SourceSpec, ctx: JobContext, report: Callable[[float], None]) -> Listing:
    from app.hub.sources.s3 import s3_listing

    return s3_listing(spec, ctx.settings.control.s3)


def _hf(spec: SourceSpec, ctx: JobContext, report: Callable[[float], None]) -> Listing:
    from app.hub.sources.huggingface import hf_listing

    return hf_listing(spec, ctx, report)


def _modelscope(spec: SourceSpec, ctx: JobContext, report: Callable[[float], None]) -> Listing:
    from app.hub.sources.modelscope import modelscope_listing

    return modelscope_listing(spec, ctx, report)


_LISTERS: dict[str, Callable[[SourceSpec, JobContext, Callable[[float], None]], Listing]] = {
    "local": _local,
    "s3": _s3,
    "hf": _hf,
    "modelscope": _modelscope,
}
