"""What a user typed as a pull's `source` and `name`, parsed and checked before any work starts."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from app.jobs.context import JobError
from app.settings import DEFAULT_MODEL

SCHEMES = ("s3", "hf", "modelscope", "file")
SUPPORTED_FORMS = "a local path (or file:///path), s3://bucket/prefix, hf://org/model[@revision], modelscope://org/model[@revision]"

# A strict subset of ModelStore's rule (non-empty, no path separators, not hidden), so every name we
# accept resolves there, and no name can climb out of models/ or hide as a dot-folder.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Hub repo ids: `org/model`, each part in the character set both hubs allow.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    scheme: str  # "local", "s3", "hf" or "modelscope"
    location: str  # a path, "bucket/prefix" or "org/model"
    revision: str | None = None

    @property
    def bucket(self) -> str:
        return self.location.split("/", 1)[0]

    @property
    def prefix(self) -> str:
        parts = self.location.split("/", 1)
        return parts[1] if len(parts) == 2 else ""

    def __str__(self) -> str:
        if self.scheme == "local":
            return self.location
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.scheme}://{self.location}{rev}"


def parse_source(source: object) -> SourceSpec:
    """Parse `source` into a SourceSpec, or raise JobError saying which forms are accepted."""
    if not isinstance(source, str) or not source.strip():
        raise JobError(f"source: give one of {SUPPORTED_FORMS}")
    source = source.strip()
    if "://" not in source:
        return SourceSpec("local", str(Path(source).expanduser().absolute()))
    scheme, rest = source.split("://", 1)
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise JobError(f"source {source!r}: unknown scheme {scheme + '://'!r}; supported: {SUPPORTED_FORMS}")
    if scheme == "file":
        parsed = urlparse(source)
        if parsed.netloc not in ("", "localhost"):
            raise JobError(f"source {source!r}: file:// URLs must name a path on this machine, like file:///models/x")
        path = unquote(parsed.path)
        if not path:
            raise JobError(f"source {source!r}: give a path after file://, like file:///models/x")
        return SourceSpec("local", str(Path(path).expanduser().absolute()))
    if scheme == "s3":
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise JobError(f"source {source!r}: name the bucket, like s3://bucket/prefix")
        return SourceSpec("s3", rest.rstrip("/"))
    repo, _, revision = rest.partition("@")
    repo = repo.strip("/")
    if not _REPO_ID.fullmatch(repo):
        raise JobError(f"source {source!r}: name a repository as {scheme}://org/model (optionally @revision)")
    if "@" in rest and not revision:
        raise JobError(f"source {source!r}: nothing after '@'; give a branch, tag or commit, or drop the '@'")
    return SourceSpec(scheme, repo, revision or None)


def check_model_name(name: object) -> str:
    """The store folder name for a pull, or JobError saying what a valid name looks like."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise JobError(
            f"name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it becomes a folder in the model store)"
        )
    if name == DEFAULT_MODEL:
        # The store rebuilds this name from the embedded GGUF on resolve, which would replace a pull.
        raise JobError(f"name {name!r} is reserved for the built-in default model; choose another name")
    return name
