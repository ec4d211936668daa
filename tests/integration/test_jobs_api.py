"""The REST job API through HTTP, in both control-plane modes: embedded (SQLite, jobs in server
threads) and Postgres + Redis with a real `mxext worker` process."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.integration.jobs_support import WorkerProcess, job_server, job_settings, make_model_folder, submit, wait_job


@pytest.fixture(scope="module", params=["embedded", "postgres+redis"])
def mode(request, tmp_path_factory):
    """(client, settings, source folder) for one mode; the worker (if any) is stopped afterwards."""
    home = tmp_path_factory.mktemp(f"jobs-{request.param.replace('+', '-')}")
    source = make_model_folder(home / "src" / "tiny")
    if request.param == "embedded":
        settings = job_settings(home / "store")
        with job_server(settings) as client:
            yield client, settings, source
        return
    settings = job_settings(home / "store", request.getfixturevalue("postgres_url"), request.getfixturevalue("redis_url"))
    worker = WorkerProcess(settings, home / "worker.log", name="api")
    try:
        worker.wait_ready()
        with job_server(settings) as client:
            yield client, settings, source
    finally:
        worker.stop()


def test_pull_then_native_build(mode):
    client, settings, source = mode
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    response = submit(client, "model-pulls", {"source": str(source), "name": name})
    assert response.status_code == 202 and response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    job = response.json()
    assert (job["kind"], job["status"], job["params"]) == ("model-pull", "queued", {"source": str(source), "name": name})
    job = wait_job(client, job["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == 100.0 and job["attempts"] == 1 and job["started_at"] and job["finished_at"]
    pulled = Path(job["result"]["path"])
    assert pulled == settings.store.models_dir / name
    assert (pulled / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert {f["name"] for f in job["result"]["files"]} == {"config.json", "model.safetensors", "tokenizer_config.json"}

    build = wait_job(client, submit(client, "engine-builds", {"model": name, "profile": "native-fp32"}).json()["id"])
    assert build["status"] == "succeeded", build
    out = Path(build["result"]["path"])
    assert out.name == f"{name}-native-fp32" and build["result"]["dtype"] == "float32"
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        assert str(fh.get_tensor("model.embed_tokens.weight").dtype) == "torch.float32"
        assert str(fh.get_tensor("positions").dtype) == "torch.int64"  # integers are not cast
    listed = client.get("/v1/jobs", params={"kind": "engine-build", "limit": 100}).json()
    assert listed["object"] == "list" and build["id"] in [j["id"] for j in listed["data"]]
    assert all(j["kind"] == "engine-build" for j in listed["data"])


@pytest.mark.parametrize(
    ("route", "body", "needle", "param"),
    [
        ("model-pulls", {"source": "ftp://host/x", "name": "m"}, "unknown scheme 'ftp://'", "source"),
        ("model-pulls", {"source": 3, "name": "m"}, "Expected `str`, got `int`", "source"),
        ("model-pulls", {"source": "/x"}, "missing required field `name`", None),
        ("model-pulls", {"source": "/x", "name": "m", "extra": 1}, "Unrecognized request argument supplied: extra", "extra"),
        ("model-pulls", {"source": "/x", "name": "../etc"}, "becomes a folder in the model store", "name"),
        ("lora-conversions", {"source": "/a", "name": "x", "to_format": "onnx"}, "not a LoRA format", "to_format"),
        ("engine-builds", {"model": "m", "profile": "native-int3"}, "profile 'native-int3' is not known", "profile"),
        ("benchmarks", {"config": {"server": {"model": "m"}}}, "config.server.url", "config.server.url"),
        ("benchmarks", {"config": {"nope": {}}}, "unknown section", "config"),
    ],
)
def test_bad_bodies_are_400_and_write_nothing(mode, route, body, needle, param):
    client = mode[0]
    before = len(client.get("/v1/jobs", params={"limit": 100}).json()["data"])
    response = submit(client, route, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    assert len(client.get("/v1/jobs", params={"limit": 100}).json()["data"]) == before


def test_bad_inputs_the_worker_finds_fail_the_job_and_change_nothing(mode, tmp_path):
    client, settings, _ = mode
    before = sorted(p.name for p in settings.store.models_dir.iterdir()) if settings.store.models_dir.exists() else []
    cases = [
        ("model-pulls", {"source": str(tmp_path / "missing"), "name": "ghost"}, "no such file or folder"),
        ("model-pulls", {"source": str(tmp_path), "name": "empty"}, "config.json"),
        ("engine-builds", {"model": "never-pulled"}, "not a registered model"),
        ("engine-builds", {"model": str(mode[2]), "profile": "trtllm-fp16", "name": "trt-out"}, "pip install tensorrt_llm"),
    ]
    for route, body, needle in cases:
        job = wait_job(client, submit(client, route, body).json()["id"])
        assert job["status"] == "failed" and needle in job["error"], job
        assert job["result"] is None
    after = sorted(p.name for p in settings.store.models_dir.iterdir()) if settings.store.models_dir.exists() else []
    assert [n for n in after if n not in before and not n.startswith(".locks")] == []


def test_idempotency_key(mode):
    client, _, source = mode
    key = {"Idempotency-Key": f"key-{uuid.uuid4()}"}
    body = {"source": str(source), "name": f"idem-{uuid.uuid4().hex[:6]}"}
    first = submit(client, "model-pulls", body, headers=key)
    again = submit(client, "model-pulls", body, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = submit(client, "model-pulls", {**body, "name": "other"}, headers=key)
    assert other.status_code == 409 and "with other parameters" in other.json()["error"]["message"]
    assert wait_job(client, first.json()["id"])["status"] == "succeeded"
    ids = [j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["data"]]
    assert ids.count(first.json()["id"]) == 1


def test_get_cancel_and_paging_errors(mode):
    client, _, source = mode
    job = wait_job(client, submit(client, "model-pulls", {"source": str(source), "name": f"c-{uuid.uuid4().hex[:6]}"}).json()["id"])
    finished = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert finished.status_code == 409 and "already succeeded" in finished.json()["error"]["message"]
    for bad in (str(uuid.uuid4()), "not-an-id"):
        for response in (client.get(f"/v1/jobs/{bad}"), client.post(f"/v1/jobs/{bad}/cancel")):
            assert response.status_code == 404 and "No job with id" in response.json()["error"]["message"]
    assert client.get("/v1/jobs", params={"limit": 101}).status_code == 400
    assert client.get("/v1/jobs", params={"status": "done"}).json()["error"]["param"] == "status"
    assert client.get("/v1/jobs", params={"after": str(uuid.uuid4())}).status_code == 400
    page1 = client.get("/v1/jobs", params={"limit": 1}).json()
    page2 = client.get("/v1/jobs", params={"limit": 1, "after": page1["last_id"]}).json()
    assert page1["has_more"] and page2["data"][0]["id"] != page1["data"][0]["id"]
    assert page2["data"][0]["created_at"] <= page1["data"][0]["created_at"]


def test_embedded_admin_key_guards_jobs(tmp_path):
    with job_server(job_settings(tmp_path), admin_key="admin-secret") as client:
        assert client.get("/v1/jobs").status_code == 401
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/v1/jobs", headers={"Authorization": "Bearer admin-secret"})
        assert ok.status_code == 200 and ok.json()["data"] == []


def test_embedded_runner_requeues_jobs_left_by_a_previous_process(tmp_path):
    """A job queued (or running) when the server stopped runs when the next server starts."""
    import asyncio

    from app.db.migrate import upgrade
    from app.db.session import async_sessions, make_async_engine, sync_sessions
    from app.jobs import store

    settings = job_settings(tmp_path / "store")
    source = make_model_folder(tmp_path / "src")
    upgrade(settings)

    async def leave_jobs() -> list[str]:
        engine = make_async_engine(settings)
        sessions = async_sessions(engine)
        queued, _ = await store.create_job(sessions, "model-pull", {"source": str(source), "name": "left-queued"})
        running, _ = await store.create_job(sessions, "model-pull", {"source": str(source), "name": "left-running"})
        await engine.dispose()
        return [str(queued.id), str(running.id)]

    ids = asyncio.run(leave_jobs())
    store.claim(sync_sessions(settings), ids[1], "a-server-that-died")
    with job_server(settings) as client:
        jobs = [wait_job(client, job_id) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"]
    assert [j["attempts"] for j in jobs] == [1, 2]
    assert (settings.store.models_dir / "left-running" / "model.safetensors").is_file()


def test_an_unreachable_broker_is_a_503_and_the_job_fails(postgres_url, tmp_path):
    settings = job_settings(tmp_path / "store", postgres_url, "redis://127.0.0.1:1/0")
    with job_server(settings) as client:
        response = submit(client, "model-pulls", {"source": "/x", "name": "never-queued"})
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "broker_unavailable" and "could not enqueue the job on Redis" in error["message"]
        job_id = error["message"].split()[1]
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "failed" and "could not enqueue" in job["error"]


def test_concurrent_submissions_with_one_idempotency_key_make_one_job(postgres_url, redis_url, tmp_path):
    import asyncio

    from app.db.session import async_sessions, make_async_engine
    from app.jobs import store

    settings = job_settings(tmp_path / "store", postgres_url, redis_url)
    params = {"source": "/x", "name": "same"}

    async def race():
        engine = make_async_engine(settings)
        try:
            sessions = async_sessions(engine)
            key = f"race-{uuid.uuid4()}"
            return await asyncio.gather(*(store.create_job(sessions, "model-pull", params, key) for _ in range(20)))
        finally:
            await engine.dispose()

    results = asyncio.run(race())
    assert len({job.id for job, _ in results}) == 1 and sum(created for _, created in results) == 1
