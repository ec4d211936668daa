"""LoRA over the API on a real server (SmolLM2, fp32): load, chat through, list, unload; concurrent
loads past a small host cache; fifty bad loads while good traffic keeps flowing.

Adapters are built here with peft (random, non-zero B so they change the output); the greedy reply
through an adapter is checked against peft's own generation.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("peft")

API_KEY, ADMIN_KEY = "user-key", "admin-key"
BASE = "smollm2"
PROMPT = [{"role": "user", "content": "Name three colours."}]
REFERENCE_TOKENS = 8


def build_adapters(smollm2_dir: Path, root: Path) -> dict[str, object]:
    """root/good (r=8 on q,v), root/copy-0..9 (copies), the bad ones, and peft's greedy reference."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(root / "good")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = peft_model.generate(ids, max_new_tokens=REFERENCE_TOKENS, do_sample=False)
    reference = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    for i in range(10):
        shutil.copytree(root / "good", root / f"copy-{i}")
    # rank above the server's max (32)
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(smollm2_dir), LoraConfig(r=64, target_modules=["q_proj"])
    ).save_pretrained(root / "rank64")
    # pickle weights instead of safetensors
    shutil.copytree(root / "good", root / "pickle")
    (root / "pickle" / "adapter_model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, root / "pickle" / "adapter_model.bin")
    # a config that is not JSON
    shutil.copytree(root / "good", root / "badjson")
    (root / "badjson" / "adapter_config.json").write_text("{not json")
    (root.parent / "elsewhere").mkdir(exist_ok=True)
    shutil.copytree(root / "good", root.parent / "elsewhere" / "good", dirs_exist_ok=True)
    # loaded at start-up through the config file, from a folder outside VLLM_MXEXT_LORA_ROOTS
    shutil.copytree(root / "good", root.parent / "preload" / "good")
    config_file = root.parent / "config" / "lora_config.yaml"
    config_file.parent.mkdir()
    config_file.write_text(
        "base_model: smollm2-135m-instruct\n"
        "lora_adapters:\n"
        "  - {name: preloaded, path: ../preload/good, format: peft, description: loaded at start-up}\n"
        "lora_settings: {max_lora_rank: 32, max_loras: 8, cache_size: 16, enable_dynamic_loading: false}\n"
        "auto_load: true\n"
    )
    return {"reference": reference, "config": config_file}


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora") / "root"


@pytest.fixture(scope="module")
def built(smollm2_dir: Path, lora_root: Path) -> dict[str, object]:
    lora_root.mkdir(parents=True, exist_ok=True)
    return build_adapters(smollm2_dir, lora_root)


@pytest.fixture(scope="module")
def lora_server(smollm2_dir: Path, lora_root: Path, built, tmp_path_factory, server_process) -> Iterator:
    proc = server_process(
        smollm2_dir, tmp_path_factory.mktemp("lora-server") / "server.log",
        "--served-model-name", BASE, "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
        "--dtype", "float32", "--quantization", "none", "--max-model-len", "1024", "--num-kv-blocks", "256",
        "--shutdown-timeout", "5", "--lora-config", str(built["config"]),
        # the environment wins over the file: runtime updating on, a host cache of 2
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "VLLM_MXEXT_LORA_ROOTS": str(lora_root),
             "MIM_MAX_CPU_LORAS": "2", "VLLM_MXEXT_JSONL_LOGGING": "1"},
    )  # fmt: skip
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(lora_server):
    return openai.OpenAI(base_url=f"{lora_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def admin(lora_server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=lora_server.base_url, headers=headers, timeout=120) as http:
        yield http


def load(admin: httpx.Client, name: str, path: Path | str) -> httpx.Response:
    return admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def greedy(client, model: str, max_tokens: int = REFERENCE_TOKENS) -> str:
    reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def test_runtime_updating_is_off_by_default(http):
    """The shared server runs without VLLM_ALLOW_RUNTIME_LORA_UPDATING: a clear 403, adapters still listed."""
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/tmp"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "a"})):  # fmt: skip
        response = http.post(path, json=body)
        assert response.status_code == 403
        assert response.json()["error"]["message"] == (
            "runtime LoRA updating is disabled; set VLLM_ALLOW_RUNTIME_LORA_UPDATING=true"
        )
    assert http.get("/v1/lora_adapters").json() == {"object": "list", "data": []}


def test_config_file_adapters_are_loaded_before_ready(client, admin, lora_root, built):
    """The first request after /health turned 200 finds the file's adapter; its folder is an allowed root."""
    listed = admin.get("/v1/lora_adapters").json()["data"]
    assert [a["name"] for a in listed] == ["preloaded"]
    assert listed[0]["path"] == str((lora_root.parent / "preload" / "good").resolve())
    reply = greedy(client, "smollm2-135m-instruct:preloaded")  # the file's base_model names the base
    assert reply == built["reference"]  # the same weights as root/good
    assert load(admin, "preloaded-again", lora_root.parent / "preload" / "good").status_code == 200
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "preloaded-again"}).status_code == 200


