"""The fleet's desired adapters in the database: register, desire, retire, list, and what each
replica reports it serves.

Registration validates before it writes: the path lies inside the allowed roots
(app.adapters.security), the folder is a servable PEFT adapter (config checked by app.adapters.peft,
safetensors weights only, never a pickle), and its digest is taken. Whether the tensors fit the base
model is checked by each replica when it loads (a failure is recorded on its ReplicaAdapter row).

`version` grows whenever a name gets other weights (path or digest changed), so replicas reload.
The functions here flush but never commit: the caller commits, then publishes the hint.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.adapters.digest import folder_digest
from app.adapters.lora_config import ADAPTER_NAME_PATTERN, ADAPTER_NAME_RULE, FORMATS
from app.adapters.security import AdapterPathError, check_adapter_path
from app.db.models import LoraAdapter, ReplicaAdapter, utcnow

SERVABLE = ("ready",)  # statuses a desired adapter is served in


class AdapterRegistrationError(ValueError):
    """A registration refused before anything is written; the message says what to change and
    `param` which field it is about."""

    def __init__(self, message: str, param: str = "path") -> None:
        super().__init__(message)
        self.param = param


class AdapterNotFoundError(LookupError):
    pass


class AdapterStateError(ValueError):
    """The adapter exists but cannot make that move (e.g. desiring a failed one)."""


@dataclasses.dataclass(frozen=True)
class AdapterFacts:
    """What registration learned from the folder."""

    path: Path  # resolved, inside the allowed roots
    sha256: str  # adapter_digest(path)
    rank: int
    base_model: str | None


@dataclasses.dataclass(frozen=True)
class DesiredAdapter:
    name: str
    path: str
    version: int
    sha256: str | None


@dataclasses.dataclass(frozen=True)
class FleetState:
    desired: dict[str, DesiredAdapter]  # what every replica should serve
    registered: frozenset[str]  # every name the registry knows (the reconciler may unload these)


@dataclasses.dataclass(frozen=True)
class ReplicaReport:
    """One adapter as a replica reports it after a reconcile."""

    name: str
    version: int
    sha256: str | None
    loaded_at: float | None = None  # time.time() of the load (None: unknown)
    error: str | None = None  # set when `version` failed to load here


@dataclasses.dataclass
class AdapterRecord:
    adapter: LoraAdapter
    replicas: list[ReplicaAdapter]


# ---- validation (blocking: file I/O) ------------------------------------------------------------


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME_PATTERN, name):
        raise AdapterRegistrationError(f"name {name!r} is not a valid adapter name: {ADAPTER_NAME_RULE}", "name")


def adapter_digest(folder: Path) -> str:
    """The digest the conversion service reports for its outputs (app.adapters.digest)."""
    return folder_digest(folder)


def inspect_adapter(raw_path: str, roots: Sequence[Path], *, format: str = "peft", max_rank: int = 32) -> AdapterFacts:
    """Validate the adapter at `raw_path` for serving; AdapterRegistrationError saying why."""
    from app.adapters import peft

    if format not in FORMATS:
        raise AdapterRegistrationError(
            f"format {format!r} cannot be served; servers load {', '.join(FORMATS)} adapters. Convert it first "
            "(POST /v1/jobs/lora-conversions with to_format \"peft\" and register true)",
            "format",
        )
    try:
        path = check_adapter_path(raw_path, roots)
    except AdapterPathError as exc:
        raise AdapterRegistrationError(str(exc).replace("lora_path", "path")) from None
    if not path.is_dir():
        raise AdapterRegistrationError(
            f"path {raw_path!r} is a file; a PEFT adapter is a folder with {peft.CONFIG_FILE} and {peft.WEIGHTS_FILE}"
        )
    weights = path / peft.WEIGHTS_FILE
    try:
        if not weights.is_file():
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in peft.PICKLE_SUFFIXES)
            if pickles:
                raise AdapterRegistrationError(
                    f"LoRA adapter {path}: only pickle weights ({', '.join(pickles)}); pickle files are never "
                    f"loaded: save or convert the adapter to {peft.WEIGHTS_FILE}"
                )
            raise AdapterRegistrationError(f"LoRA adapter {path}: {peft.WEIGHTS_FILE} is missing")
        config = peft.read_config(path)
        peft.check_config(path, config, max_rank)
        _check_safetensors(weights)
        rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
        sha256 = adapter_digest(path)
    except AdapterRegistrationError:
        raise
    except (ValueError, OSError) as exc:
        raise AdapterRegistrationError(str(exc)) from None
    base = config.get("base_model_name_or_path")
    return AdapterFacts(path=path, sha256=sha256, rank=int(rank), base_model=str(base) if base else None)


def _check_safetensors(weights: Path) -> None:
    """The header parses and names LoRA A/B weights (the tensors' fit is checked at load)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise AdapterRegistrationError(f"{weights} is not a valid safetensors file ({exc})") from None
    if not any(".lora_A" in key for key in keys) or not any(".lora_B" in key for key in keys):
        raise AdapterRegistrationError(f"{weights} holds no LoRA weights (no lora_A/lora_B tensors)")


def _default_roots() -> tuple[Path, ...]:
    from app.adapters.security import allowed_roots
    from app.settings import get_settings

    return allowed_roots(get_settings().lora.roots)


# ---- writes shared by the sync and async paths ---------------------------------------------------


def _apply_registration(
    row: LoraAdapter | None, name: str, facts: AdapterFacts, *, source: str, format: str, desired: bool,
    job_id: object | None, base_model: str | None,
) -> tuple[LoraAdapter, bool]:  # fmt: skip
    """Create or update the row for `name`; (row, created). Other weights bump the version."""
    base_model = base_model or facts.base_model
    if row is None:
        row = LoraAdapter(
            name=name, source=source, format=format, path=str(facts.path), sha256=facts.sha256, rank=facts.rank,
            base_model=base_model, status="ready", desired=desired, version=1, job_id=job_id,
        )  # fmt: skip
        return row, True
    if row.path != str(facts.path) or row.sha256 != facts.sha256:
        row.version += 1
    row.source, row.format, row.path, row.sha256, row.rank = source, format, str(facts.path), facts.sha256, facts.rank
    row.base_model = base_model or row.base_model
    row.status, row.desired = "ready", desired
    row.job_id = job_id if job_id is not None else row.job_id
    row.updated_at = utcnow()
    return row, False


def register_adapter_sync(
    session: Session,
    *,
    name: str,
    source: str,
    format: str,
    path: str | os.PathLike[str],
    sha256: str | None = None,
    rank: int | None = None,
    base_model: str | None = None,
    desired: bool = True,
    job_id: object | None = None,
    roots: Sequence[Path] | None = None,
    max_rank: int | None = None,
) -> LoraAdapter:
    """Validate the folder and upsert the adapter by name (workers; the caller commits, then calls
    app.signals.publish_adapters_changed_sync). `sha256`, when given, must equal
    `adapter_digest(path)`; `rank` and `base_model` override what the folder says.
    Raises AdapterRegistrationError (a ValueError) before writing anything."""
    from app.settings import get_settings

    check_adapter_name(name)
    facts = inspect_adapter(str(path), roots if roots is not None else _default_roots(), format=format,
                            max_rank=max_rank or get_settings().lora.max_lora_rank)  # fmt: skip
    if sha256 is not None and sha256 != facts.sha256:
        raise AdapterRegistrationError(
            f"adapter {name!r}: the folder's digest {facts.sha256} is not the sha256 given ({sha256}); the files "
            "changed after they were written, or the digest was taken another way (use registry.adapter_digest)"
        )
    if rank is not None:
        facts = dataclasses.replace(facts, rank=rank)
    row = session.execute(select(LoraAdapter).where(LoraAdapter.name == name).with_for_update()).scalar_one_or_none()
    row, created = _apply_registration(row, name, facts, source=source, format=format, desired=desired,
                                       job_id=job_id, base_model=base_model)  # fmt: skip
    if created:
        session.add(row)
    session.flush()
    return row


# ---- the API's async side ------------------------------------------------------------------------


async def _row(session: AsyncSession, name: str, *, for_update: bool = False) -> LoraAdapter:
    query = select(LoraAdapter).where(LoraAdapter.name == name)
    if for_update:
        query = query.with_for_update()
    row = (await session.execute(query)).scalar_one_or_none()
    if row is None:
        raise AdapterNotFoundError(f"no adapter named {name!r} is registered; see GET /v1/adapters")
    return row


async def register_adapter(
    session: AsyncSession, *, name: str, facts: AdapterFacts, source: str, format: str = "peft",
    desired: bool = True, job_id: object | None = None,
) -> tuple[LoraAdapter, bool]:  # fmt: skip
    """Upsert `name` from already inspected `facts` (see inspect_adapter); (row, created)."""
    check_adapter_name(name)
    query = select(LoraAdapter).where(LoraAdapter.name == name).with_for_update()
    row = (await session.execute(query)).scalar_one_or_none()
    row, created = _apply_registration(row, name, facts, source=source, format=format, desired=desired,
                                       job_id=job_id, base_model=None)  # fmt: skip
    if created:
        session.add(row)
    await session.flush()
    return row, created


async def set_desired(session: AsyncSession, name: str, desired: bool) -> LoraAdapter:
    """Serve (`desired`) or stop serving `name` across the fleet. A retired adapter comes back."""
    row = await _row(session, name, for_update=True)
    if desired and row.status not in ("ready", "retired"):
        raise AdapterStateError(f"adapter {name!r} is {row.status}, not ready; register it again once it is")
    if desired and row.status == "retired":
        row.status = "ready"
    row.desired = desired
    row.updated_at = utcnow()
    await session.flush()
    return row


async def retire_adapter(session: AsyncSession, name: str) -> LoraAdapter:
    """Stop serving `name` everywhere and mark it retired (the row and its files stay)."""
    row = await _row(session, name, for_update=True)
    row.desired, row.status = False, "retired"
    row.updated_at = utcnow()
    await session.flush()
    return row


async def get_adapter(session: AsyncSession, name: str) -> AdapterRecord:
    row = await _row(session, name)
    query = select(ReplicaAdapter).where(ReplicaAdapter.adapter_name == name).order_by(ReplicaAdapter.replica_id)
    return AdapterRecord(row, list((await session.execute(query)).scalars()))


async def list_adapters(session: AsyncSession) -> list[AdapterRecord]:
    """Every registered adapter with the replicas that report it, by name."""
    rows = (await session.execute(select(LoraAdapter).order_by(LoraAdapter.name))).scalars().all()
    replicas: dict[str, list[ReplicaAdapter]] = {}
    query = select(ReplicaAdapter).order_by(ReplicaAdapter.replica_id)
    for replica in (await session.execute(query)).scalars():
        replicas.setdefault(replica.adapter_name, []).append(replica)
    return [AdapterRecord(row, replicas.get(row.name, [])) for row in rows]


async def fleet_state(session: AsyncSession) -> FleetState:
    """The desired set (desired and ready) and every registered name, in one read."""
    query = select(LoraAdapter.name, LoraAdapter.path, LoraAdapter.version, LoraAdapter.sha256,
                   LoraAdapter.desired, LoraAdapter.status)  # fmt: skip
    desired: dict[str, DesiredAdapter] = {}
    names: set[str] = set()
    for name, path, version, sha256, wanted, status in (await session.execute(query)).all():
        names.add(name)
        if wanted and status in SERVABLE:
            desired[name] = DesiredAdapter(name, path, version, sha256)
    return FleetState(desired, frozenset(names))


async def desired_set(session: AsyncSession) -> dict[str, DesiredAdapter]:
    """name -> what every replica should serve."""
    return (await fleet_state(session)).desired


async def report_replica(session: AsyncSession, replica_id: str, reports: Sequence[ReplicaReport]) -> None:
    """Replace what `replica_id` reports with `reports` (reported_at: now)."""
    import datetime as dt

    now = utcnow()
    query = select(ReplicaAdapter).where(ReplicaAdapter.replica_id == replica_id)
    existing = {row.adapter_name: row for row in (await session.execute(query)).scalars()}
    for report in reports:
        loaded_at = dt.datetime.fromtimestamp(report.loaded_at, dt.timezone.utc) if report.loaded_at else now
        row = existing.pop(report.name, None)
        if row is None:
            row = ReplicaAdapter(replica_id=replica_id, adapter_name=report.name)
            session.add(row)
        row.version, row.sha256, row.error = report.version, report.sha256, report.error
        row.loaded_at, row.reported_at = loaded_at, now
    for row in existing.values():
        await session.delete(row)
    await session.flush()


async def forget_replica(session: AsyncSession, replica_id: str) -> None:
    """Drop everything `replica_id` reported (it stopped serving)."""
    await session.execute(delete(ReplicaAdapter).where(ReplicaAdapter.replica_id == replica_id))
