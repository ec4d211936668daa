"""A job redelivered after its worker renamed the output into place but before the job row said so
(acks_late): LoRA conversions and native engine builds complete from their own output, with the
same result and their side rows written once; an output of that name that another job (or no job)
wrote is refused and left as it was; a staging folder left by a killed worker never counts as done.

The runner's path runs on a migrated SQLite database (the embedded mode); the last test kills a
real `mxext worker` between the rename and the row update on Postgres + Redis."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from sqlalchemy import select, update

from app.adapters.convert import convert_lora
from app.db.migrate import upgrade
from app.db.models import Job, LoraAdapter, ModelArtifact, utcnow
from app.db.session import sync_sessions
from app.jobs import store
from app.jobs.celery_config import TASK_NAME, make_celery
from app.jobs.context import JobContext, JobError, staging_path
from app.jobs.kinds import KINDS
from app.jobs.outputs import MANIFEST_NAME
from app.jobs.runner import run_job
from app.settings import LoraSettings, Settings, StoreSettings, get_settings
from tests.integration.jobs_support import WorkerProcess, job_settings, make_model_folder
from tests.lora_folders import make_gqa_lora

CASES = ("conversion", "registered conversion", "native build")


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    # The registry checks a registered folder against the process settings (allowed roots, rank limit).
    monkeypatch.setenv("MXEXT_HOME", str(tmp_path / "store"))
    get_settings.cache_clear()
    s = Settings(store=StoreSettings(home=tmp_path / "store"), lora=LoraSettings(roots=(tmp_path / "src",)))
    upgrade(s)
    yield s
    get_settings.cache_clear()


@pytest.fixture
def sources(tmp_path, settings) -> dict[str, Path]:
    """A PEFT adapter, its base model's config, a TensorRT-LLM copy of the adapter, a model folder."""
    src = tmp_path / "src"
    peft, base = make_gqa_lora(src)
    found = {"peft": peft, "base": base, "model": make_model_folder(src / "model")}
    trt = convert_lora({"source": str(found["peft"]), "name": "as-trt", "to_format": "trtllm"}, JobContext("setup", settings))
    found["trtllm"] = Path(shutil.move(trt["path"], src / "trtllm"))
    return found


def job_params(case: str, sources: dict[str, Path]) -> tuple[str, dict[str, Any]]:
    """(kind, params) of one case's job."""
    if case == "conversion":
        return "lora-conversion", {"source": str(sources["peft"]), "name": "conv", "to_format": "nemo",
                                   "base_model": str(sources["base"])}  # fmt: skip
    if case == "registered conversion":
        return "lora-conversion", {"source": str(sources["trtllm"]), "name": "reg", "to_format": "peft", "register": True}
    return "engine-build", {"model": str(sources["model"]), "profile": "native-fp32", "name": "built"}


def output_root(settings: Settings, kind: str) -> Path:
    return settings.store.adapters_dir if kind == "lora-conversion" else settings.store.models_dir


def new_job(settings: Settings, kind: str, params: dict[str, Any]) -> uuid.UUID:
    job_id = uuid.uuid4()
    with sync_sessions(settings).begin() as session:
        session.add(Job(id=job_id, kind=kind, status="queued", params=params))
    return job_id


def lost_attempt(settings: Settings, job_id: uuid.UUID) -> dict[str, Any]:
    """Attempt 1 as a worker runs it, up to the rename, then the worker dies: claimed, the service's
    work done and renamed into place, the row never finished."""
    claim = store.claim(sync_sessions(settings), job_id, "lost-worker")
    assert claim is not None and claim.attempt == 1
    result = KINDS[claim.kind].run(claim.params, JobContext(str(job_id), settings))
    went_silent(settings, job_id)
    return result


def went_silent(settings: Settings, job_id: uuid.UUID, **values: Any) -> None:
    """The row as a lost worker leaves it: no write since long ago (a claim takes a running job over
    only once its attempt has gone quiet), plus `values`."""
    with sync_sessions(settings).begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() - dt.timedelta(hours=1), **values))


def job_row(settings: Settings, job_id: uuid.UUID) -> Job:
    with sync_sessions(settings)() as session:
        return session.get(Job, job_id)


