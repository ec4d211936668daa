"""Model-pull jobs end to end: REST submission, a real `mxext worker` on this machine's Postgres and
Redis, and the remote sources as a deployment sees them — s3:// from a moto server on loopback,
hf:// and modelscope:// from offline caches laid out on disk, all configured through the worker's
environment. The sources' own edge cases are in test_model_pulls.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.models import ModelArtifact
from app.db.session import sync_sessions
from tests.integration.jobs_support import WorkerProcess, job_server, job_settings, submit, wait_job
from tests.integration.test_model_pulls import (  # noqa: F401 - model_src and s3_endpoint are fixtures
    BUCKET,
    KEYS,
    PREFIX,
    hf_cache,
    model_files,
    model_src,
    s3_endpoint,
)


@pytest.fixture(scope="module")
def settings(postgres_url, redis_url, tmp_path_factory):
    return job_settings(tmp_path_factory.mktemp("jobs-pulls") / "store", postgres_url, redis_url)


def test_s3_and_hf_pulls_through_the_api_and_a_worker(settings, model_src, s3_endpoint, tmp_path):  # noqa: F811
    hf_cache(tmp_path / "hf", "acme/tiny", model_src)
    shutil.copytree(model_src, tmp_path / "ms" / "models" / "acme--tiny" / "snapshots" / "master")
    env = {"MXEXT_S3_ENDPOINT": s3_endpoint, "MXEXT_S3_ACCESS_KEY": KEYS["access_key"],
           "MXEXT_S3_SECRET_KEY": KEYS["secret_key"], "MXEXT_S3_REGION": "us-east-1",
           "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "MODELSCOPE_CACHE": str(tmp_path / "ms"), "MODELSCOPE_OFFLINE": "1"}  # fmt: skip
    worker = WorkerProcess(settings, tmp_path / "worker.log", name="puller", extra_env=env)
    try:
        worker.wait_ready()
        with job_server(settings) as client:
            jobs = {
                "s3": submit(client, "model-pulls", {"source": f"s3://{BUCKET}/{PREFIX}", "name": "e2e-s3"}),
                "hf": submit(client, "model-pulls", {"source": "hf://acme/tiny", "name": "e2e-hf"}),
                "ms": submit(client, "model-pulls", {"source": "modelscope://acme/tiny", "name": "e2e-ms"}),
                "missing": submit(client, "model-pulls", {"source": f"s3://{BUCKET}/no/such/prefix", "name": "e2e-missing"}),
            }
            assert all(r.status_code == 202 for r in jobs.values()), {k: r.text for k, r in jobs.items()}
            done = {k: wait_job(client, r.json()["id"], timeout=120) for k, r in jobs.items()}
    finally:
        worker.stop()
    expected = model_files(model_src)  # no pickle, nothing hidden
    for kind in ("s3", "hf", "ms"):
        job = done[kind]
        assert job["status"] == "succeeded" and job["progress"] == 100, job
        folder = Path(job["result"]["path"])
        assert folder == settings.store.models_dir / f"e2e-{kind}"
        assert model_files(folder) == expected and not (folder / "training_args.bin").exists()
        assert {f["name"]: f["sha256"] for f in job["result"]["files"]} == expected
    assert done["missing"]["status"] == "failed" and "no/such/prefix" in done["missing"]["error"], done["missing"]
    assert not (settings.store.models_dir / "e2e-missing").exists()
    with sync_sessions(settings)() as session:
        rows = session.execute(select(ModelArtifact).where(ModelArtifact.name.like("e2e-%"))).scalars().all()
    assert sorted((r.name, r.source) for r in rows) == [
        ("e2e-hf", "hf://acme/tiny"), ("e2e-ms", "modelscope://acme/tiny"), ("e2e-s3", f"s3://{BUCKET}/{PREFIX}")]
    assert all(r.sha256 == done[r.name.removeprefix("e2e-")]["result"]["sha256"] for r in rows)
