"""One content digest for an adapter folder, shared by the conversion service (which reports it)
and the registry (which checks it): sha256 over each file's relative name, a NUL and its bytes, in
sorted name order, so a renamed or changed file changes the digest."""

from __future__ import annotations

import hashlib
from pathlib import Path


def folder_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in folder_files(folder):
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