def side_rows(settings: Settings, kind: str, name: str) -> list[Any]:
    model = LoraAdapter if kind == "lora-conversion" else ModelArtifact
    with sync_sessions(settings)() as session:
        return list(session.execute(select(model).where(model.name == name)).scalars())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def as_stored(result: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(result))


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("lora-conversion", {"name": "to-peft", "to_format": "peft", "source": "trtllm"}),
        ("lora-conversion", {"name": "to-nemo", "to_format": "nemo", "source": "peft", "base_model": "base"}),
        ("lora-conversion", {"name": "to-trt", "to_format": "trtllm", "source": "peft", "dtype": "float16"}),
        ("engine-build", {"model": "model", "profile": "native-bf16"}),
    ],
)
def test_the_same_job_run_twice_returns_the_same_result(settings, sources, kind, params):
    params = {k: str(sources[v]) if k in ("source", "base_model", "model") else v for k, v in params.items()}
    ctx = JobContext("job-a", settings)
    first = KINDS[kind].run(params, ctx)
    before = snapshot(Path(first["path"]))
    again = KINDS[kind].run(params, ctx)
    assert again == first
    assert snapshot(Path(first["path"])) == before
    assert json.loads(before[MANIFEST_NAME])["job_id"] == "job-a"
    assert sorted(p.name for p in output_root(settings, kind).iterdir()) == [Path(first["path"]).name]


@pytest.mark.parametrize("case", CASES)
def test_a_redelivered_job_completes_from_its_output_and_records_once(settings, sources, case):
    kind, params = job_params(case, sources)
    job_id = new_job(settings, kind, params)
    first = lost_attempt(settings, job_id)
    assert side_rows(settings, kind, params["name"]) == []

    assert run_job(job_id, settings, worker="second") == "succeeded"  # the redelivered task
    job = job_row(settings, job_id)
    assert (job.status, job.attempts, job.error, job.result) == ("succeeded", 2, None, as_stored(first))
    rows = side_rows(settings, kind, params["name"])
    if case == "conversion":
        assert rows == []  # nothing to register
    else:
        assert len(rows) == 1 and rows[0].job_id == job_id and rows[0].sha256 == first["sha256"]
        assert rows[0].path == first["path"]
    if case == "registered conversion":
        assert (rows[0].version, rows[0].desired, rows[0].status) == (1, True, "ready")

    # Once more, with the row put back to running as if that finish had been lost too.
    went_silent(settings, job_id, status="running", result=None, finished_at=None)
    assert run_job(job_id, settings, worker="third") == "succeeded"
    job = job_row(settings, job_id)
    assert (job.status, job.attempts, job.result) == ("succeeded", 3, as_stored(first))
    again = side_rows(settings, kind, params["name"])
    assert len(again) == len(rows) and all(a.id == r.id and a.sha256 == r.sha256 for a, r in zip(again, rows))
    if case == "registered conversion":
        assert again[0].version == 1  # the same weights: replicas are not told to reload
    assert sorted(p.name for p in output_root(settings, kind).iterdir()) == [params["name"]]  # no copy, no staging


@pytest.mark.parametrize("case", CASES)
def test_a_name_another_job_wrote_fails_the_job_and_keeps_the_output(settings, sources, case):
    kind, params = job_params(case, sources)
    owner = new_job(settings, kind, params)
    assert run_job(owner, settings) == "succeeded"
    final = output_root(settings, kind) / params["name"]
    before, rows = snapshot(final), side_rows(settings, kind, params["name"])

    other = new_job(settings, kind, params)
    assert run_job(other, settings) == "failed"
    error = job_row(settings, other).error
    assert f"name {params['name']!r}: {final} already exists; choose another name, such as '{params['name']}-2'" in error
    assert f"job {owner} wrote it" in error
    assert snapshot(final) == before
    after = side_rows(settings, kind, params["name"])
    assert [(r.id, r.job_id, r.sha256) for r in after] == [(r.id, r.job_id, r.sha256) for r in rows]
    assert sorted(p.name for p in output_root(settings, kind).iterdir()) == [params["name"]]


@pytest.mark.parametrize("case", CASES)
def test_a_name_no_job_wrote_is_refused(settings, sources, case):
    kind, params = job_params(case, sources)
    final = output_root(settings, kind) / params["name"]
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final.parent / f"{params['name']}-2").mkdir()  # taken too: not suggested
    needle = f"already exists; choose another name, such as '{params['name']}-3', or remove it first (it has no " \
             f"{MANIFEST_NAME} naming the job that wrote it)"
    with pytest.raises(JobError, match=re.escape(needle)):
        KINDS[kind].run(params, JobContext("job-b", settings))
    assert snapshot(final) == {"config.json": b"{}"}


