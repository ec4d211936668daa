"""Adapter hot-swap across replicas: two real servers (granian + the engine on SmolLM2) on one
Postgres database and one Redis of this module's own (so it can be restarted), driven through
`/v1/adapters`. Every change must reach every replica within one reconcile period, whether the
hint arrives, is lost, or Redis restarts meanwhile.
"""

from __future__ import annotations

import math
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest


openai = pytest.importorskip("openai")
pytest.importorskip("peft")
psycopg = pytest.importorskip("psycopg")

API_KEY, ADMIN_KEY = "user-key", "admin-key"
INTERVAL_S = 2.0  # MXEXT_RECONCILE_INTERVAL for the servers
# One period, plus what a reconcile takes (an adapter load on a shared 2-core machine) and polling.
CONVERGE_LIMIT_S = INTERVAL_S + 2.0
PROMPT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def lora_root(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/{alpha,beta,gamma,alpha-v2}: random r=8 LoRAs on q,v of SmolLM2 (non-zero B), and bad ones."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fleet") / "root"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    for seed, name in enumerate(("alpha", "beta", "gamma", "alpha-v2")):
        torch.manual_seed(seed)
        for key, param in peft_model.named_parameters():
            if ".lora_A." in key or ".lora_B." in key:  # fresh random A and B, as nn.Linear initialises
                torch.nn.init.kaiming_uniform_(param.data, a=math.sqrt(5))
        peft_model.save_pretrained(root / name)
    shutil.copytree(root / "alpha", root / "pickle")
    (root / "pickle" / "adapter_model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, root / "pickle" / "adapter_model.bin")
    shutil.copytree(root / "alpha", root.parent / "outside")
    return root


@pytest.fixture(scope="module")
def fleet_database(new_postgres_database) -> str:
    """A database of the fleet's own: its tests check the whole adapter table, which other modules'
    jobs (a conversion that registers) would otherwise add to."""
    return new_postgres_database()


@pytest.fixture(scope="module")
def fleet(smollm2_dir, lora_root, redis_server, fleet_database, tmp_path_factory, server_process) -> Iterator[list]:
    """Two replicas, `replica-a` and `replica-b`."""
    env = {
        "DATABASE_URL": fleet_database,
        "REDIS_URL": redis_server.url,
        "MXEXT_SIGNAL_CHANNEL": f"mxext:test:{uuid.uuid4().hex[:8]}",
        "MXEXT_RECONCILE_INTERVAL": str(INTERVAL_S),
        "VLLM_MXEXT_LORA_ROOTS": str(lora_root),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
    }
    logs = tmp_path_factory.mktemp("fleet-logs")
    servers = []
    try:
        for name in ("replica-a", "replica-b"):
            servers.append(server_process(
                smollm2_dir, logs / f"{name}.log",
                "--served-model-name", "smollm2", "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
                "--max-model-len", "512", "--num-kv-blocks", "64", "--num-threads", "1", "--shutdown-timeout", "3",
                env={**env, "MXEXT_REPLICA_ID": name},
            ))  # fmt: skip
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def admin(fleet) -> Iterator[httpx.Client]:
    """The admin API of replica-a (any replica drives the whole fleet)."""
    with httpx.Client(base_url=fleet[0].base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as c:
        yield c


def loaded(server) -> set[str]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    data = httpx.get(f"{server.base_url}/v1/lora_adapters", headers=headers, timeout=10).json()["data"]
    return {card["name"] for card in data}


def chat(server, model: str) -> str:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=4, temperature=0)
    return reply.choices[0].message.content


def converge(fleet, predicate: Callable[[object], bool], what: str, limit: float = CONVERGE_LIMIT_S) -> float:
    """Seconds until `predicate(server)` holds on every replica; fails past `limit`."""
    started = time.monotonic()
    pending = list(fleet)
    while pending:
        pending = [server for server in pending if not predicate(server)]
        elapsed = time.monotonic() - started
        if pending and elapsed > limit:
            logs = "\n".join(server.log()[-3000:] for server in pending)
            pytest.fail(f"{what}: {len(pending)} replica(s) not converged after {elapsed:.1f}s\n{logs}")
        time.sleep(0.05)
    print(f"{what}: converged in {time.monotonic() - started:.2f}s")
    return time.monotonic() - started


def set_in_postgres(postgres_url: str, name: str, **values) -> None:
    """Change the desired state behind the API's back: no hint is published."""
    assignments = ", ".join(f"{column} = %({column})s" for column in values)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"UPDATE lora_adapters SET {assignments} WHERE name = %(name)s", {**values, "name": name})


def register(admin: httpx.Client, name: str, path: Path, **body) -> httpx.Response:
    return admin.post("/v1/adapters", json={"name": name, "path": str(path), **body})


