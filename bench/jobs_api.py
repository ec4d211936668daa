"""Latency of the job API under concurrent submissions: `python -m bench.jobs_api --url http://127.0.0.1:8000`.

Submits N model pulls at once (each with a name of its own, from --source), then GETs each job at
once, then submits N more one at a time, and prints p50/p99/max of each, with the CPU time this
client itself spent on each phase. The submitted jobs are cancelled afterwards (no worker need run;
with one running they are real pulls of --source).

The default client is a lean one (HTTP/1.1 over N keep-alive connections opened beforehand, raw
asyncio streams) so that on a small machine the figures are mostly the server's; `--client httpx`
uses httpx as the first version of this script did. `--nice` lowers this process's priority too.
`--server-pid` adds the server's own CPU time per request to each line (Linux: the run time of all
its threads, from /proc/PID/task/*/schedstat). With `--rounds` > 1 a last line pools every round:
the p99 of all concurrent submissions is the figure the job API's target is about.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from typing import Any
from urllib.parse import urlsplit


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(label: str, seconds: list[float], cpu_s: float | None = None, server_cpu_s: float | None = None) -> str:
    ms = [s * 1000 for s in seconds]
    line = (f"{label:<8} n={len(ms):<4} p50={statistics.median(ms):7.1f} ms  p99={percentile(ms, 99):7.1f} ms  "
            f"max={max(ms):7.1f} ms")  # fmt: skip
    if cpu_s is not None:
        line += f"  client cpu={cpu_s * 1000:6.1f} ms"
    if server_cpu_s is not None:
        line += f"  server cpu/request={server_cpu_s * 1000 / len(ms):5.2f} ms"
    return line


class ServerCPU:
    """The CPU time of every thread of a process so far (seconds); None without a pid."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid

    def __call__(self) -> float | None:
        if self.pid is None:
            return None
        total = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
                continue
        return total / 1e9

    def since(self, start: float | None) -> float | None:
        now = self()
        return None if now is None or start is None else now - start


