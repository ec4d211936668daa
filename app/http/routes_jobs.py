"""The REST job API: submit (202 + the job), list, get, cancel.

Submissions are checked before any row is written (a bad body is a 400 naming the field); the row
is then created (an `Idempotency-Key` header returns the job it already made for the same request)
and handed to the dispatcher (Celery, or the embedded runner). The admin key, when configured,
guards every route here (app.http.auth).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody

from app.db.models import JOB_KINDS, JOB_STATUSES
from app.http.control import ControlPlane
from app.http.errors import APIError, bad_request
from app.http.schemas import ErrorResponse
from app.jobs import kinds, store
from app.jobs.kinds import BenchmarkParams, EngineBuildParams, LoraConversionParams, ModelPullParams

RESPONSES = {
    400: ResponseSpec(ErrorResponse, description="A bad body or query; the message names the field"),
    401: ResponseSpec(ErrorResponse, description="Missing or wrong key"),
    404: ResponseSpec(ErrorResponse, description="No such job"),
    409: ResponseSpec(ErrorResponse, description="Idempotency-Key reused with other parameters, or the job already finished"),
    503: ResponseSpec(ErrorResponse, description="The control plane (database or broker) is unavailable"),
}
MAX_KEY_LENGTH = 255


def _control(request: Request) -> ControlPlane:
    return request.app.state.control


async def _submit(request: Request, kind: str, data: Any) -> Response[dict[str, Any]]:
    control = _control(request)
    sessions = control.require_sessions()
    if control.jobs is None:
        raise APIError(503, "no job runner is configured in this server", code="control_plane_unavailable")
    try:
        params = kinds.normalise(kind, data)
    except kinds.ParamsError as exc:
        raise bad_request(str(exc), param=exc.param) from None
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key.strip()) <= MAX_KEY_LENGTH):
        raise bad_request(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} characters", param="Idempotency-Key")
    try:
        job, created = await control.create_job(store.NewJob(kind, params, key.strip() if key else None))
    except store.JobConflict as exc:
        raise APIError(409, str(exc), code="idempotency_key_reused") from None
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    else:
        from app.jobs.dispatch import EnqueueError

        try:
            await control.jobs.submit(job.id)
        except EnqueueError as exc:
            await store.fail_unqueued(sessions, job.id, str(exc))
            raise APIError(503, f"job {job.id} was not started: {exc}", code="broker_unavailable") from None
    return Response(store.job_json(job), status_code=202, headers=headers)


@post("/v1/jobs/model-pulls", summary="Pull a model (local path, s3://, hf://, modelscope://) into the store",
      status_code=202, responses=RESPONSES)  # fmt: skip
async def submit_model_pull(request: Request, data: JSONBody[ModelPullParams]) -> Response[dict[str, Any]]:
    return await _submit(request, "model-pull", data)


@post("/v1/jobs/lora-conversions", summary="Convert a LoRA adapter between PEFT, NeMo and TensorRT-LLM",
      status_code=202, responses=RESPONSES)  # fmt: skip
async def submit_lora_conversion(request: Request, data: JSONBody[LoraConversionParams]) -> Response[dict[str, Any]]:
    return await _submit(request, "lora-conversion", data)


@post("/v1/jobs/engine-builds", summary="Build a model for an engine profile (native-bf16, trtllm-fp16, ...)",
      status_code=202, responses=RESPONSES)  # fmt: skip
async def submit_engine_build(request: Request, data: JSONBody[EngineBuildParams]) -> Response[dict[str, Any]]:
    return await _submit(request, "engine-build", data)


@post("/v1/jobs/benchmarks", summary="Run the performance tester against a server; results in BenchmarkRun",
      status_code=202, responses=RESPONSES)  # fmt: skip
async def submit_benchmark(request: Request, data: JSONBody[BenchmarkParams]) -> Response[dict[str, Any]]:
    return await _submit(request, "benchmark", data)


@get("/v1/jobs", summary="Jobs, newest first (filter by kind and status; page with after= or offset=)", responses=RESPONSES)
async def list_jobs(
    request: Request,
    kind: FromQuery[str | None] = None,
    status: FromQuery[str | None] = None,
    limit: FromQuery[int] = 20,
    after: FromQuery[str | None] = None,
    offset: FromQuery[int] = 0,
) -> dict[str, Any]:
    sessions = _control(request).require_sessions()
    if kind is not None and kind not in JOB_KINDS:
        raise bad_request(f"kind {kind!r}: use one of {', '.join(JOB_KINDS)}", param="kind")
    if status is not None and status not in JOB_STATUSES:
        raise bad_request(f"status {status!r}: use one of {', '.join(JOB_STATUSES)}", param="status")
    if not 1 <= limit <= store.MAX_PAGE:
        raise bad_request(f"limit must be between 1 and {store.MAX_PAGE}, got {limit}", param="limit")
    if offset < 0:
        raise bad_request(f"offset must not be negative, got {offset}", param="offset")
    try:
        jobs, has_more = await store.list_jobs(sessions, kind=kind, status=status, limit=limit, after=after, offset=offset)
    except store.JobNotFound as exc:
        raise bad_request(str(exc), param="after") from None
    data = [store.job_json(job) for job in jobs]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}  # fmt: skip


@get("/v1/jobs/{job_id:str}", summary="One job", responses=RESPONSES)
async def get_job(request: Request, job_id: FromPath[str]) -> dict[str, Any]:
    try:
        return store.job_json(await _control(request).get_job(job_id))
    except store.JobNotFound as exc:
        raise APIError(404, str(exc), param="job_id", code="job_not_found") from None


@post("/v1/jobs/{job_id:str}/cancel", summary="Cancel a job (queued: at once; running: at its next check)",
      status_code=200, responses=RESPONSES)  # fmt: skip
async def cancel_job(request: Request, job_id: FromPath[str]) -> dict[str, Any]:
    sessions = _control(request).require_sessions()
    try:
        return store.job_json(await store.request_cancel(sessions, job_id))
    except store.JobNotFound as exc:
        raise APIError(404, str(exc), param="job_id", code="job_not_found") from None
    except store.JobConflict as exc:
        raise APIError(409, str(exc), code="job_finished") from None


ROUTES = [submit_model_pull, submit_lora_conversion, submit_engine_build, submit_benchmark, list_jobs, get_job, cancel_job]
