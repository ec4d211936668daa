"""`/v1/adapters` on the app (fake engine, embedded SQLite, in-process bus): register → served here,
desire/retire, the listing, the admin key, and bad registrations (400, nothing written)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
from litestar.testing import AsyncTestClient

from app.http.app import create_app
from app.http.serve_cli import ServeConfig
from app.http.testing import FakeEngine
from app.settings import ControlPlaneSettings, Settings, StoreSettings
from tests.lora_folders import make_peft_folder

ADMIN = {"Authorization": "Bearer admin-key"}


@pytest.fixture
async def client(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    settings = Settings(store=StoreSettings(home=tmp_path / "home"),
                        control=ControlPlaneSettings(replica_id="r1", reconcile_interval_s=60))  # fmt: skip
    engine = FakeEngine()
    app = create_app(ServeConfig(model="fake", api_key="user-key", admin_key="admin-key"),
                     engine_factory=lambda _: engine, settings=settings)  # fmt: skip
    state = app.state.server
    state.lora = dataclasses.replace(state.lora, roots=(root,))
    async with AsyncTestClient(app) as http:
        http.root, http.engine = root, engine  # type: ignore[attr-defined]
        yield http


async def eventually(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_register_serves_here_then_retire_stops_it(client):
    folder = make_peft_folder(client.root / "tuned")
    response = await client.post("/v1/adapters", json={"name": "tuned", "path": str(folder)}, headers=ADMIN)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["version"], body["desired"], body["status"]) == ("tuned", 1, True, "ready")

    async def served() -> bool:
        listed = (await client.get("/v1/adapters", headers=ADMIN)).json()["data"]
        return listed[0]["served_by"] == ["r1"]

    await eventually(served)  # the in-process hint reached the reconciler (its timer is 60 s)
    assert client.engine.has_lora("tuned")
    replica = (await client.get("/v1/adapters/tuned", headers=ADMIN)).json()["replicas"][0]
    assert [replica[k] for k in ("replica_id", "version", "status", "current")] == ["r1", 1, "serving", True]

    again = await client.post("/v1/adapters", json={"name": "tuned", "path": str(folder)}, headers=ADMIN)
    assert again.status_code == 200 and again.json()["version"] == 1

    off = await client.patch("/v1/adapters/tuned", json={"desired": False}, headers=ADMIN)
    assert off.status_code == 200 and off.json()["desired"] is False
    await eventually(lambda: asyncio.sleep(0, not client.engine.has_lora("tuned")))
    on = await client.patch("/v1/adapters/tuned", json={"desired": True}, headers=ADMIN)
    assert on.json()["desired"] is True
    await eventually(lambda: asyncio.sleep(0, client.engine.has_lora("tuned")))
    retired = await client.post("/v1/adapters/tuned/retire", headers=ADMIN)
    assert retired.status_code == 200 and retired.json()["status"] == "retired"
    await eventually(lambda: asyncio.sleep(0, not client.engine.has_lora("tuned")))


async def test_bad_registrations_are_400_and_write_nothing(client, tmp_path):
    pickle = make_peft_folder(client.root / "pickle")
    (pickle / "adapter_model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, pickle / "adapter_model.bin")
    cases = [
        ({"name": "x", "path": str(make_peft_folder(tmp_path / "outside"))}, "path", "outside the folders"),
        ({"name": "x", "path": str(client.root / "missing")}, "path", "does not exist"),
        ({"name": "x", "path": str(pickle)}, "path", "pickle files are never loaded"),
        ({"name": "x", "path": str(pickle), "format": "nemo"}, "format", "cannot be served"),
        ({"name": "bad:name", "path": str(pickle)}, "name", "not a valid adapter name"),
        ({"name": "fake", "path": str(pickle)}, "name", "the base model's name"),
        ({"name": "x"}, None, "missing required field `path`"),
    ]
    for body, param, why in cases:
        response = await client.post("/v1/adapters", json=body, headers=ADMIN)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert why in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    assert (await client.get("/v1/adapters", headers=ADMIN)).json() == {"data": [], "object": "list"}


async def test_unknown_names_and_the_admin_key(client):
    for method, path, body in (("GET", "/v1/adapters/nope", None), ("PATCH", "/v1/adapters/nope", {"desired": True}),
                               ("POST", "/v1/adapters/nope/retire", None)):  # fmt: skip
        response = await client.request(method, path, json=body, headers=ADMIN)
        assert response.status_code == 404 and response.json()["error"]["code"] == "adapter_not_found"
    assert (await client.get("/v1/adapters")).status_code == 401
    user = await client.get("/v1/adapters", headers={"Authorization": "Bearer user-key"})
    assert user.status_code == 403 and "admin key" in user.json()["error"]["message"]
