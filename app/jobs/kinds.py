"""The job kinds: each one's parameters (msgspec Structs, checked at submit before a row is written),
the service that does the work (imported lazily: the API process never loads torch for a pull), and
the side rows a success writes in the same transaction as the job's final status.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import BenchmarkRun, ModelArtifact, utcnow
from app.jobs.context import JobContext, JobError

Service = Callable[[dict[str, Any], JobContext], dict[str, Any]]
Recorder = Callable[[Session, uuid.UUID, dict[str, Any], dict[str, Any]], None]


class ParamsError(ValueError):
    """A submitted body that does not fit the kind: `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# ---- parameter schemas ---------------------------------------------------------------------------


class ModelPullParams(msgspec.Struct, forbid_unknown_fields=True):
    source: str
    name: str


class LoraConversionParams(msgspec.Struct, forbid_unknown_fields=True):
    source: str
    name: str
    to_format: str
    from_format: str | None = None  # None: detected from what lies at the source
    register: bool = False
    base_model: str | None = None  # a store model or folder: the layout NeMo / bare TensorRT-LLM files need
    dtype: str | None = None  # float16 | float32, for trtllm output


class EngineBuildParams(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    profile: str | dict[str, Any] = "native-bf16"
    name: str | None = None  # the output's store name; default <model>-<profile>


class BenchmarkParams(msgspec.Struct, forbid_unknown_fields=True):
    config: dict[str, Any]  # the performance tester's YAML mapping: server, test_params, prompts, output
    name: str | None = None


def _check_pull(p: ModelPullParams) -> None:
    from app.hub.sources.spec import check_model_name, parse_source

    _as_params_error(lambda: parse_source(p.source), "source")
    _as_params_error(lambda: check_model_name(p.name), "name")


def _check_conversion(p: LoraConversionParams) -> None:
    from app.adapters.lora_config import ADAPTER_NAME_PATTERN, ADAPTER_NAME_RULE

    import re

    if not p.source.strip():
        raise ParamsError("source: give the adapter's path (a folder or a .nemo archive)", "source")
    if not re.fullmatch(ADAPTER_NAME_PATTERN, p.name):
        raise ParamsError(f"name {p.name!r} is not a valid adapter name: {ADAPTER_NAME_RULE}", "name")
    try:
        from app.adapters.convert.detect import normalise_format
    except ImportError:  # the conversion package is optional; the worker then says what is missing
        return
    p.to_format = _as_params_error(lambda: normalise_format(p.to_format, "to_format"), "to_format") or ""
    if not p.to_format:
        raise ParamsError("to_format: name the format to convert into (peft, nemo or trtllm)", "to_format")
    p.from_format = _as_params_error(lambda: normalise_format(p.from_format, "from_format"), "from_format")
    if p.register and p.to_format != "peft":
        raise ParamsError(f"register: servers load PEFT adapters; convert to_format \"peft\" to register, or set "
                          f"register false to keep the {p.to_format} output in the store only", "register")  # fmt: skip


def _check_build(p: EngineBuildParams) -> None:
    from app.hub.build import parse_profile

    if not p.model.strip():
        raise ParamsError("model: name a model in the store, a model folder or a .gguf file", "model")
    _as_params_error(lambda: parse_profile(p.profile), "profile")
    if p.name is not None:
        from app.hub.sources.spec import check_model_name

        _as_params_error(lambda: check_model_name(p.name), "name")


def _check_benchmark(p: BenchmarkParams) -> None:
    from bench.serving.config_runner import options_from, settings_from_mapping
    from bench.serving.options import OptionError

    try:
        options_from(settings_from_mapping(p.config))
    except OptionError as exc:
        raise ParamsError(f"config: {exc}", "config") from None
    server = p.config.get("server") or {}
    if not isinstance(server, dict) or not server.get("url"):
        raise ParamsError("config.server.url: name the server to benchmark (http://host:port)", "config.server.url")


def _as_params_error(check: Callable[[], Any], param: str) -> Any:
    try:
        return check()
    except JobError as exc:
        raise ParamsError(str(exc), param) from None


# ---- services (lazy) -----------------------------------------------------------------------------


def _pull(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    from app.hub.sources.service import pull_model

    return pull_model(params, ctx)


def _convert(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    try:
        from app.adapters.convert.service import convert_lora
    except ImportError as exc:
        raise JobError(f"LoRA conversion is not available in this worker ({exc})") from exc
    return convert_lora(params, ctx)


def _build(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    from app.hub.build import build_engine

    return build_engine(params, ctx)


def _benchmark(params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    from app.jobs.benchmark import run_benchmark_job

    return run_benchmark_job(params, ctx)


# ---- side rows, written with the job's final status (upserts: a redelivery never duplicates) -----


def _record_artifact(session: Session, job_id: uuid.UUID, params: dict[str, Any], result: dict[str, Any]) -> None:
    name = os.path.basename(result["path"])
    row = session.execute(select(ModelArtifact).where(ModelArtifact.name == name)).scalar_one_or_none()
    if row is None:
        row = ModelArtifact(name=name)
        session.add(row)
    row.source = str(result.get("source") or params.get("source") or params.get("model") or "")
    row.path = result["path"]
    row.format = result.get("format") or "safetensors"
    row.dtype = result.get("dtype")
    row.sha256 = result.get("sha256")
    row.size_bytes = result.get("size_bytes")
    row.status = "ready"
    row.job_id = job_id


def _record_adapter(session: Session, job_id: uuid.UUID, params: dict[str, Any], result: dict[str, Any]) -> None:
    if not params.get("register"):
        return
    from app.adapters.registry import register_adapter_sync

    register_adapter_sync(
        session, name=params["name"], source=params["source"], format=result.get("format") or params["to_format"],
        path=result["path"], sha256=result.get("sha256"), rank=result.get("rank"),
        base_model=result.get("base_model"), desired=True, job_id=job_id,
    )  # fmt: skip


def _record_benchmark(session: Session, job_id: uuid.UUID, params: dict[str, Any], result: dict[str, Any]) -> None:
    row = session.execute(select(BenchmarkRun).where(BenchmarkRun.job_id == job_id)).scalar_one_or_none()
    if row is None:
        row = BenchmarkRun(job_id=job_id)
        session.add(row)
    server = params["config"].get("server") or {}
    row.name = params.get("name") or f"benchmark-{str(job_id)[:8]}"
    row.target = str(server.get("url"))
    row.model = server.get("model")
    row.config = params["config"]
    row.results = result.get("aggregate")
    row.output_dir = result.get("output_dir")
    row.status = "succeeded" if result.get("exit_code", 0) == 0 else "failed"
    row.finished_at = utcnow()


def _after_conversion(settings: Any, params: dict[str, Any], result: dict[str, Any]) -> None:
    if params.get("register"):
        from app.signals import publish_adapters_changed_sync

        publish_adapters_changed_sync(settings, f"adapter {params['name']} registered")


# ---- the table -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobKind:
    name: str  # the value in jobs.kind
    route: str  # POST /v1/jobs/<route>
    params: type[msgspec.Struct]
    check: Callable[[Any], None]
    run: Service
    record: Recorder | None = None
    after_commit: Callable[[Any, dict[str, Any], dict[str, Any]], None] | None = None


KINDS: dict[str, JobKind] = {
    k.name: k
    for k in (
        JobKind("model-pull", "model-pulls", ModelPullParams, _check_pull, _pull, _record_artifact),
        JobKind("lora-conversion", "lora-conversions", LoraConversionParams, _check_conversion, _convert,
                _record_adapter, _after_conversion),
        JobKind("engine-build", "engine-builds", EngineBuildParams, _check_build, _build, _record_artifact),
        JobKind("benchmark", "benchmarks", BenchmarkParams, _check_benchmark, _benchmark, _record_benchmark),
    )
}  # fmt: skip


def _load_extra_kinds() -> None:
    # MXEXT_EXTRA_JOB_KINDS="module:ATTR,...": more JobKinds (the tests' slow kind, to kill a worker mid-job).
    import importlib

    for item in filter(None, (os.environ.get("MXEXT_EXTRA_JOB_KINDS") or "").split(",")):
        module, _, attr = item.strip().partition(":")
        kind = getattr(importlib.import_module(module), attr)
        KINDS[kind.name] = kind


_load_extra_kinds()


def normalise(kind: str, params: msgspec.Struct) -> dict[str, Any]:
    """A decoded submission, checked: the params to store. ParamsError names the field."""
    spec = KINDS[kind]
    if not isinstance(params, spec.params):
        raise ParamsError(f"{kind} takes {spec.params.__name__}")
    spec.check(params)
    # Unset optional fields are left out, so the stored params read as the user wrote them.
    return {k: v for k, v in msgspec.to_builtins(params).items() if v is not None}
