"""Latency of the job API under concurrent submissions: `python -m bench.jobs_api --url http://127.0.0.1:8000`.

Submits N model pulls at once (each with a name of its own, from --source), then GETs each job at
once, then submits N more one at a time, and prints p50/p99/max of each. The submitted jobs are cancelled afterwards (no worker need
run; with one running they are real pulls of --source).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import httpx


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(label: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (f"{label:<8} n={len(ms):<4} p50={statistics.median(ms):7.1f} ms  p99={percentile(ms, 99):7.1f} ms  "
            f"max={max(ms):7.1f} ms")  # fmt: skip


async def timed(client: httpx.AsyncClient, method: str, url: str, **kw) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = await client.request(method, url, **kw)
    return time.perf_counter() - started, response


async def run(url: str, n: int, source: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:
        await client.get("/v1/jobs", params={"limit": 1})  # warm the connection pool and the server
        tag = uuid.uuid4().hex[:8]
        submits = await asyncio.gather(*(
            timed(client, "POST", "/v1/jobs/model-pulls", json={"source": source, "name": f"bench-{tag}-{i}"},
                  headers={"Idempotency-Key": f"bench-{tag}-{i}"})
            for i in range(n)
        ))  # fmt: skip
        bad = [r for _, r in submits if r.status_code != 202]
        if bad:
            print(f"{len(bad)} submissions failed, e.g. {bad[0].status_code} {bad[0].text}")
            return 1
        ids = [r.json()["id"] for _, r in submits]
        gets = await asyncio.gather(*(timed(client, "GET", f"/v1/jobs/{job_id}") for job_id in ids))
        serial = []
        for i in range(n):  # one at a time: the latency of a request with the server otherwise idle
            serial.append(await timed(client, "POST", "/v1/jobs/model-pulls", json={"source": source, "name": f"bench-{tag}-s{i}"}))
        ids += [r.json()["id"] for _, r in serial]
        print(summary("submit", [t for t, _ in submits]) + f"   ({n} at once)")
        print(summary("get", [t for t, _ in gets]) + f"   ({n} at once)")
        print(summary("submit", [t for t, _ in serial]) + "   (one at a time)")
        await asyncio.gather(*(client.post(f"/v1/jobs/{job_id}/cancel") for job_id in ids))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs_api", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", "-n", type=int, default=50, help="submissions at once (default 50)")
    parser.add_argument("--source", default="/nonexistent/bench-model", help="the pull source each job names")
    parser.add_argument("--key", default=None, help="admin (or API) key, if the server needs one")
    args = parser.parse_args(argv)
    return asyncio.run(run(args.url, args.concurrency, args.source, args.key))


if __name__ == "__main__":
    raise SystemExit(main())
