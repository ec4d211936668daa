"""The source-independent half of a pull: which files make a model, copying them with checksums,
and the manifest that records what landed in the store."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path, PurePosixPath
from typing import Any

from app.jobs.context import JobContext, JobError, TransientJobError
from app.jobs.outputs import MANIFEST_NAME  # noqa: F401 - re-exported: the pull's readers import it from here
from app.jobs.outputs import timestamp, write_manifest

CHUNK_SIZE = 1 << 20
# Pickled weights run code when loaded; we never copy them, let alone open them. `.bin` covers
# pytorch_model*.bin, adapter_model.bin and training_args.bin, all pickles in HF repos.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_PATTERNS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES]

ChunkReader = Callable[[], AbstractContextManager[Iterator[bytes]]]


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One file a source offers: its path inside the model folder, its size and how to read it."""

    name: str  # POSIX path relative to the model folder
    size: int
    read: ChunkReader  # a context manager yielding the file's bytes in chunks
    sha256: str | None = None  # published by the source (HF's LFS listing); verified when present


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a source resolved to: its files, and facts worth recording (a commit, a snapshot path)."""

    files: list[SourceFile]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Selection:
    files: list[SourceFile]  # what to copy
    gguf: SourceFile | None = None  # set when the model comes as one GGUF file to convert


def is_hidden(name: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(name).parts)


def is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def select_model_files(files: list[SourceFile], where: str) -> Selection:
    """Pick what to copy: config.json + safetensors (pickles and hidden files left behind), or a
    single .gguf to convert. Anything else is refused with what the source must contain."""
    visible = [f for f in files if not is_hidden(f.name)]
    names = {f.name for f in visible}
    has_safetensors = any(n.endswith(".safetensors") and "/" not in n for n in names)
    if "config.json" in names and has_safetensors:
        return Selection([f for f in visible if not is_pickle(f.name) and not f.name.lower().endswith(".gguf")])
    ggufs = [f for f in visible if f.name.lower().endswith(".gguf")]
    if len(ggufs) == 1:
        return Selection(ggufs, gguf=ggufs[0])
    if len(ggufs) > 1:
        listed = ", ".join(sorted(f.name for f in ggufs)[:5])
        raise JobError(f"{where} holds several .gguf files ({listed}); point the source at one of them")
    pickles = sorted(f.name for f in visible if is_pickle(f.name))
    if pickles:
        raise JobError(
            f"{where} has only pickled weights ({', '.join(pickles[:3])}); safetensors is needed: save the model "
            "with safe_serialization=True (model.safetensors) or give a .gguf file. Pickles are never loaded."
        )
    missing = "config.json" if "config.json" not in names else "*.safetensors weights"
    raise JobError(
        f"{where} is not a model: {missing} not found. Give a folder with config.json and *.safetensors "
        f"(a Hugging Face model folder) or a .gguf file (found: {', '.join(sorted(names)[:8]) or 'no files'})"
    )


def safe_relative(name: str, where: str) -> PurePosixPath:
    """`name` as a path that stays inside the model folder (an S3 key may say `../x`)."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts:
        raise JobError(f"{where}: file name {name!r} would land outside the model folder; rename it")
    return path


class ByteProgress:
    """Maps bytes done onto the job's progress between `start` and `end` percent."""

    def __init__(self, ctx: JobContext, total: int, start: float = 0.0, end: float = 100.0) -> None:
        self.ctx, self.total, self.start, self.end, self.done = ctx, max(total, 1), start, end, 0

    def advance(self, n: int) -> None:
        self.done += n
        self.ctx.progress(self.start + (self.end - self.start) * min(self.done / self.total, 1.0))


def copy_file(file: SourceFile, dest: Path, ctx: JobContext, progress: ByteProgress, where: str) -> dict[str, Any]:
    """Copy one file into `dest`, hashing as it streams; verify size (and sha256 where published)."""
    target = dest.joinpath(*safe_relative(file.name, where).parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with file.read() as chunks, open(target, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            progress.advance(len(chunk))
            ctx.check_cancelled()
    if size != file.size:
        # A short read is a dropped connection or a file changed under us: worth another attempt.
        raise TransientJobError(f"{where}/{file.name}: got {size} bytes, the source listed {file.size}")
    sha256 = digest.hexdigest()
    if file.sha256 and sha256 != file.sha256:
        raise JobError(
            f"{where}/{file.name}: sha256 {sha256} does not match the published {file.sha256}; "
            "the cached or uploaded copy is corrupt, delete it and pull again"
        )
    return {"name": file.name, "size": size, "sha256": sha256}


def copy_files(files: list[SourceFile], dest: Path, ctx: JobContext, progress: ByteProgress, where: str) -> list[dict[str, Any]]:
    entries = []
    for file in sorted(files, key=lambda f: f.name):
        ctx.check_cancelled()
        entries.append(copy_file(file, dest, ctx, progress, where))
    return entries


def hash_file(path: Path, ctx: JobContext) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            digest.update(chunk)
            ctx.check_cancelled()
    return digest.hexdigest()


def files_digest(entries: list[dict[str, Any]]) -> str:
    """One sha256 over the file entries (sorted by name, canonical JSON): the model's identity."""
    canonical = json.dumps(sorted(entries, key=lambda e: e["name"]), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_pull_manifest(folder: Path, source: str, entries: list[dict[str, Any]], job_id: str, **extra: Any) -> dict[str, Any]:
    """The pulled model's manifest (app.jobs.outputs): source, each file's size and sha256, the job."""
    return write_manifest(folder, job_id, source=source, pulled_at=timestamp(),
                          files=sorted(entries, key=lambda e: e["name"]), sha256=files_digest(entries), **extra)  # fmt: skip
