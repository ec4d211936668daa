"""`mxext model ...`: prepare, list and convert models in the store.

The store module (and torch, through the converter) is imported inside each command so that
`mxext --help` and the other subcommands do not pay for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

_DTYPES = ("bfloat16", "float16", "float32")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mxext model` and its subcommands on the top-level parser's subparsers."""
    from app.settings import DEFAULT_MODEL

    model = subparsers.add_parser("model", help="manage models in the model store ($MXEXT_HOME/models)")
    sub = model.add_subparsers(dest="model_command", required=True)

    prepare = sub.add_parser("prepare", help="make a model ready (converting its GGUF if needed); prints its folder")
    prepare.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"store name, folder or .gguf (default {DEFAULT_MODEL})")
    prepare.set_defaults(func=_prepare)

    listing = sub.add_parser("list", help="list the models in the store")
    listing.set_defaults(func=_list)

    convert = sub.add_parser("convert", help="convert a llama.cpp GGUF file into the store")
    convert.add_argument("gguf_file", type=Path, metavar="GGUF_FILE")
    convert.add_argument("--name", help="store name (default: the file name without .gguf, lower-case)")
    convert.add_argument("--dtype", choices=_DTYPES, default="bfloat16", help="weight dtype (default bfloat16)")
    convert.set_defaults(func=_convert)
    return model


def _store() -> Any:
    from app.hub.store import ModelStore
    from app.settings import get_settings

    return ModelStore(get_settings().store.home)


def _prepare(args: argparse.Namespace) -> int:
    try:
        folder = _store().resolve(args.name, progress=True)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def _list(args: argparse.Namespace) -> int:
    store = _store()
    names = store.list_models()
    if not names:
        print(f"no models in {store.models_dir}; try `mxext model prepare`", file=sys.stderr)
    for name in names:
        print(name)
    return 0


def _convert(args: argparse.Namespace) -> int:
    if not args.gguf_file.is_file():
        print(f"error: no such file: {args.gguf_file}", file=sys.stderr)
        return 1
    try:
        folder = _store().convert(args.gguf_file, name=args.name, dtype=args.dtype, progress=True)
    except ValueError as exc:  # unsupported architecture / tensor type, bad name
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0