def test_load_chat_list_unload_then_404(client, admin, lora_root, built, lora_server, capsys):
    response = load(admin, "sql", lora_root / "good")
    assert response.status_code == 200, response.text
    assert response.text == "Success: LoRA adapter 'sql' added successfully."

    cards = {m.id: m for m in client.models.list().data}
    assert cards["sql"].parent == BASE and cards["sql"].root == str((lora_root / "good").resolve())

    base = greedy(client, BASE)
    through = greedy(client, "base_model:sql")
    assert through != base, "the adapter did not change the greedy reply"
    assert through == built["reference"], "the reply through the adapter differs from peft's"
    assert greedy(client, "sql") == greedy(client, f"{BASE}:sql") == through

    (card,) = [a for a in admin.get("/v1/lora_adapters").json()["data"] if a["name"] == "sql"]
    assert (card["format"], card["rank"], sorted(card["target_modules"])) == ("peft", 8, ["q_proj", "v_proj"])
    assert card["tier"] in ("gpu", "cpu") and card["requests_served"] >= 3

    from app.cli import main  # the CLI against the same server

    capsys.readouterr()
    url, keys = ["--server-url", lora_server.base_url], ["--api-key", API_KEY, "--admin-key", ADMIN_KEY]
    assert main(["lora", "list", *url, *keys]) == 0 and "sql" in capsys.readouterr().out
    assert main(["lora", "test", "sql", PROMPT[0]["content"], "--max-tokens", "8", *url, *keys]) == 0
    assert capsys.readouterr().out.strip() == through.strip()

    response = admin.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert response.status_code == 200 and "removed" in response.text
    with pytest.raises(openai.NotFoundError) as info:
        greedy(client, "base_model:sql")
    assert "sql" in str(info.value)
    assert "sql" not in {m.id for m in client.models.list().data}
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 404


def test_ten_concurrent_loads_with_a_host_cache_of_two(client, admin, lora_root):
    """All ten loads succeed; the host cache keeps the two used last, and both serve."""
    names = [f"c{i}" for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda i: load(admin, names[i], lora_root / f"copy-{i}"), range(10)))
    assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses if r.status_code != 200]
    kept = [a["name"] for a in admin.get("/v1/lora_adapters").json()["data"]]
    assert len(kept) == 2 and set(kept) <= set(names), kept
    for name in kept:
        assert greedy(client, name, max_tokens=4)
    for name in names:
        status = admin.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code
        assert status == (200 if name in kept else 404)


BAD_LOADS = [
    ("missing", lambda root: root / "missing", 400, ("does not exist",)),
    ("traversal", lambda root: f"{root}/../elsewhere/good", 400, ("..",)),
    ("outside", lambda root: root.parent / "elsewhere" / "good", 400, ("outside the folders",)),
    ("pickle", lambda root: root / "pickle", 400, ("pickle", ".bin", "safetensors")),
    ("badjson", lambda root: root / "badjson", 400, ("json",)),
    ("rank", lambda root: root / "rank64", 400, ("rank",)),
]


def test_fifty_bad_loads_during_live_traffic(client, admin, lora_root, lora_server):
    assert load(admin, "live", lora_root / "good").status_code == 200
    stop = threading.Event()
    outcomes: list[str] = []

    def traffic(model: str) -> None:
        while not stop.is_set():
            try:
                reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=6, temperature=0)
                outcomes.append("ok" if reply.choices[0].message.content is not None else "empty")
            except Exception as exc:  # noqa: BLE001 - every failure counts against the server
                outcomes.append(f"{model}: {type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=traffic, args=(model,)) for model in (BASE, "live", "base_model:live")]
    for worker in workers:
        worker.start()
    started = time.monotonic()
    bad = [BAD_LOADS[i % len(BAD_LOADS)] for i in range(50)]
    user = {"Authorization": f"Bearer {API_KEY}"}

    def bad_load(i: int) -> tuple[str, int, str]:
        kind, make_path, _, _ = bad[i]
        return kind, *_status_and_message(load(admin, f"bad-{i}", make_path(lora_root)))

    def user_load(i: int) -> tuple[str, int, str]:  # the API key is not the admin key: 403
        body = {"lora_name": f"user-{i}", "lora_path": str(lora_root / "good")}
        return "user", *_status_and_message(admin.post("/v1/load_lora_adapter", json=body, headers=user))

    def wait_for_traffic(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(outcomes) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    try:
        wait_for_traffic(3)
        before = len(outcomes)
        with ThreadPoolExecutor(4) as pool:  # staggered over ~3 s so the traffic really runs alongside
            futures = []
            for i in range(50):
                futures.append(pool.submit(bad_load, i))
                time.sleep(0.05)
            futures += [pool.submit(user_load, i) for i in range(5)]
            results = [f.result() for f in futures]
        during = len(outcomes) - before
        wait_for_traffic(len(outcomes) + 3)  # and traffic after the last bad load
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)
    expected = {kind: (status, words) for kind, _, status, words in BAD_LOADS} | {"user": (403, ("admin key",))}
    for kind, status, message in results:
        want_status, words = expected[kind]
        assert status == want_status, (kind, status, message)
        assert any(w.lower() in message.lower() for w in words), (kind, message)
        if kind == "outside":  # the refusal names where adapters may come from
            assert str(lora_root) in message, message
    failures = [o for o in outcomes if o != "ok"]
    assert not failures, failures[:5]
    assert during >= 5, f"only {during} good requests finished while the bad loads ran"
    print(f"\n{len(outcomes)} good requests ({during} during the {len(results)} refused loads) in "
          f"{time.monotonic() - started:.1f}s")
    names = {a["name"] for a in admin.get("/v1/lora_adapters").json()["data"]}
    assert "live" in names and not any(n.startswith(("bad-", "user-")) for n in names), names
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "live"}).status_code == 200


def _status_and_message(response: httpx.Response) -> tuple[int, str]:
    try:
        return response.status_code, json.loads(response.text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.status_code, response.text
