"""`/v1/adapters`: the fleet's adapter registry (admin). Every replica serves what it says.

* `GET /v1/adapters` — every registered adapter and the replicas that report it.
* `POST /v1/adapters` `{name, path, format?="peft", desired?=true, source?}` — register (or
  re-register: other weights bump the version): validated before anything is written; 201 when new,
  200 when it updated an existing name.
* `GET /v1/adapters/{name}` — one adapter.
* `PATCH /v1/adapters/{name}` `{desired}` — serve it everywhere, or stop serving it.
* `POST /v1/adapters/{name}/retire` — stop serving it everywhere and mark it retired.

Each write commits, then publishes an `adapters-changed` hint; replicas converge on the hint or, if
it is lost, on their reconcile timer. `POST /v1/load_lora_adapter` stays a local, immediate action
on one replica. The admin key, when set, guards these routes (app.http.auth).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Annotated

from litestar import Request, Response, get, patch, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody
from msgspec import Meta, Struct
from sqlalchemy.exc import DBAPIError, IntegrityError

from app.adapters import registry
from app.adapters.registry import AdapterNotFoundError, AdapterRecord, AdapterRegistrationError, AdapterStateError
from app.db.models import ReplicaAdapter
from app.http.control import ControlPlane
from app.http.errors import APIError, bad_request
from app.http.schemas import ErrorResponse
from app.http.state import ServerState
from app.signals import ADAPTERS_CHANGED, make_signal

logger = logging.getLogger("app.http")

RESPONSES = {
    400: ResponseSpec(ErrorResponse, description="A bad name, path or adapter (the message says what to change)"),
    401: ResponseSpec(ErrorResponse, description="Missing or wrong key"),
    403: ResponseSpec(ErrorResponse, description="The admin key is needed"),
    404: ResponseSpec(ErrorResponse, description="No adapter of that name is registered"),
    409: ResponseSpec(ErrorResponse, description="The adapter cannot make that move (e.g. it failed)"),
    503: ResponseSpec(ErrorResponse, description="The control-plane database is unavailable"),
}


class RegisterAdapterRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    path: Annotated[str, Meta(min_length=1, max_length=4096, description="The adapter folder (in the allowed roots)")]
    format: str = "peft"
    desired: bool = True
    source: Annotated[str, Meta(max_length=4096)] | None = None  # where it came from (default: path)


class DesireAdapterRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    desired: bool


class ReplicaServing(Struct):
    replica_id: str
    version: int
    status: str  # "serving" | "failed"
    current: bool  # serves the registry's current version
    error: str | None
    loaded_at: dt.datetime
    reported_at: dt.datetime


class FleetAdapter(Struct):
    name: str
    path: str
    format: str
    source: str
    sha256: str | None
    rank: int | None
    base_model: str | None
    status: str  # pending | ready | failed | retired
    desired: bool
    version: int
    job_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    served_by: list[str]  # replicas that serve the current version
    replicas: list[ReplicaServing]
    object: str = "fleet_adapter"


class FleetAdapterList(Struct):
    data: list[FleetAdapter]
    object: str = "list"


def _replica(row: ReplicaAdapter, version: int) -> ReplicaServing:
    status = "failed" if row.error else "serving"
    return ReplicaServing(row.replica_id, row.version, status, status == "serving" and row.version == version,
                          row.error, row.loaded_at, row.reported_at)  # fmt: skip


def fleet_adapter(record: AdapterRecord) -> FleetAdapter:
    row = record.adapter
    replicas = [_replica(replica, row.version) for replica in record.replicas]
    return FleetAdapter(
        name=row.name, path=row.path, format=row.format, source=row.source, sha256=row.sha256, rank=row.rank,
        base_model=row.base_model, status=row.status, desired=row.desired, version=row.version,
        job_id=str(row.job_id) if row.job_id else None, created_at=row.created_at, updated_at=row.updated_at,
        served_by=[r.replica_id for r in replicas if r.current], replicas=replicas,
    )  # fmt: skip


def _control(request: Request) -> ControlPlane:
    return request.app.state.control


async def _notify(control: ControlPlane, reason: str) -> None:
    if control.bus is not None:
        await control.bus.publish(make_signal(ADAPTERS_CHANGED, reason))


def _translate(exc: Exception) -> APIError:
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc), param="name", code="adapter_not_found")
    if isinstance(exc, AdapterStateError):
        return APIError(409, str(exc), param="name", code="adapter_not_ready")
    if isinstance(exc, DBAPIError):
        logger.warning("control-plane database error: %s", exc)
        return APIError(503, "the control-plane database is unreachable; retry shortly",
                        code="control_plane_unavailable", headers={"Retry-After": "5"})  # fmt: skip
    raise exc


@get("/v1/adapters", summary="The fleet's adapters and the replicas that serve each", responses=RESPONSES)
async def list_fleet_adapters(request: Request) -> FleetAdapterList:
    try:
        async with _control(request).require_sessions()() as session:
            records = await registry.list_adapters(session)
    except DBAPIError as exc:
        raise _translate(exc) from None
    return FleetAdapterList(data=[fleet_adapter(record) for record in records])


@get("/v1/adapters/{name:str}", summary="One adapter of the fleet", responses=RESPONSES)
async def get_fleet_adapter(request: Request, name: FromPath[str]) -> FleetAdapter:
    try:
        async with _control(request).require_sessions()() as session:
            return fleet_adapter(await registry.get_adapter(session, name))
    except (AdapterNotFoundError, DBAPIError) as exc:
        raise _translate(exc) from None


@post("/v1/adapters", summary="Register an adapter for the whole fleet (validated first)", responses=RESPONSES)
async def register_fleet_adapter(request: Request, data: JSONBody[RegisterAdapterRequest]) -> Response[FleetAdapter]:
    state: ServerState = request.app.state.server
    control = _control(request)
    sessions = control.require_sessions()
    try:
        registry.check_adapter_name(data.name)
    except AdapterRegistrationError as exc:
        raise bad_request(str(exc), param=exc.param) from None
    if state.is_base(data.name):
        raise bad_request(f"name {data.name!r} is the base model's name; choose another", param="name")
    try:
        facts = await asyncio.to_thread(registry.inspect_adapter, data.path, state.lora.roots, format=data.format,
                                        max_rank=state.lora.settings.max_lora_rank)  # fmt: skip
    except AdapterRegistrationError as exc:
        raise bad_request(str(exc), param=exc.param) from None
    for attempt in (1, 2):  # a concurrent first registration of the same name wins the insert
        try:
            async with sessions() as session:
                row, created = await registry.register_adapter(
                    session, name=data.name, facts=facts, source=data.source or data.path, format=data.format,
                    desired=data.desired,
                )  # fmt: skip
                await session.commit()
                record = await registry.get_adapter(session, data.name)
            break
        except IntegrityError:
            if attempt == 2:
                raise
        except DBAPIError as exc:
            raise _translate(exc) from None
    logger.info("adapter %s registered (v%d, desired=%s) from %s", row.name, row.version, row.desired, row.path)
    await _notify(control, f"registered {row.name} v{row.version}")
    return Response(fleet_adapter(record), status_code=201 if created else 200)


@patch("/v1/adapters/{name:str}", summary="Serve an adapter across the fleet, or stop serving it", responses=RESPONSES)
async def desire_fleet_adapter(
    request: Request, name: FromPath[str], data: JSONBody[DesireAdapterRequest]
) -> FleetAdapter:
    control = _control(request)
    try:
        async with control.require_sessions()() as session:
            await registry.set_desired(session, name, data.desired)
            await session.commit()
            record = await registry.get_adapter(session, name)
    except (AdapterNotFoundError, AdapterStateError, DBAPIError) as exc:
        raise _translate(exc) from None
    logger.info("adapter %s desired=%s", name, data.desired)
    await _notify(control, f"{'desired' if data.desired else 'undesired'} {name}")
    return fleet_adapter(record)


@post("/v1/adapters/{name:str}/retire", summary="Stop serving an adapter everywhere and retire it",
      status_code=200, responses=RESPONSES)  # fmt: skip
async def retire_fleet_adapter(request: Request, name: FromPath[str]) -> FleetAdapter:
    control = _control(request)
    try:
        async with control.require_sessions()() as session:
            await registry.retire_adapter(session, name)
            await session.commit()
            record = await registry.get_adapter(session, name)
    except (AdapterNotFoundError, DBAPIError) as exc:
        raise _translate(exc) from None
    logger.info("adapter %s retired", name)
    await _notify(control, f"retired {name}")
    return fleet_adapter(record)


ROUTES = [list_fleet_adapters, register_fleet_adapter, get_fleet_adapter, desire_fleet_adapter, retire_fleet_adapter]
