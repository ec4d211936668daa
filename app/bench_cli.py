"""`mxext bench`: the serving benchmark (bench/serving), registered on the top-level parser.

The benchmark's modules are imported only when the command runs, so `mxext --help` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `mxext bench` on the top-level parser's subparsers."""
    from bench.serving.cli import DESCRIPTION, EPILOG, add_arguments

    parser = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible server (TTFT, TPOT, throughput)",
                                   description=DESCRIPTION, epilog=EPILOG)  # fmt: skip
    add_arguments(parser)
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    from bench.serving.cli import run_args

    return run_args(args)
