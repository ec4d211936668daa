"""Shared fixtures: the real embedded model (converted once into the store) and markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def store_home() -> Path:
    """The model store the tests use: MXEXT_HOME or the default, so CI converts the GGUF once."""
    return Path(os.environ.get("MXEXT_HOME") or "~/.cache/mxext").expanduser()


@pytest.fixture(scope="session")
def smollm2_dir(store_home: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder in the store (converted from the GGUF if missing)."""
    from app.hub.store import ModelStore

    return ModelStore(store_home).resolve(DEFAULT_MODEL)
