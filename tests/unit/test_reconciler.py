"""The reconciler against a fake engine on SQLite: what it loads, reloads, unloads and leaves alone,
what it reports, and that hints and the timer drive it."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select, update

from app.adapters import registry
from app.db.models import LoraAdapter, ReplicaAdapter
from app.db.session import sync_sessions
from app.http.control import ControlPlane
from app.http.reconciler import AdapterReconciler
from app.http.serve_cli import ServeConfig
from app.http.state import ServerState
from app.http.testing import FakeEngine
from app.settings import ControlPlaneSettings, Settings, StoreSettings
from app.signals import make_bus, publish_adapters_changed_sync
from tests.lora_folders import make_peft_folder


@dataclasses.dataclass
class Replica:
    settings: Settings
    root: Path
    engine: FakeEngine
    state: ServerState
    control: ControlPlane
    reconciler: AdapterReconciler

    def register(self, name: str, folder: Path, desired: bool = True) -> None:
        with sync_sessions(self.settings)() as session:
            registry.register_adapter_sync(session, name=name, source="test", format="peft", path=folder,
                                           desired=desired, roots=[self.root])  # fmt: skip
            session.commit()

    def set(self, name: str, **values) -> None:
        with sync_sessions(self.settings)() as session:
            session.execute(update(LoraAdapter).where(LoraAdapter.name == name).values(**values))
            session.commit()

    def reported(self) -> dict[str, tuple[int, str | None]]:
        with sync_sessions(self.settings)() as session:
            rows = session.execute(select(ReplicaAdapter).where(ReplicaAdapter.replica_id == "r1")).scalars()
            return {row.adapter_name: (row.version, row.error) for row in rows}

    def loaded(self) -> dict[str, int]:
        return {info.name: info.version for info in self.engine.list_loras()}


@pytest.fixture
async def replica(tmp_path: Path):
    settings = Settings(store=StoreSettings(home=tmp_path / "home"),
                        control=ControlPlaneSettings(reconcile_interval_s=60))  # fmt: skip
    root = tmp_path / "root"
    root.mkdir()
    engine = FakeEngine()
    state = ServerState(ServeConfig(model="fake", port=9999), engine_factory=lambda _: engine)
    state.lora = dataclasses.replace(state.lora, roots=(root,))
    state.engine = engine
    control = ControlPlane(settings)
    control.bus = make_bus(settings)
    reconciler = AdapterReconciler(state, control, replica_id="r1")
    await control.start()  # migrates the embedded SQLite; no services started here
    try:
        yield Replica(settings, root, engine, state, control, reconciler)
    finally:
        await control.stop()


async def test_converges_to_the_registry_and_leaves_local_adapters_alone(replica):
    r = replica
    r.engine.add_lora("local", str(make_peft_folder(r.root / "local")))  # /v1/load_lora_adapter or --lora-modules
    r.register("a", make_peft_folder(r.root / "a", seed=1))
    r.register("b", make_peft_folder(r.root / "b", seed=2))
    r.register("c", make_peft_folder(r.root / "c", seed=3), desired=False)
    result = await r.reconciler.reconcile()
    assert sorted(result.loaded) == ["a v1", "b v1"] and not result.unloaded
    assert r.loaded() == {"local": 1, "a": 1, "b": 1}
    assert r.reported() == {"a": (1, None), "b": (1, None)}

    assert not (await r.reconciler.reconcile()).changed  # nothing to do: nothing reloaded

    make_peft_folder(r.root / "a", seed=9)  # new weights, re-registered: version 2 -> reload
    r.register("a", r.root / "a")
    r.set("b", desired=False)
    result = await r.reconciler.reconcile()
    assert result.loaded == ["a v2"] and result.unloaded == ["b"]
    assert r.loaded() == {"local": 1, "a": 2}
    assert r.reported() == {"a": (2, None)}


async def test_registered_names_are_the_registrys_even_when_loaded_by_hand(replica):
    r = replica
    r.register("a", make_peft_folder(r.root / "a", seed=1))
    r.register("c", make_peft_folder(r.root / "c", seed=3), desired=False)
    await r.reconciler.reconcile()
    r.engine.add_lora("c", str(r.root / "c"))  # registered, not desired: it goes
    r.engine.add_lora("a", str(make_peft_folder(r.root / "other", seed=5)))  # replaced by hand: back to the registry's
    r.engine.remove_lora("zzz")
    result = await r.reconciler.reconcile()
    assert result.unloaded == ["c"] and result.loaded == ["a v1"]
    assert r.engine.loras["a"].path == str((r.root / "a").resolve())
    r.engine.remove_lora("a")  # unloaded by hand: loaded again
    assert (await r.reconciler.reconcile()).loaded == ["a v1"]


async def test_a_failing_adapter_is_recorded_and_the_others_converge(replica):
    r = replica
    r.register("good", make_peft_folder(r.root / "good", seed=1))
    r.register("bad", make_peft_folder(r.root / "bad", seed=2))
    (r.root / "bad" / "adapter_model.safetensors").unlink()  # broken after registration
    r.register("gone", make_peft_folder(r.root / "gone", seed=3))
    shutil.rmtree(r.root / "gone")
    result = await r.reconciler.reconcile()
    assert result.loaded == ["good v1"] and sorted(result.failed) == ["bad", "gone"]
    reported = r.reported()
    assert reported["good"] == (1, None)
    assert "adapter_model.safetensors" in reported["bad"][1]
    assert "does not exist" in reported["gone"][1]
    make_peft_folder(r.root / "bad", seed=2)  # fixed: the next reconcile serves it
    assert (await r.reconciler.reconcile()).loaded == ["bad v1"]
    r.set("gone", status="retired", desired=False)
    await r.reconciler.reconcile()
    assert set(r.reported()) == {"good", "bad"}


async def test_a_full_host_cache_is_a_failure_not_an_eviction(replica):
    r = replica
    small = dataclasses.replace(r.state.lora.settings, max_cpu_loras=2)
    r.state.lora = dataclasses.replace(r.state.lora, settings=small)
    r.engine.add_lora("local", str(make_peft_folder(r.root / "local")))
    for i, name in enumerate("ab"):
        r.register(name, make_peft_folder(r.root / name, seed=i))
    result = await r.reconciler.reconcile()
    assert result.loaded == ["a v1"] and result.failed == ["b"]
    assert "host cache is full (max_cpu_loras=2" in r.reported()["b"][1]
    assert set(r.loaded()) == {"local", "a"}


async def test_hints_and_the_timer_drive_it_and_stop_forgets_the_replica(replica):
    r = replica
    await r.control.bus.start()
    await r.reconciler.start()
    try:
        await wait_for(lambda: r.reconciler.reconciles >= 1)  # start-up
        r.register("a", make_peft_folder(r.root / "a"))
        await asyncio.to_thread(publish_adapters_changed_sync, r.settings, "test")  # as a worker would
        await wait_for(lambda: "a" in r.loaded(), timeout=2)  # the interval is 60 s: the hint did it
        r.reconciler.interval_s = 0.2
        r.reconciler.request("shorter timer")
        r.set("a", desired=False)  # no hint at all
        await wait_for(lambda: "a" not in r.loaded(), timeout=2)
    finally:
        await r.reconciler.stop()
        await r.control.bus.stop()
    assert r.reported() == {}


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
