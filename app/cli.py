"""The `mxext` console script. Each subcommand lives in the module that owns its work."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mxext", description="vllm-mxext: OpenAI-compatible LLM server")
    sub = parser.add_subparsers(dest="command", required=True)

    from app.hub import store_cli

    store_cli.add_parser(sub)

    from app import bench_cli

    bench_cli.add_parser(sub)

    try:
        from app.http import serve_cli
    except ImportError:  # the server package is optional while it is being built
        serve_cli = None
    if serve_cli is not None:
        serve_cli.add_parser(sub)

    from app import lora_cli

    lora_cli.add_parser(sub)

    from app.db import migrate

    migrate.add_parser(sub)

    from app.jobs import worker_cli

    worker_cli.add_parser(sub)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
