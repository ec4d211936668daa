"""A file or folder on the worker's disk (`/path`, `~/path` or `file:///path`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from app.hub.sources.files import CHUNK_SIZE, Listing, SourceFile, is_hidden
from app.jobs.context import JobError


def file_reader(path: Path):
    """A ChunkReader over a local file."""

    @contextlib.contextmanager
    def read() -> Iterator[Iterator[bytes]]:
        with open(path, "rb") as fh:
            yield iter(lambda: fh.read(CHUNK_SIZE), b"")

    return read


def folder_files(root: Path) -> list[SourceFile]:
    """Every visible regular file under `root` (symlinks followed: hub caches link to blobs)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .git, .cache, ...
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            name = path.relative_to(root).as_posix()
            if is_hidden(name) or not path.is_file():
                continue
            files.append(SourceFile(name, path.stat().st_size, file_reader(path)))
    return files


def local_listing(location: str) -> Listing:
    path = Path(location)
    try:
        if path.is_file():
            return Listing([SourceFile(path.name, path.stat().st_size, file_reader(path))])
        if path.is_dir():
            return Listing(folder_files(path))
    except PermissionError as exc:
        raise JobError(f"source {location}: not readable by the worker ({exc.strerror}); fix its permissions") from exc
    raise JobError(
        f"source {location}: no such file or folder on the worker machine; give an existing path there "
        "(or use s3://, hf:// or modelscope://)"
    )