class Reply:
    def __init__(self, status_code: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.body = status_code, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


class RawConnection:
    """One keep-alive HTTP/1.1 connection: a request at a time, Content-Length or chunked bodies."""

    def __init__(self, host: str, port: int, base_headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.base = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **base_headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> Reply:  # fmt: skip
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\n{self.base}"
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode("latin-1") + b"\r\n" + (body or b""))
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        got: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                got[name.strip().lower()] = value.strip()
        if "content-length" in got:
            data = await self.reader.readexactly(int(got["content-length"]))
        elif got.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            data = b"".join(p[:-2] for p in parts)
        else:
            data = b""
        return Reply(status, got, data)


class RawClient:
    """A pool of N connections; each request takes a free one (all are opened up front)."""

    def __init__(self, url: str, n: int, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.connections = [RawConnection(parts.hostname or "127.0.0.1", parts.port or 80, headers) for _ in range(n)]
        self.free: asyncio.Queue[RawConnection] = asyncio.Queue()

    async def __aenter__(self) -> RawClient:
        await asyncio.gather(*(c.open() for c in self.connections))
        for c in self.connections:
            self.free.put_nowait(c)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.gather(*(c.close() for c in self.connections), return_exceptions=True)

    async def request(self, method: str, path: str, json_body: Any = None, headers: dict[str, str] | None = None) -> Reply:
        connection = await self.free.get()
        try:
            body = json.dumps(json_body).encode() if json_body is not None else None
            return await connection.request(method, path, body, headers)
        finally:
            self.free.put_nowait(connection)


class HttpxClient:
    def __init__(self, url: str, n: int, headers: dict[str, str]) -> None:
        import httpx

        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        self.client = httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits)

    async def __aenter__(self) -> HttpxClient:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.__aexit__(*exc)

    async def request(self, method: str, path: str, json_body: Any = None, headers: dict[str, str] | None = None) -> Any:
        return await self.client.request(method, path, json=json_body, headers=headers)


async def timed(client: Any, method: str, path: str, **kw: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    response = await client.request(method, path, **kw)
    return time.perf_counter() - started, response


async def run(url: str, n: int, source: str, key: str | None, client_kind: str, rounds: int,
              server_pid: int | None = None) -> int:  # fmt: skip
    server_cpu = ServerCPU(server_pid)
    all_submits: list[float] = []
    all_gets: list[float] = []
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    make = RawClient if client_kind == "raw" else HttpxClient
    async with make(url, n, headers) as client:
        # warm every connection and the server (the first requests of a process are slow)
        await asyncio.gather(*(client.request("GET", "/v1/jobs?limit=1") for _ in range(n)))
        ids: list[str] = []
        for round_ in range(rounds):
            tag = uuid.uuid4().hex[:8]
            cpu, server = time.process_time(), server_cpu()
            submits = await asyncio.gather(*(
                timed(client, "POST", "/v1/jobs/model-pulls", json_body={"source": source, "name": f"bench-{tag}-{i}"},
                      headers={"Idempotency-Key": f"bench-{tag}-{i}"})
                for i in range(n)
            ))  # fmt: skip
            submit_cpu, submit_server = time.process_time() - cpu, server_cpu.since(server)
            bad = [r for _, r in submits if r.status_code != 202]
            if bad:
                print(f"{len(bad)} submissions failed, e.g. {bad[0].status_code} {bad[0].text}")
                return 1
            batch = [r.json()["id"] for _, r in submits]
            ids += batch
            cpu, server = time.process_time(), server_cpu()
            gets = await asyncio.gather(*(timed(client, "GET", f"/v1/jobs/{job_id}") for job_id in batch))
            get_cpu, get_server = time.process_time() - cpu, server_cpu.since(server)
            if any(r.status_code != 200 for _, r in gets):
                print("a GET failed")
                return 1
            cpu, server = time.process_time(), server_cpu()
            serial = []
            for i in range(n):  # one at a time: the latency of a request with the server otherwise idle
                serial.append(await timed(client, "POST", "/v1/jobs/model-pulls",
                                          json_body={"source": source, "name": f"bench-{tag}-s{i}"}))  # fmt: skip
            serial_cpu, serial_server = time.process_time() - cpu, server_cpu.since(server)
            ids += [r.json()["id"] for _, r in serial]
            prefix = f"[{round_ + 1}/{rounds}] " if rounds > 1 else ""
            all_submits += [t for t, _ in submits]
            all_gets += [t for t, _ in gets]
            print(prefix + summary("submit", [t for t, _ in submits], submit_cpu, submit_server) + f"   ({n} at once)")
            print(prefix + summary("get", [t for t, _ in gets], get_cpu, get_server) + f"   ({n} at once)")
            print(prefix + summary("submit", [t for t, _ in serial], serial_cpu, serial_server) + "   (one at a time)",
                  flush=True)  # fmt: skip
            await asyncio.sleep(0.5)  # let the worker catch up a little between rounds
        await asyncio.gather(*(client.request("POST", f"/v1/jobs/{job_id}/cancel") for job_id in ids))
    if rounds > 1:
        print(f"[all {rounds}] " + summary("submit", all_submits) + f"   ({n} at once, every round)")
        print(f"[all {rounds}] " + summary("get", all_gets) + f"   ({n} at once, every round)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs_api", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", "-n", type=int, default=50, help="submissions at once (default 50)")
    parser.add_argument("--source", default="/nonexistent/bench-model", help="the pull source each job names")
    parser.add_argument("--key", default=None, help="admin (or API) key, if the server needs one")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="raw: lean HTTP/1.1 over keep-alive connections (default); httpx: the first version's client")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="repeat the three phases (default 1)")
    parser.add_argument("--nice", action="store_true", help="run this client at nice 19")
    parser.add_argument("--server-pid", type=int, default=None,
                        help="the server's pid (same machine): report its CPU time per request")  # fmt: skip
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(19)
    return asyncio.run(run(args.url, args.concurrency, args.source, args.key, args.client, args.rounds,
                           args.server_pid))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
