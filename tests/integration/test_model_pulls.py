"""Model pulls end to end: a local folder, S3 on a moto server, and the HF and ModelScope caches
laid out on disk (offline), into a model store in tmp_path. No network is needed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.hub.sources.files import MANIFEST_NAME
from app.hub.sources.service import pull_model
from app.hub.store import ModelStore
from app.jobs.context import JobCancelled, JobContext, JobError, TransientJobError
from app.settings import ControlPlaneSettings, S3Settings, Settings, StoreSettings
from tests.engine.reference import make_random_model

BUCKET = "models"
PREFIX = "team/tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
KEYS = {"access_key": "testing", "secret_key": "testing"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_src(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama in HF layout, plus what a pull must leave behind: a pickle and a .git."""
    folder = make_random_model(tmp_path_factory.mktemp("src") / "tiny", smollm2_dir, arch="llama")
    (folder / "training_args.bin").write_bytes(b"\x80\x04not-to-be-copied")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return folder


def model_files(folder: Path) -> dict[str, str]:
    """name -> sha256 of what a pull of `folder` should deliver (no pickles, nothing hidden)."""
    return {p.name: sha256(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".bin"}


@pytest.fixture(scope="module")
def s3_endpoint(model_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on loopback with the tiny model under s3://models/team/tiny/."""
    from minio import Minio

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.1)
        client = Minio(f"127.0.0.1:{port}", secure=False, region="us-east-1", **KEYS)
        client.make_bucket(BUCKET)
        client.make_bucket("empty-bucket")
        for path in model_src.iterdir():
            if path.is_file():
                client.fput_object(BUCKET, f"{PREFIX}/{path.name}", str(path))
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def make_ctx(tmp_path: Path, s3_endpoint: str | None = None, cancel_after: int | None = None) -> tuple[JobContext, list[float]]:
    """A JobContext on a store in tmp_path that records progress; optionally cancelled after N reports."""
    s3 = S3Settings(endpoint=s3_endpoint, region="us-east-1", **KEYS)
    settings = Settings(store=StoreSettings(home=tmp_path / "home"), control=ControlPlaneSettings(s3=s3))
    reports: list[float] = []
    cancel = (lambda: False) if cancel_after is None else (lambda: len(reports) >= cancel_after)
    ctx = JobContext("job-1", settings, report_progress=reports.append, cancel_requested=cancel, min_report_interval_s=0.0)
    return ctx, reports


def store_entries(ctx: JobContext) -> list[str]:
    models_dir = ctx.settings.store.models_dir
    return sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []


def check_pulled(result: dict, ctx: JobContext, name: str, expected: dict[str, str], reports: list[float]) -> Path:
    """The model is in the store, resolvable, every file as expected, and the manifest says so."""
    final = ctx.settings.store.models_dir / name
    assert result["path"] == str(final)
    assert ModelStore(ctx.settings.store.home).resolve(name) == final
    assert {f["name"]: f["sha256"] for f in result["files"]} == expected
    assert {p.name: sha256(p) for p in final.iterdir() if p.name != MANIFEST_NAME} == expected
    assert result["size_bytes"] == sum(p.stat().st_size for p in final.iterdir() if p.name != MANIFEST_NAME)
    manifest = json.loads((final / MANIFEST_NAME).read_text())
    assert manifest["files"] == result["files"] and manifest["sha256"] == result["sha256"]
    assert manifest["source"] == result["source"] and manifest["pulled_at"]
    assert reports[-1] == 100.0 and reports == sorted(reports)
    assert store_entries(ctx) == [name]  # no staging folder left next to it
    return final


def test_local_folder_pull_loads_in_the_engine(model_src: Path, tmp_path: Path) -> None:
    ctx, reports = make_ctx(tmp_path)
    result = pull_model({"source": str(model_src), "name": "tiny"}, ctx)
    final = check_pulled(result, ctx, "tiny", model_files(model_src), reports)
    assert not (final / "training_args.bin").exists() and not (final / ".git").exists()

    from app.engine import LLM, SamplingParams

    llm = LLM(str(final), dtype="float32", max_model_len=256)
    out = llm.generate([[1, 5, 9, 42]], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 4


def test_file_url_pull(model_src: Path, tmp_path: Path) -> None:
    ctx, reports = make_ctx(tmp_path)
    result = pull_model({"source": f"file://{model_src}", "name": "tiny"}, ctx)
    check_pulled(result, ctx, "tiny", model_files(model_src), reports)
    assert result["source"] == str(model_src)


def test_s3_pull(model_src: Path, s3_endpoint: str, tmp_path: Path) -> None:
    ctx, reports = make_ctx(tmp_path, s3_endpoint)
    result = pull_model({"source": f"s3://{BUCKET}/{PREFIX}/", "name": "tiny-s3"}, ctx)
    check_pulled(result, ctx, "tiny-s3", model_files(model_src), reports)
    manifest = json.loads((Path(result["path"]) / MANIFEST_NAME).read_text())
    assert (manifest["bucket"], manifest["prefix"]) == (BUCKET, PREFIX)


def hf_cache(root: Path, repo: str, src: Path, published: dict[str, str] | None = None) -> Path:
    """huggingface_hub's cache layout: blobs by hash, a snapshot of links to them, refs/main, and
    the tree listing the library writes (with the LFS sha256 of the weights)."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    tree = {}
    for path in src.iterdir():
        if path.is_file():
            digest = sha256(path)
            shutil.copy(path, repo_dir / "blobs" / digest)
            (snapshot / path.name).symlink_to(Path("../../blobs") / digest)
            tree[path.name] = {"size": path.stat().st_size, "blob_id": digest[:40]}
            if path.suffix == ".safetensors":
                tree[path.name] |= {"lfs_sha256": (published or {}).get(path.name, digest), "lfs_size": path.stat().st_size}
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "trees").mkdir()
    (repo_dir / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    return repo_dir


@pytest.mark.parametrize("revision", ["", "@main", f"@{COMMIT}"])
def test_hf_pull_from_offline_cache(model_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, revision: str) -> None:
    hf_cache(tmp_path / "hf", "acme/tiny", model_src)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx, reports = make_ctx(tmp_path)
    result = pull_model({"source": f"hf://acme/tiny{revision}", "name": "tiny-hf"}, ctx)
    check_pulled(result, ctx, "tiny-hf", model_files(model_src), reports)
    manifest = json.loads((Path(result["path"]) / MANIFEST_NAME).read_text())
    assert manifest["commit"] == COMMIT


def test_hf_corrupt_cache_fails_the_checksum(model_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_cache(tmp_path / "hf", "acme/tiny", model_src, published={"model.safetensors": "0" * 64})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx, _ = make_ctx(tmp_path)
    with pytest.raises(JobError, match="model.safetensors: sha256 .* does not match the published 0000"):
        pull_model({"source": "hf://acme/tiny", "name": "tiny-hf"}, ctx)
    assert store_entries(ctx) == []


@pytest.mark.parametrize("layout", ["current", "legacy"])
def test_modelscope_pull_from_offline_cache(model_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    # The current layout (modelscope >= 1.38) and the older one the library still reuses.
    models = tmp_path / "ms" / "models"
    snapshot = models / "acme--tiny.v1" / "snapshots" / "master" if layout == "current" else models / "acme" / "tiny___v1"
    shutil.copytree(model_src, snapshot)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "1")
    ctx, reports = make_ctx(tmp_path)
    result = pull_model({"source": "modelscope://acme/tiny.v1", "name": "tiny-ms"}, ctx)
    check_pulled(result, ctx, "tiny-ms", model_files(model_src), reports)


def test_gguf_file_is_converted_on_pull(tmp_path: Path) -> None:
    import gguf

    from tests.unit.test_gguf_convert import tiny_model, write_gguf

    source = tmp_path / "tiny.Q8_0.gguf"
    write_gguf(tiny_model(), source, gguf.GGMLQuantizationType.Q8_0)
    ctx, reports = make_ctx(tmp_path)
    result = pull_model({"source": str(source), "name": "tiny-gguf"}, ctx)
    final = Path(result["path"])
    assert ModelStore(ctx.settings.store.home).resolve("tiny-gguf") == final
    assert {"config.json", "model.safetensors"} <= {f["name"] for f in result["files"]}
    assert not list(final.glob("*.gguf")) and reports[-1] == 100.0
    manifest = json.loads((final / MANIFEST_NAME).read_text())
    assert manifest["converted_from"] == {"name": source.name, "size": source.stat().st_size, "sha256": sha256(source)}
    assert {p.name: sha256(p) for p in final.iterdir() if p.name != MANIFEST_NAME} == {f["name"]: f["sha256"] for f in result["files"]}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_cancel_mid_pull_leaves_nothing(model_src: Path, s3_endpoint: str, tmp_path: Path, where: str) -> None:
    # Cancel once the first bytes are reported: the weights (~12 MB) are still being copied.
    ctx, reports = make_ctx(tmp_path, s3_endpoint, cancel_after=1)
    source = str(model_src) if where == "local" else f"s3://{BUCKET}/{PREFIX}"
    with pytest.raises(JobCancelled):
        pull_model({"source": source, "name": "tiny"}, ctx)
    assert 0 < reports[-1] < 100
    assert store_entries(ctx) == []


@pytest.fixture
def bad_inputs(model_src: Path, tmp_path: Path) -> dict[str, Path]:
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    shutil.copy(model_src / "config.json", pickles / "config.json")
    (pickles / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (pickles / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("hello")
    return {"pickles": pickles, "notes": notes}


@pytest.mark.parametrize(
    ("source", "name", "message"),
    [
        ("ftp://host/model", "m", r"unknown scheme 'ftp://'; supported: .*s3://bucket/prefix, hf://org/model"),
        ("/no/such/folder", "m", r"no such file or folder on the worker machine"),
        ("s3://", "m", r"name the bucket, like s3://bucket/prefix"),
        ("s3://no-such-bucket/x", "m", r"bucket 'no-such-bucket' does not exist"),
        (f"s3://{BUCKET}/no/such/prefix", "m", r"no objects under this prefix"),
        ("s3://empty-bucket", "m", r"no objects under this prefix"),
        ("hf://acme", "m", r"name a repository as hf://org/model"),
        ("hf://acme/missing", "m", r"not in the Hugging Face cache .* HF_HUB_OFFLINE is set"),
        ("modelscope://acme/missing", "m", r"MODELSCOPE_OFFLINE is set"),
        ("{pickles}", "m", r"only pickled weights \(optimizer.pt, pytorch_model.bin\); safetensors is needed"),
        ("{notes}", "m", r"is not a model: config.json not found"),
        ("{src}", "../evil", r"name '../evil': use 1-128 letters, digits"),
        ("{src}", "a/b", r"name 'a/b': use 1-128 letters"),
        ("{src}", "", r"name '': use 1-128 letters"),
        ("{src}", ".hidden", r"name '.hidden': use 1-128 letters"),
        ("{src}", "smollm2-135m-instruct", r"reserved for the built-in default model"),
    ],
)
def test_bad_inputs_fail_with_a_clear_error_and_leave_nothing(
    source: str, name: str, message: str, model_src: Path, s3_endpoint: str, bad_inputs: dict[str, Path],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "1")
    ctx, _ = make_ctx(tmp_path, s3_endpoint)
    source = source.format(src=model_src, **bad_inputs)
    with pytest.raises(JobError, match=message) as info:
        pull_model({"source": source, "name": name}, ctx)
    assert not isinstance(info.value, TransientJobError)
    assert store_entries(ctx) == []


def test_existing_target_is_refused_and_kept(model_src: Path, tmp_path: Path) -> None:
    ctx, _ = make_ctx(tmp_path)
    existing = ctx.settings.store.models_dir / "tiny"
    existing.mkdir(parents=True)
    (existing / "config.json").write_text("{}")
    with pytest.raises(JobError, match=r"name 'tiny': .* already exists; choose another name"):
        pull_model({"source": str(model_src), "name": "tiny"}, ctx)
    assert store_entries(ctx) == ["tiny"] and [p.name for p in existing.iterdir()] == ["config.json"]


def test_unreachable_s3_is_transient(tmp_path: Path) -> None:
    ctx, _ = make_ctx(tmp_path, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientJobError, match="could not reach S3 at .*; will retry"):
        pull_model({"source": f"s3://{BUCKET}/{PREFIX}", "name": "tiny"}, ctx)
    assert store_entries(ctx) == []



def test_redelivered_pull_completes_from_its_own_output(model_src: Path, tmp_path: Path) -> None:
    """A worker lost after the rename but before the row update: the redelivered attempt of the same
    job completes from the manifest instead of failing on its own output; another job still fails."""
    ctx, _ = make_ctx(tmp_path)
    first = pull_model({"source": str(model_src), "name": "redelivered"}, ctx)
    again = pull_model({"source": str(model_src), "name": "redelivered"}, ctx)
    assert again == first
    other, _ = make_ctx(tmp_path)
    other.job_id = "job-2"
    with pytest.raises(JobError, match="already exists"):
        pull_model({"source": str(model_src), "name": "redelivered"}, other)
