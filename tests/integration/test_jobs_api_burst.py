"""The job API under a burst, on a real `mxext serve` with Postgres (through a proxy the test can cut)
and Redis: concurrent submissions and reads share statements (app.jobs.coalesce), and every request
still gets its own answer; a database outage after start-up is a 503 that says so, and the server
recovers by itself when the database is back."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from tests.integration.tcp_proxy import TcpProxy


@pytest.fixture(scope="module")
def proxy(postgres_url):
    parts = urlsplit(postgres_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def burst_server(smollm2_dir, postgres_url, redis_url, proxy, server_process, tmp_path_factory):
    parts = urlsplit(postgres_url)
    database_url = f"postgresql://{parts.username}@127.0.0.1:{proxy.port}{parts.path}"
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "MXEXT_HOME": str(tmp_path_factory.mktemp("burst")),
           "MXEXT_SIGNAL_CHANNEL": f"mxext:test:{uuid.uuid4().hex[:8]}"}  # fmt: skip
    proc = server_process(smollm2_dir, tmp_path_factory.mktemp("burst-log") / "server.log", "--max-model-len", "512",
                          env=env)  # fmt: skip
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _cancel_all(base_url: str, ids: list[str]) -> None:
    # No worker runs here: cancelling the queued jobs leaves nothing for a later test's worker.
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for job_id in ids:
            client.post(f"/v1/jobs/{job_id}/cancel")


def test_a_burst_of_submissions_and_reads_each_get_their_own_answer(burst_server, postgres_url):
    tag = uuid.uuid4().hex[:8]
    key = f"burst-{tag}"
    same = {"source": "/nonexistent/burst", "name": f"same-{tag}"}

    async def burst():
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
        async with httpx.AsyncClient(base_url=burst_server.base_url, timeout=30, limits=limits) as client:
            bodies = (
                [(same, {"Idempotency-Key": key})] * 20  # one job, whichever batch each lands in
                + [({**same, "name": f"other-{tag}"}, {"Idempotency-Key": key})] * 5  # the key, other params
                + [({"source": "/nonexistent/burst", "name": f"free-{tag}-{i}"}, {}) for i in range(25)]
            )  # fmt: skip
            submits = await asyncio.gather(*(client.post("/v1/jobs/model-pulls", json=b, headers=h) for b, h in bodies))
            created = [r.json()["id"] for r in submits if r.status_code == 202]
            unknown = [str(uuid.uuid4()) for _ in range(5)] + ["not-an-id"]
            reads = await asyncio.gather(*(client.get(f"/v1/jobs/{job_id}") for job_id in created + unknown))
            return submits, created, reads, unknown

    submits, created, reads, unknown = asyncio.run(burst())
    try:
        statuses = [r.status_code for r in submits]
        keyed, conflicting, free = submits[:20], submits[20:25], submits[25:]
        # Every same-key request got the one job; exactly one of them made it.
        assert {r.status_code for r in keyed} == {202} and len({r.json()["id"] for r in keyed}) == 1, statuses
        assert sum(r.headers.get("idempotent-replayed") != "true" for r in keyed) <= 1
        for r in conflicting:
            assert r.status_code == 409 and "with other parameters" in r.json()["error"]["message"], r.text
        assert {r.status_code for r in free} == {202} and len({r.json()["id"] for r in free}) == 25
        assert [r.json()["params"]["name"] for r in free] == [f"free-{tag}-{i}" for i in range(25)]
        # Reads: each job as created, in its own response; unknown ids are 404 each.
        found = reads[: len(created)]
        assert [r.status_code for r in found] == [200] * len(created)
        assert [r.json()["id"] for r in found] == created
        assert [r.status_code for r in reads[len(created):]] == [404] * len(unknown)
        # The database agrees: 26 rows for this burst, one per free name and one for the key.
        with psycopg.connect(postgres_url) as conn:
            rows = conn.execute("SELECT params->>'name', idempotency_key FROM jobs WHERE params->>'name' LIKE %s",
                                (f"%-{tag}%",)).fetchall()  # fmt: skip
        assert sorted(name for name, _ in rows) == sorted([f"same-{tag}"] + [f"free-{tag}-{i}" for i in range(25)])
        assert [k for n, k in rows if n == f"same-{tag}"] == [key]
    finally:
        _cancel_all(burst_server.base_url, sorted(set(created)))


def test_a_database_outage_is_a_503_that_says_so_and_the_server_recovers(burst_server, proxy, postgres_url):
    tag = uuid.uuid4().hex[:8]
    body = {"source": "/nonexistent/outage", "name": f"outage-{tag}"}
    with httpx.Client(base_url=burst_server.base_url, timeout=30) as client:
        before = client.post("/v1/jobs/model-pulls", json=body)
        assert before.status_code == 202, before.text
        proxy.cut()
        try:
            during = [client.post("/v1/jobs/model-pulls", json={**body, "name": f"lost-{tag}"}),
                      client.get(f"/v1/jobs/{before.json()['id']}"), client.get("/v1/jobs")]  # fmt: skip
            for response in during:
                assert response.status_code == 503, response.text
                assert "database is unavailable" in response.json()["error"]["message"]
                assert response.headers["retry-after"] == "5"
            # Inference does not touch the database.
            assert client.get("/health").status_code == 200
        finally:
            proxy.restore()
        after = client.post("/v1/jobs/model-pulls", json={**body, "name": f"after-{tag}"})
        assert after.status_code == 202, after.text
        assert client.get(f"/v1/jobs/{before.json()['id']}").json()["status"] == "queued"
        _cancel_all(burst_server.base_url, [before.json()["id"], after.json()["id"]])
    with psycopg.connect(postgres_url) as conn:
        names = [n for (n,) in conn.execute("SELECT params->>'name' FROM jobs WHERE params->>'name' LIKE %s",
                                            (f"%-{tag}",))]  # fmt: skip
    assert sorted(names) == sorted([f"outage-{tag}", f"after-{tag}"])  # the refused one left no row
