"""One content digest for an adapter folder, shared by the conversion service (which reports it)
and the registry (which checks it): sha256 over each file's relative name, a NUL and its bytes, in
sorted name order, so a renamed or changed file changes the digest. The job manifest (who wrote the
folder and when) is not part of the adapter: the same weights converted twice have one digest, so
servers are not told to reload an adapter that did not change."""

from __future__ import annotations

import hashlib
from pathlib import Path

from app.jobs.outputs import MANIFEST_NAME


def folder_files(folder: Path) -> list[str]:
    """The adapter's files, relative to `folder`, sorted; the job manifest left out."""
    return sorted(
        name for p in folder.rglob("*") if p.is_file() and (name := p.relative_to(folder).as_posix()) != MANIFEST_NAME
    )


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in folder_files(folder):
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
