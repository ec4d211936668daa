"""The pure parts of model pulls: source and name parsing, file selection, checksums, env mapping."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pytest

from app.hub.sources.files import ByteProgress, SourceFile, copy_file, files_digest, select_model_files
from app.hub.sources.huggingface import hf_options
from app.hub.sources.modelscope import modelscope_options
from app.hub.sources.s3 import plain_md5
from app.hub.sources.spec import SourceSpec, check_model_name, parse_source
from app.jobs.context import JobContext, JobError, TransientJobError
from app.settings import Settings


def blob(name: str, data: bytes = b"x", sha256: str | None = None) -> SourceFile:
    @contextlib.contextmanager
    def read():
        yield iter([data[: len(data) // 2], data[len(data) // 2 :]])

    return SourceFile(name, len(data), read, sha256)


@pytest.mark.parametrize(
    ("source", "spec"),
    [
        ("/models/x", SourceSpec("local", "/models/x")),
        ("file:///models/x%20y", SourceSpec("local", "/models/x y")),
        ("s3://bucket/a/b/", SourceSpec("s3", "bucket/a/b")),
        ("S3://bucket", SourceSpec("s3", "bucket")),
        ("hf://org/model", SourceSpec("hf", "org/model")),
        ("hf://org/model@v1.0", SourceSpec("hf", "org/model", "v1.0")),
        ("modelscope://Qwen/Qwen2.5-0.5B-Instruct@master", SourceSpec("modelscope", "Qwen/Qwen2.5-0.5B-Instruct", "master")),
    ],
)
def test_parse_source(source: str, spec: SourceSpec) -> None:
    assert parse_source(source) == spec


def test_s3_spec_splits_bucket_and_prefix() -> None:
    spec = parse_source("s3://bucket/a/b")
    assert (spec.bucket, spec.prefix, str(spec)) == ("bucket", "a/b", "s3://bucket/a/b")
    assert parse_source("s3://bucket").prefix == ""


def test_relative_local_path_is_made_absolute() -> None:
    assert parse_source("models/x") == SourceSpec("local", str(Path.cwd() / "models/x"))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "source: give one of"),
        (None, "source: give one of"),
        ("gs://b/p", "unknown scheme 'gs://'"),
        ("file://host/x", "must name a path on this machine"),
        ("hf://org/model@", "nothing after '@'"),
        ("hf://org/a/b", "hf://org/model"),
        ("modelscope://model", "modelscope://org/model"),
    ],
)
def test_bad_sources(source: object, message: str) -> None:
    with pytest.raises(JobError, match=message):
        parse_source(source)


@pytest.mark.parametrize("name", ["tiny", "Qwen2.5-0.5B_instruct", "a" * 128])
def test_good_names(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", ".x", "..", "a/b", "a\\b", "a b", "-x", "a" * 129, None, 3])
def test_bad_names(name: object) -> None:
    with pytest.raises(JobError, match="letters, digits"):
        check_model_name(name)


def test_selection_leaves_pickles_and_hidden_files_behind() -> None:
    files = [blob(n) for n in ("config.json", "model.safetensors", "pytorch_model.bin", "x.pth", ".git/HEAD", "tok.json", "q.gguf")]
    assert sorted(f.name for f in select_model_files(files, "src").files) == ["config.json", "model.safetensors", "tok.json"]


def test_selection_of_a_single_gguf() -> None:
    selection = select_model_files([blob("README.md"), blob("m.Q4_0.gguf")], "src")
    assert selection.gguf is not None and [f.name for f in selection.files] == ["m.Q4_0.gguf"]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["config.json", "pytorch_model.bin"], r"only pickled weights \(pytorch_model.bin\); safetensors is needed"),
        (["config.json", "model.ckpt", "w.pkl"], r"only pickled weights \(model.ckpt, w.pkl\)"),
        (["a.gguf", "b.gguf"], "several .gguf files"),
        (["model.safetensors"], "config.json not found"),
        (["config.json"], r"\*.safetensors weights not found"),
        (["config.json", "sub/model.safetensors"], r"\*.safetensors weights not found"),
    ],
)
def test_selection_refusals(names: list[str], message: str) -> None:
    with pytest.raises(JobError, match=message):
        select_model_files([blob(n) for n in names], "src")


def ctx() -> JobContext:
    return JobContext("j", Settings())


def test_copy_file_hashes_and_verifies(tmp_path: Path) -> None:
    data = b"weights" * 1000
    digest = hashlib.sha256(data).hexdigest()
    entry = copy_file(blob("sub/w.safetensors", data, digest), tmp_path, ctx(), ByteProgress(ctx(), len(data)), "src")
    assert entry == {"name": "sub/w.safetensors", "size": len(data), "sha256": digest}
    assert (tmp_path / "sub" / "w.safetensors").read_bytes() == data


def test_copy_file_refuses_a_wrong_checksum_and_a_short_read(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="does not match the published"):
        copy_file(blob("w", b"abc", "0" * 64), tmp_path, ctx(), ByteProgress(ctx(), 3), "src")
    short = SourceFile("w", 10, blob("w", b"abc").read)
    with pytest.raises(TransientJobError, match="got 3 bytes, the source listed 10"):
        copy_file(short, tmp_path, ctx(), ByteProgress(ctx(), 10), "src")


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/../../x"])
def test_copy_file_stays_inside_the_model_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(JobError, match="outside the model folder"):
        copy_file(blob(name), tmp_path / "m", ctx(), ByteProgress(ctx(), 1), "src")
    assert not (tmp_path / "x").exists()


def test_files_digest_is_order_independent_and_content_sensitive() -> None:
    a, b = {"name": "a", "size": 1, "sha256": "11"}, {"name": "b", "size": 2, "sha256": "22"}
    assert files_digest([a, b]) == files_digest([b, a])
    assert files_digest([a, b]) != files_digest([a, {**b, "sha256": "23"}])


@pytest.mark.parametrize(
    ("etag", "headers", "md5"),
    [
        ('"9E107D9D372BB6826BD81D3542A419D6"', {}, "9e107d9d372bb6826bd81d3542a419d6"),
        ("9e107d9d372bb6826bd81d3542a419d6-3", {}, None),  # multipart
        ("9e107d9d372bb6826bd81d3542a419d6", {"x-amz-server-side-encryption": "aws:kms"}, None),
        ("9e107d9d372bb6826bd81d3542a419d6", {"x-amz-server-side-encryption-customer-algorithm": "AES256"}, None),
        (None, {}, None),
    ],
)
def test_plain_md5(etag: str | None, headers: dict, md5: str | None) -> None:
    assert plain_md5(etag, headers) == md5


def test_hf_options_follow_the_library_precedence(tmp_path: Path) -> None:
    assert hf_options({"HF_HOME": str(tmp_path)})["cache_dir"] == str(tmp_path / "hub")
    env = {"HF_HOME": "/x", "HF_HUB_CACHE": str(tmp_path / "c"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://m", "HF_TOKEN": "t"}
    assert hf_options(env) == {"cache_dir": str(tmp_path / "c"), "local_files_only": True, "endpoint": "http://m", "token": "t"}
    assert hf_options({"TRANSFORMERS_OFFLINE": "yes"})["local_files_only"] is True
    assert hf_options({})["local_files_only"] is False and hf_options({})["token"] is None


def test_modelscope_options(tmp_path: Path) -> None:
    env = {"MODELSCOPE_CACHE": str(tmp_path), "MODELSCOPE_OFFLINE": "true", "MODELSCOPE_API_TOKEN": "t"}
    assert modelscope_options(env) == {"cache_dir": str(tmp_path), "local_files_only": True, "endpoint": None, "token": "t"}
    assert modelscope_options({}) == {"cache_dir": None, "local_files_only": False, "endpoint": None, "token": None}
