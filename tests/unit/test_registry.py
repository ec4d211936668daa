"""The adapter registry on SQLite: registration validates before writing, versions follow the
weights, desire/retire, the desired set, and what replicas report."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from app.adapters import registry
from app.adapters.registry import AdapterRegistrationError, ReplicaReport
from app.db.models import LoraAdapter
from app.db.session import async_sessions, make_async_engine, sync_sessions
from app.settings import Settings, StoreSettings
from tests.lora_folders import make_peft_folder


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    from app.db.migrate import upgrade

    settings = Settings(store=StoreSettings(home=tmp_path / "home"))
    upgrade(settings)
    return settings


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def register(settings: Settings, root: Path, name: str, path: Path, **kw) -> LoraAdapter:
    with sync_sessions(settings)() as session:
        row = registry.register_adapter_sync(session, name=name, source=str(path), format=kw.pop("format", "peft"),
                                             path=path, roots=[root], **kw)  # fmt: skip
        session.commit()
        return row


def count(settings: Settings) -> int:
    with sync_sessions(settings)() as session:
        return session.scalar(select(func.count()).select_from(LoraAdapter))


def test_register_records_digest_rank_and_base_and_versions_follow_the_weights(settings, root):
    a = make_peft_folder(root / "a", seed=1, r=4)
    row = register(settings, root, "tuned", a)
    assert (row.version, row.rank, row.base_model, row.status, row.desired) == (1, 4, "tiny-llama", "ready", True)
    assert row.sha256 == registry.adapter_digest(a) and len(row.sha256) == 64
    assert register(settings, root, "tuned", a).version == 1  # same files: no reload anywhere
    make_peft_folder(a, seed=2, r=4)  # new weights in place
    assert register(settings, root, "tuned", a).version == 2
    b = shutil.copytree(a, root / "b")
    assert register(settings, root, "tuned", b).version == 3  # another folder
    assert count(settings) == 1


def test_a_given_sha256_must_match_the_folder(settings, root):
    a = make_peft_folder(root / "a")
    with pytest.raises(AdapterRegistrationError, match="digest"):
        register(settings, root, "tuned", a, sha256="0" * 64)
    assert register(settings, root, "tuned", a, sha256=registry.adapter_digest(a)).version == 1


def bad_folders(root: Path, outside: Path) -> dict[str, tuple[Path, str, str]]:
    pickle = make_peft_folder(root / "pickle")
    (pickle / "adapter_model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, pickle / "adapter_model.bin")
    dora = make_peft_folder(root / "dora")
    (dora / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "use_dora": true}')
    big = make_peft_folder(root / "big", r=64)
    notlora = make_peft_folder(root / "notlora")
    (notlora / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return {
        "outside": (make_peft_folder(outside / "a"), "path", "outside the folders adapters may be loaded from"),
        "missing": (root / "nope", "path", "does not exist"),
        "pickle": (pickle, "path", "pickle files are never loaded"),
        "dora": (dora, "path", "DoRA"),
        "rank": (big, "path", "exceeds max_lora_rank=32"),
        "corrupt": (notlora, "path", "not a valid safetensors file"),
    }


def test_bad_registrations_say_why_and_write_nothing(settings, root, tmp_path):
    for case, (path, param, why) in bad_folders(root, tmp_path / "outside").items():
        with pytest.raises(AdapterRegistrationError, match=why) as info:
            register(settings, root, case, path)
        assert info.value.param == param, case
    with pytest.raises(AdapterRegistrationError, match="cannot be served") as info:
        register(settings, root, "nemo", make_peft_folder(root / "n"), format="nemo")
    assert info.value.param == "format"
    with pytest.raises(AdapterRegistrationError, match="not a valid adapter name") as info:
        register(settings, root, "a:b", make_peft_folder(root / "n"))
    assert info.value.param == "name"
    assert count(settings) == 0


async def test_desire_retire_desired_set_and_replica_reports(settings, root):
    register(settings, root, "a", make_peft_folder(root / "a", seed=1))
    register(settings, root, "b", make_peft_folder(root / "b", seed=2), desired=False)
    engine = make_async_engine(settings)
    sessions = async_sessions(engine)
    try:
        async with sessions() as session:
            fleet = await registry.fleet_state(session)
            assert set(fleet.desired) == {"a"} and fleet.registered == {"a", "b"}
            assert fleet.desired["a"].version == 1 and fleet.desired["a"].path == str((root / "a").resolve())
            await registry.set_desired(session, "b", True)
            await registry.retire_adapter(session, "a")
            await session.commit()
            assert set(await registry.desired_set(session)) == {"b"}
            # a retired adapter comes back when desired again; a failed one does not
            assert (await registry.set_desired(session, "a", True)).status == "ready"
            row = (await session.execute(select(LoraAdapter).where(LoraAdapter.name == "b"))).scalar_one()
            row.status = "failed"
            with pytest.raises(registry.AdapterStateError, match="is failed, not ready"):
                await registry.set_desired(session, "b", True)
            with pytest.raises(registry.AdapterNotFoundError, match="no adapter named 'zz'"):
                await registry.retire_adapter(session, "zz")
            await session.commit()

            await registry.report_replica(session, "r1", [ReplicaReport("a", 1, "x", 1.0), ReplicaReport("b", 1, None)])
            await registry.report_replica(session, "r2", [ReplicaReport("a", 1, "x", error="boom")])
            await registry.report_replica(session, "r1", [ReplicaReport("a", 1, "x", 1.0)])  # b gone from r1
            await session.commit()
            listed = {record.adapter.name: record for record in await registry.list_adapters(session)}
            assert [(r.replica_id, r.error) for r in listed["a"].replicas] == [("r1", None), ("r2", "boom")]
            assert listed["b"].replicas == []
            await registry.forget_replica(session, "r2")
            await session.commit()
            assert [r.replica_id for r in (await registry.get_adapter(session, "a")).replicas] == ["r1"]
    finally:
        await engine.dispose()


def test_the_digest_covers_the_weights_and_names_not_the_job_manifest(tmp_path):
    from app.adapters.digest import folder_digest, folder_files
    from app.jobs.outputs import write_manifest

    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    before = folder_digest(folder)
    write_manifest(folder, "job-1", source="/x")
    assert folder_digest(folder) == before and folder_files(folder) == ["adapter_model.safetensors"]
    write_manifest(folder, "job-2", source="/x")  # the same weights converted again by another job
    assert folder_digest(folder) == before
    (folder / "adapter_model.safetensors").write_bytes(b"other weights")
    assert folder_digest(folder) != before
