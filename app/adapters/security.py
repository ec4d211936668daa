"""Where LoRA adapters may be loaded from: a path must lie inside an allowed root, symlinks followed.

The allowed roots are the store's adapter folder (`$MXEXT_HOME/adapters`), the folders of the
adapters named in the LoRA config file, and `VLLM_MXEXT_LORA_ROOTS` (os.pathsep-separated).
`check_adapter_path` refuses, before the engine reads a byte:

* `..` components, NUL bytes, empty or overlong paths;
* paths outside every root as written (so a refusal says nothing about whether they exist);
* paths that do not exist;
* paths whose symlinks lead outside every root, the adapter folder's own entries included;
* anything that is not a regular file or a folder of regular files (FIFOs, devices, sockets).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

MAX_PATH_CHARS = 4096
MAX_ENTRIES = 1000  # an adapter folder holds a handful of files; a huge tree is a mistake


class AdapterPathError(ValueError):
    """A lora_path the server refuses; the message says why and what is allowed."""


def allowed_roots(extra: Iterable[Path | str] = ()) -> tuple[Path, ...]:
    """The store's adapter folder, then `extra` (VLLM_MXEXT_LORA_ROOTS, the config's folders), absolute."""
    from app.settings import get_settings

    roots = [get_settings().store.adapters_dir, *extra]
    return tuple(dict.fromkeys(_absolute(Path(root).expanduser()) for root in roots))


def _absolute(path: Path) -> Path:
    return Path(os.path.normpath(path if path.is_absolute() else Path.cwd() / path))


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def describe_roots(roots: Sequence[Path]) -> str:
    return ", ".join(str(root) for root in roots) or "(none)"


def check_adapter_path(raw: str, roots: Sequence[Path], *, relative_to: Path | None = None) -> Path:
    """The resolved path of `raw` if an adapter may be loaded from it, else AdapterPathError.

    A relative `raw` is taken relative to `relative_to` (default: the first root, the store's
    adapter folder), never to the server's working directory.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise AdapterPathError("lora_path is empty; send the adapter's folder")
    if len(raw) > MAX_PATH_CHARS:
        raise AdapterPathError(f"lora_path is longer than {MAX_PATH_CHARS} characters")
    if "\x00" in raw:
        raise AdapterPathError("lora_path contains a NUL byte")
    written = Path(raw).expanduser()
    if ".." in written.parts:
        raise AdapterPathError(f"lora_path {raw!r} contains '..'; send a path without parent-folder steps")
    roots = [_absolute(Path(root)) for root in roots]
    if not roots:
        raise AdapterPathError("no folder is allowed for adapters; set VLLM_MXEXT_LORA_ROOTS")
    if not written.is_absolute():
        written = (relative_to or roots[0]) / written
    written = _absolute(written)
    # Compare against the roots both as configured and resolved (a root may itself be a symlink).
    lexical_roots = list(roots)
    resolved_roots = [root.resolve(strict=False) for root in roots]
    outside = (
        f"lora_path {raw!r} is outside the folders adapters may be loaded from: {describe_roots(roots)}. "
        "Put the adapter in one of them, or add its folder to VLLM_MXEXT_LORA_ROOTS or the LoRA config file"
    )
    if not _inside(written, lexical_roots + resolved_roots):
        raise AdapterPathError(outside)
    try:
        resolved = written.resolve(strict=True)
    except FileNotFoundError:
        raise AdapterPathError(f"lora_path {raw!r} does not exist") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a permission error
        raise AdapterPathError(f"lora_path {raw!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if not _inside(resolved, resolved_roots):
        raise AdapterPathError(f"lora_path {raw!r} is a symlink to a place outside the allowed folders. " + outside)
    _check_tree(raw, resolved, resolved_roots)
    return resolved


def _check_tree(raw: str, resolved: Path, roots: Sequence[Path]) -> None:
    """Regular files only, and no entry (a symlink) leading outside the roots."""
    mode = resolved.stat().st_mode
    if stat.S_ISREG(mode):
        return
    if not stat.S_ISDIR(mode):
        raise AdapterPathError(f"lora_path {raw!r} is neither a folder nor a regular file")
    count = 0
    for folder, dirs, files in os.walk(resolved, followlinks=False):
        for name in dirs + files:
            count += 1
            if count > MAX_ENTRIES:
                raise AdapterPathError(f"lora_path {raw!r} holds over {MAX_ENTRIES} entries; is it an adapter folder?")
            entry = Path(folder) / name
            shown = entry.relative_to(resolved)
            if entry.is_symlink():
                try:
                    target = entry.resolve(strict=True)
                except (OSError, RuntimeError):
                    raise AdapterPathError(f"{shown} in lora_path {raw!r} is a broken symlink") from None
                if not _inside(target, roots):
                    raise AdapterPathError(
                        f"{shown} in lora_path {raw!r} is a symlink to a place outside the allowed folders "
                        f"({describe_roots(roots)})"
                    )
                if target.is_dir():
                    raise AdapterPathError(f"{shown} in lora_path {raw!r} is a symlink to a folder; copy it in instead")
            if name in files and not stat.S_ISREG(entry.stat().st_mode):
                raise AdapterPathError(f"{shown} in lora_path {raw!r} is not a regular file")