@pytest.mark.parametrize("case", CASES)
def test_a_staging_folder_left_by_a_killed_worker_never_counts_as_done(settings, sources, case):
    """Killed before the rename (even after its manifest was written): the redelivery writes the
    output again from the start, and nothing of the half-written folder is left."""
    kind, params = job_params(case, sources)
    job_id = new_job(settings, kind, params)
    first = lost_attempt(settings, job_id)
    final = Path(first["path"])
    staging = staging_path(final, str(job_id))
    final.rename(staging)
    cut = max((p for p in staging.iterdir() if p.name != MANIFEST_NAME), key=lambda p: p.stat().st_size)
    cut.write_bytes(cut.read_bytes()[:100])

    assert run_job(job_id, settings) == "succeeded"
    job = job_row(settings, job_id)
    assert job.attempts == 2 and not staging.exists()
    assert sorted(p.name for p in output_root(settings, kind).iterdir()) == [params["name"]]
    assert (final / cut.name).stat().st_size > 100  # written again, in full
    if kind == "lora-conversion":
        assert job.result["files"] == first["files"]
    else:
        assert job.result == as_stored(first)  # a build of the same inputs is the same bytes
        with safe_open(str(final / "model.safetensors"), framework="pt") as fh:
            assert str(fh.get_tensor("model.norm.weight").dtype) == "torch.float32"


# ---- the real thing: a worker killed between the rename and the row update ---------------------

_HOLD_FINISH = """
CREATE FUNCTION hold_first_finish() RETURNS trigger AS $$
BEGIN PERFORM pg_sleep(120); RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE TRIGGER hold_first_finish BEFORE UPDATE ON jobs FOR EACH ROW
WHEN (NEW.status = 'succeeded' AND NEW.attempts = 1) EXECUTE FUNCTION hold_first_finish();
"""


def test_a_worker_killed_after_the_rename_leaves_a_job_the_next_worker_completes(
    new_postgres_database, redis_url, tmp_path
):
    """A trigger on this test's own database holds the first attempt's finish (the UPDATE that marks
    the job succeeded, after the output was renamed into place) until the worker is SIGKILLed. The
    task comes back to a second worker, which completes the job from that output and registers
    the adapter once."""
    import psycopg

    database_url = new_postgres_database()
    src = tmp_path / "src"
    settings = job_settings(tmp_path / "store", database_url, redis_url)
    settings = dataclasses.replace(settings, lora=LoraSettings(roots=(src,)))
    peft, base = make_gqa_lora(src)
    found = {"peft": peft, "base": base}
    params = {"source": str(found["peft"]), "name": f"killed-{uuid.uuid4().hex[:6]}", "to_format": "nemo",
              "base_model": str(found["base"])}  # fmt: skip
    nemo = KINDS["lora-conversion"].run(params, JobContext("setup", settings))  # a NeMo source to register from
    source = Path(shutil.move(nemo["path"], src / "nemo"))
    params = {"source": str(source), "name": params["name"], "to_format": "peft", "register": True}
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_HOLD_FINISH)

    workers = []
    try:
        env = {"VLLM_MXEXT_LORA_ROOTS": str(src), "MXEXT_JOB_HEARTBEAT": "0.5"}
        workers.append(WorkerProcess(settings, tmp_path / "first.log", name="first", visibility_timeout=3,
                                     extra_env=env))  # fmt: skip
        workers[0].wait_ready()
        job_id = new_job(settings, "lora-conversion", params)
        celery = make_celery(settings)
        celery.send_task(TASK_NAME, args=[str(job_id)])
        celery.close()
        final = settings.store.adapters_dir / params["name"]
        with psycopg.connect(database_url, autocommit=True) as conn:
            held = _wait(lambda: conn.execute("SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep' "
                                              "AND datname = current_database()").fetchall())
            assert final.is_dir() and job_row(settings, job_id).status == "running"  # renamed, not recorded
            workers[0].kill()
            for (pid,) in held:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        went_silent(settings, job_id)  # its heartbeat stale at once, rather than waited for
        first_manifest = json.loads((final / MANIFEST_NAME).read_text())
        assert first_manifest["job_id"] == str(job_id)

        workers.append(WorkerProcess(settings, tmp_path / "second.log", name="second", visibility_timeout=3,
                                     extra_env=env))  # fmt: skip
        workers[1].wait_ready()
        job = _wait(lambda: (j := job_row(settings, job_id)).status in ("succeeded", "failed", "cancelled") and j, 90)
        assert (job.status, job.attempts, job.error) == ("succeeded", 2, None), workers[1].log()
        assert job.worker.startswith("second@") and job.result["path"] == str(final)
        rows = side_rows(settings, "lora-conversion", params["name"])
        assert len(rows) == 1 and (rows[0].job_id, rows[0].version, rows[0].sha256) == (job_id, 1, job.result["sha256"])
        assert json.loads((final / MANIFEST_NAME).read_text()) == first_manifest  # completed from, not rewritten
        assert "completing from its manifest" in workers[1].log()
        assert sorted(p.name for p in settings.store.adapters_dir.iterdir()) == [params["name"]]
    finally:
        for worker in workers:
            worker.stop()


def _wait(probe, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value
