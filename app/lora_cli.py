"""`mxext lora`: load, list, unload and try LoRA adapters on a running server, over its HTTP API.

    mxext lora load NAME PATH        POST /v1/load_lora_adapter
    mxext lora list [--json]         GET  /v1/lora_adapters
    mxext lora unload NAME           POST /v1/unload_lora_adapter
    mxext lora test NAME "prompt"    POST /v1/chat/completions through the adapter; prints the reply

Errors print the server's message and exit 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_SERVER_URL = "http://0.0.0.0:8000"


class CLIError(Exception):
    """A failure to report on stderr (exit status 1)."""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `lora` on the `mxext` subcommands."""
    p = sub.add_parser("lora", help="Load, list, unload and try LoRA adapters on a running server")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server-url", default=os.environ.get("MXEXT_SERVER_URL") or DEFAULT_SERVER_URL,
                        help="The server (default: $MXEXT_SERVER_URL, else %(default)s)")
    common.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY") or None,
                        help="The server's --api-key (default: $VLLM_API_KEY)")
    common.add_argument("--admin-key", default=os.environ.get("VLLM_MXEXT_ADMIN_KEY") or None,
                        help="The server's --admin-key, for load and unload (default: $VLLM_MXEXT_ADMIN_KEY)")
    common.add_argument("--timeout", type=float, default=300.0, help="Seconds to wait for the server (default 300)")
    actions = p.add_subparsers(dest="lora_command", required=True)

    load = actions.add_parser("load", parents=[common], help="Load (or replace) an adapter from a folder")
    load.add_argument("name", help="The adapter's name (what clients put in `model`)")
    load.add_argument("path", help="Its PEFT folder, inside a folder the server allows")
    load.set_defaults(lora_run=run_load)

    listing = actions.add_parser("list", parents=[common], help="The loaded adapters")
    listing.add_argument("--json", action="store_true", help="Print the server's JSON")
    listing.set_defaults(lora_run=run_list)

    unload = actions.add_parser("unload", parents=[common], help="Unload an adapter")
    unload.add_argument("name")
    unload.set_defaults(lora_run=run_unload)

    test = actions.add_parser("test", parents=[common], help="Chat through an adapter and print the reply")
    test.add_argument("name")
    test.add_argument("prompt")
    test.add_argument("--max-tokens", type=int, default=128)
    test.add_argument("--temperature", type=float, default=0.0)
    test.set_defaults(lora_run=run_test)
    p.set_defaults(func=main)
    return p  # fmt: skip


def _request(args: argparse.Namespace, method: str, path: str, *, admin: bool = False, body: Any = None) -> Any:
    """One call to the server; CLIError with the server's own message when it refuses."""
    import httpx

    key = (args.admin_key or args.api_key) if admin else (args.api_key or args.admin_key)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = args.server_url.rstrip("/") + path
    try:
        response = httpx.request(method, url, json=body, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise CLIError(f"cannot reach the server at {args.server_url}: {exc}") from None
    if response.status_code >= 400:
        raise CLIError(f"{_error_message(response)} (HTTP {response.status_code})")
    return response


def _error_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    return response.text.strip()


def _server_path(path: str) -> str:
    """A path that exists here is sent absolute (the server may run elsewhere in the tree); else as given."""
    local = Path(path).expanduser()
    return os.path.abspath(local) if local.exists() else path


def run_load(args: argparse.Namespace) -> int:
    body = {"lora_name": args.name, "lora_path": _server_path(args.path)}
    print(_request(args, "POST", "/v1/load_lora_adapter", admin=True, body=body).text.strip())
    return 0


def run_unload(args: argparse.Namespace) -> int:
    print(_request(args, "POST", "/v1/unload_lora_adapter", admin=True, body={"lora_name": args.name}).text.strip())
    return 0


def run_list(args: argparse.Namespace) -> int:
    body = _request(args, "GET", "/v1/lora_adapters").json()
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    adapters = body.get("data") or []
    if not adapters:
        print("no adapters loaded")
        return 0
    rows = [("NAME", "RANK", "TIER", "VERSION", "REQUESTS", "LOADED", "PATH")]
    for a in adapters:
        loaded = datetime.datetime.fromtimestamp(a["loaded_at"]).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((a["name"], str(a["rank"]), a["tier"], str(a["version"]), str(a["requests_served"]), loaded,
                     a["path"]))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def run_test(args: argparse.Namespace) -> int:
    body = {
        "model": args.name,
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
    }
    reply = _request(args, "POST", "/v1/chat/completions", body=body).json()
    print(reply["choices"][0]["message"]["content"])
    return 0


def main(args: argparse.Namespace) -> int:
    """Run the chosen action; a refusal or an unreachable server prints why and returns 1."""
    try:
        return int(args.lora_run(args) or 0)
    except CLIError as exc:
        print(f"mxext lora {args.lora_command}: error: {exc}", file=sys.stderr)
        return 1