def test_register_is_served_by_every_replica(fleet, admin, lora_root):
    response = register(admin, "alpha", lora_root / "alpha")
    assert response.status_code == 201, response.text
    assert response.json()["version"] == 1
    converge(fleet, lambda server: "alpha" in loaded(server), "register alpha")
    replies = [chat(server, "alpha") for server in fleet]
    assert replies[0] == replies[1] and replies[0] != chat(fleet[0], "smollm2")  # the adapter changes the output
    listed = httpx.get(f"{fleet[1].base_url}/v1/adapters", headers=admin.headers).json()["data"]
    assert [(a["name"], sorted(a["served_by"])) for a in listed] == [("alpha", ["replica-a", "replica-b"])]


def test_new_weights_reload_everywhere(fleet, admin, lora_root):
    before = chat(fleet[0], "alpha")
    response = register(admin, "alpha", lora_root / "alpha-v2")
    assert response.status_code == 200 and response.json()["version"] == 2

    def current(server) -> bool:
        adapter = admin.get("/v1/adapters/alpha").json()
        return sorted(adapter["served_by"]) == ["replica-a", "replica-b"]

    converge(fleet, current, "re-register alpha with new weights")
    after = [chat(server, "alpha") for server in fleet]
    assert after[0] == after[1] != before


def test_retire_stops_every_replica(fleet, admin):
    assert admin.post("/v1/adapters/alpha/retire").json()["status"] == "retired"
    converge(fleet, lambda server: "alpha" not in loaded(server), "retire alpha")
    for server in fleet:
        with pytest.raises(openai.NotFoundError, match="alpha"):
            chat(server, "alpha")
    assert admin.get("/v1/adapters/alpha").json()["replicas"] == []


def test_a_local_adapter_is_left_alone(fleet, admin, lora_root):
    """POST /v1/load_lora_adapter stays local and immediate; reconciles do not undo it."""
    response = admin.post("/v1/load_lora_adapter", json={"lora_name": "local-only", "lora_path": str(lora_root / "beta")})
    assert response.status_code == 200
    time.sleep(INTERVAL_S * 1.5)  # at least one timer reconcile on each replica
    assert "local-only" in loaded(fleet[0]) and "local-only" not in loaded(fleet[1])
    chat(fleet[0], "local-only")


def test_a_lost_hint_converges_on_the_timer(fleet, admin, lora_root, fleet_database):
    response = register(admin, "beta", lora_root / "beta", desired=False)
    assert response.status_code == 201 and response.json()["desired"] is False
    time.sleep(0.5)
    assert all("beta" not in loaded(server) for server in fleet)
    set_in_postgres(fleet_database, "beta", desired=True)  # no hint
    converge(fleet, lambda server: "beta" in loaded(server), "desire beta without a hint")
    set_in_postgres(fleet_database, "beta", desired=False)
    converge(fleet, lambda server: "beta" not in loaded(server), "undesire beta without a hint")


def test_redis_restart_while_the_desired_set_changes(fleet, admin, lora_root, fleet_database, redis_server):
    assert register(admin, "gamma", lora_root / "gamma", desired=False).status_code == 201
    set_in_postgres(fleet_database, "beta", desired=True)
    converge(fleet, lambda server: "beta" in loaded(server) and "gamma" not in loaded(server), "set-up")
    redis_server.kill()
    set_in_postgres(fleet_database, "beta", desired=False, status="retired")
    set_in_postgres(fleet_database, "gamma", desired=True)
    redis_server.start()
    converge(fleet, lambda server: "gamma" in loaded(server) and "beta" not in loaded(server), "across a Redis restart")
    # The listeners came back and said so (a reconcile followed), and hints flow again.
    converge(fleet, lambda server: "signal bus reconnected" in server.log(), "bus reconnect", limit=10)
    assert admin.post("/v1/adapters/gamma/retire").status_code == 200
    converge(fleet, lambda server: "gamma" not in loaded(server), "retire gamma after the restart")
    hinted = re.compile(r"adapter reconcile \(hint from [^)]*retired gamma\): loaded -, unloaded \['gamma'\]")
    assert all(hinted.search(server.log()) for server in fleet), "the hint after the restart did not arrive"
    for server in fleet:
        assert server.process.poll() is None


def test_bad_registrations_are_refused_and_write_nothing(fleet, admin, lora_root):
    before = admin.get("/v1/adapters").json()
    cases = [
        (lora_root.parent / "outside", "is outside the folders adapters may be loaded from"),
        (lora_root / "pickle", "pickle files are never loaded"),
        (lora_root / "missing", "does not exist"),
    ]
    for path, why in cases:
        response = register(admin, "bad", path)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert why in error["message"] and error["param"] == "path", error
    assert admin.get("/v1/adapters").json() == before
    user = httpx.post(f"{fleet[0].base_url}/v1/adapters", json={"name": "x", "path": str(lora_root / "beta")},
                      headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert user.status_code == 403
