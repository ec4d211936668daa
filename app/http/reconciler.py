"""The adapter reconciler: makes this server serve the fleet's desired adapters (Postgres is the truth).

It runs at start-up (once the engine is ready), on every `adapters-changed` hint, after the signal
bus reconnects (hints may have been lost meanwhile) and on a timer (MXEXT_RECONCILE_INTERVAL): a
reconcile starts at most one interval after the previous one started, so a lost hint costs at most
one period. One task runs them all, so two never overlap; hints that arrive during a reconcile
cause exactly one more.

What it touches: it loads desired adapters that are missing, reloads those whose registry version
changed (or that someone replaced or unloaded by hand), and unloads adapters that are no longer
desired, but only names it loaded itself or that the registry knows. Adapters loaded through
`POST /v1/load_lora_adapter` or `--lora-modules` under names the registry does not know are left
alone. It never evicts to make room: when the host cache is full the adapter is reported failed.

After each reconcile it writes what it serves (and what failed, with the reason) to
`replica_adapters` under its replica id (MXEXT_REPLICA_ID, else `hostname:port`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from typing import Any

from app.adapters.registry import FleetState, ReplicaReport, fleet_state, forget_replica, report_replica
from app.adapters.security import check_adapter_path
from app.http.control import ControlPlane
from app.http.state import ServerState
from app.signals import ADAPTERS_CHANGED, Signal

logger = logging.getLogger("app.http.reconciler")

ENGINE_POLL_S = 0.2
FORGET_TIMEOUT_S = 3.0


@dataclasses.dataclass(frozen=True)
class Served:
    """An adapter this reconciler loaded."""

    version: int  # the registry's
    sha256: str | None
    engine_version: int  # the engine's, to notice a load or unload by hand
    loaded_at: float


@dataclasses.dataclass(frozen=True)
class Failure:
    version: int
    sha256: str | None
    error: str


@dataclasses.dataclass
class ReconcileResult:
    loaded: list[str] = dataclasses.field(default_factory=list)
    unloaded: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.unloaded or self.failed)


def default_replica_id(state: ServerState, control: ControlPlane) -> str:
    return control.settings.control.replica_id or f"{socket.gethostname()}:{state.config.port}"


class AdapterReconciler:
    """A ControlPlane service (start/stop). Subscribes to the control plane's bus when it has one."""

    def __init__(self, state: ServerState, control: ControlPlane, *, replica_id: str | None = None,
                 interval_s: float | None = None) -> None:  # fmt: skip
        self.state = state
        self.control = control
        self.replica_id = replica_id or default_replica_id(state, control)
        self.interval_s = interval_s or control.settings.control.reconcile_interval_s
        self.served: dict[str, Served] = {}
        self.failures: dict[str, Failure] = {}
        self.reconciles = 0
        self._wake: asyncio.Event | None = None
        self._reasons: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._db_down = False
        if control.bus is not None:
            control.bus.subscribe(self._on_signal, self._on_reconnect)

    # ---- triggers (called on the event loop) ------------------------------------------------------

    def request(self, reason: str) -> None:
        """Ask for a reconcile as soon as the current one (if any) is done."""
        self._reasons.append(reason)
        if self._wake is not None:
            self._wake.set()

    def _on_signal(self, signal: Signal) -> None:
        if signal.kind == ADAPTERS_CHANGED:
            self.request(f"hint from {signal.sender}" + (f": {signal.reason}" if signal.reason else ""))

    def _on_reconnect(self) -> None:
        self.request("signal bus reconnected")

    # ---- service ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="adapter-reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        sessions = self.control.sessions
        if sessions is not None and self.reconciles:
            # This replica stops serving: say so, rather than leave rows that look current.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(FORGET_TIMEOUT_S), sessions() as session:
                    await forget_replica(session, self.replica_id)
                    await session.commit()

    async def _run(self) -> None:
        assert self._wake is not None
        if not await self._engine_ready():
            return
        logger.info("adapter reconciler for replica %s: every %.0fs and on hints", self.replica_id, self.interval_s)
        reason = "start-up"
        while True:
            started = time.monotonic()
            self._wake.clear()
            reasons, self._reasons = self._reasons, []
            await self._reconcile_logged(", ".join(dict.fromkeys(reasons)) or reason)
            timeout = max(0.0, started + self.interval_s - time.monotonic())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                reason = "timer"

    async def _engine_ready(self) -> bool:
        while self.state.engine is None:
            if self.state.load_error or self.state.draining:
                return False
            await asyncio.sleep(ENGINE_POLL_S)
        return True

    async def _reconcile_logged(self, reason: str) -> None:
        try:
            result = await self.reconcile()
        except Exception as exc:  # noqa: BLE001 - the database may be down: try again on the next trigger
            if not self._db_down:
                logger.warning("adapter reconcile (%s) failed: %s: %s; retrying every %.0fs",
                               reason, type(exc).__name__, exc, self.interval_s)  # fmt: skip
            self._db_down = True
            return
        if self._db_down:
            logger.info("adapter reconcile works again")
            self._db_down = False
        level = logging.INFO if result.changed else logging.DEBUG
        logger.log(level, "adapter reconcile (%s): loaded %s, unloaded %s, failed %s", reason,
                   result.loaded or "-", result.unloaded or "-", result.failed or "-")  # fmt: skip

    # ---- one reconcile ------------------------------------------------------------------------

    async def reconcile(self) -> ReconcileResult:
        """Converge once and report; raises when the database is unreachable."""
        sessions = self.control.require_sessions()
        async with sessions() as session:
            fleet = await fleet_state(session)
        engine = self.state.require_engine()
        result = ReconcileResult()
        loaded = {info.name: info for info in engine.list_loras()}
        self._unload_undesired(engine, fleet, loaded, result)
        for want in fleet.desired.values():
            await self._converge_one(engine, want, loaded, result)
        for name in [n for n in self.failures if n not in fleet.desired]:
            del self.failures[name]
        self.reconciles += 1
        async with sessions() as session:
            await report_replica(session, self.replica_id, self._reports())
            await session.commit()
        return result

    def _unload_undesired(
        self, engine: Any, fleet: FleetState, loaded: dict[str, Any], result: ReconcileResult
    ) -> None:
        for name in [n for n in self.served if n not in loaded]:  # unloaded by hand (or evicted)
            if name not in fleet.desired:
                del self.served[name]
        for name in list(loaded):
            if name in fleet.desired or not (name in self.served or name in fleet.registered):
                continue
            engine.remove_lora(name)  # quick: unregisters; requests in flight finish on it
            del loaded[name]
            self.served.pop(name, None)
            result.unloaded.append(name)

    async def _converge_one(self, engine: Any, want: Any, loaded: dict[str, Any], result: ReconcileResult) -> None:
        have, info = self.served.get(want.name), loaded.get(want.name)
        if (
            have is not None and info is not None and have.version == want.version
            and have.sha256 == want.sha256 and info.version == have.engine_version
        ):  # fmt: skip
            return
        capacity = self.state.lora.settings.max_cpu_loras
        try:
            if info is None and len(loaded) >= capacity:
                raise ValueError(
                    f"the host cache is full (max_cpu_loras={capacity}: {', '.join(sorted(loaded))}); raise "
                    "MIM_MAX_CPU_LORAS or retire adapters"
                )
            path = await asyncio.to_thread(check_adapter_path, want.path, self.state.lora.roots)
            async with self.state.lora_loads:
                info = await asyncio.to_thread(engine.add_lora, want.name, str(path))
        except Exception as exc:  # noqa: BLE001 - one bad adapter must not stop the others
            self._record_failure(want, exc, still_serving=have)
            result.failed.append(want.name)
            return
        loaded[want.name] = info
        self.served[want.name] = Served(want.version, want.sha256, info.version, info.loaded_at)
        self.failures.pop(want.name, None)
        result.loaded.append(f"{want.name} v{want.version}")

    def _record_failure(self, want: Any, exc: Exception, still_serving: Served | None) -> None:
        error = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        if still_serving is not None:
            error += f" (still serving version {still_serving.version})"
        previous = self.failures.get(want.name)
        if previous is None or (previous.version, previous.error) != (want.version, error):
            if isinstance(exc, (ValueError, OSError)):
                logger.warning("adapter %s v%d failed to load: %s", want.name, want.version, error)
            else:
                logger.error("adapter %s v%d failed to load", want.name, want.version, exc_info=exc)
        self.failures[want.name] = Failure(want.version, want.sha256, error)

    def _reports(self) -> list[ReplicaReport]:
        reports = {
            name: ReplicaReport(name, served.version, served.sha256, served.loaded_at)
            for name, served in self.served.items()
        }
        for name, failure in self.failures.items():
            reports[name] = ReplicaReport(name, failure.version, failure.sha256, None, failure.error)
        return [reports[name] for name in sorted(reports)]
