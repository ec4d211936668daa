"""A fake AsyncEngine with the real one's contract, for fast HTTP tests without a model.

Byte-level tokenizer (ids 0..2 special, 3..258 the bytes), deterministic "generation" (letters
drawn from a seeded RNG), stop strings, logprobs, a waiting-queue bound and KV usage that drops
back to zero when a request finishes or is aborted. LoRA adapters: PEFT folders checked the way
the engine checks them (adapter_config.json, safetensors weights, rank), each adapter changing
the generated letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from app.engine.request import CompletionOutput, Logprob, RequestMetrics, RequestOutput, SamplingParams
from app.engine import QueueFullError
from app.engine.lora import LoRAInfo
from app.http.serve_cli import ServeConfig

EOS, BOS, PAD = 0, 1, 2
SPECIAL = {EOS: "<|eos|>", BOS: "<|bos|>", PAD: "<|pad|>"}
ALPHABET = "abcdefghij klmnop qrstuvw xyz "


class FakeTokenizer:
    vocab_size = 259
    eos_token_ids = (EOS,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([BOS] if add_special_tokens else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if i in SPECIAL:
                if not skip_special_tokens:
                    out += SPECIAL[i].encode()
            else:
                out.append(i - 3)
        return out.decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return SPECIAL.get(token_id) or bytes([token_id - 3]).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kw: Any) -> str:
        if kw.get("fail"):
            raise ValueError("the template refused these messages")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclasses.dataclass
class FakeStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


class FakeEngine:
    """Deterministic stand-in for AsyncEngine (asyncio only, no step thread)."""

    def __init__(
        self, max_model_len: int = 256, step_delay: float = 0.002, max_running: int = 8, max_lora_rank: int = 32
    ) -> None:
        self.tokenizer = FakeTokenizer()
        self.vocab_size = FakeTokenizer.vocab_size
        self.max_model_len = max_model_len
        self.step_delay = step_delay
        self.max_running = max_running
        self.running: set[str] = set()
        self.aborted: set[str] = set()
        self.fail_after: int | None = None  # raise RuntimeError after this many steps (mid-stream faults)
        self._stats = FakeStats()
        self.is_shut_down = False
        self.max_lora_rank = max_lora_rank
        self.loras: dict[str, LoRAInfo] = {}
        self.lora_paths_seen: list[str] = []  # every path add_lora was called with
        self.lora_of: dict[str, str | None] = {}  # request id -> the adapter it ran on

    # ---- LoRA (the engine's contract: add_lora blocks, raises ValueError/FileNotFoundError) ----

    def add_lora(self, name: str, path: str) -> LoRAInfo:
        self.lora_paths_seen.append(path)
        folder = Path(path)
        config_file = folder / "adapter_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder} has no adapter_config.json; is it a PEFT adapter folder?")
        try:
            config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise ValueError(f"adapter_config.json is not valid JSON: {exc}") from None
        if not (folder / "adapter_model.safetensors").is_file():
            if (folder / "adapter_model.bin").is_file():
                raise ValueError("adapter_model.bin is a pickle, which is refused; save the adapter as safetensors")
            raise FileNotFoundError(f"{folder} has no adapter_model.safetensors")
        rank = int(config.get("r", 0))
        if not 1 <= rank <= self.max_lora_rank:
            raise ValueError(f"rank {rank} is above max_lora_rank {self.max_lora_rank}")
        old = self.loras.get(name)
        info = LoRAInfo(name, str(folder), rank, list(config.get("target_modules") or []),
                        (old.version + 1) if old else 1, time.time(), "cpu", 0)  # fmt: skip
        self.loras[name] = info
        return info

    def remove_lora(self, name: str) -> bool:
        return self.loras.pop(name, None) is not None

    def list_loras(self) -> list[LoRAInfo]:
        return list(self.loras.values())

    def has_lora(self, name: str) -> bool:
        return name in self.loras

    def stats(self) -> FakeStats:
        self._stats.num_running = len(self.running)
        self._stats.kv_cache_usage = min(1.0, len(self.running) / 10)
        return dataclasses.replace(self._stats)

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def shutdown(self) -> None:
        self.is_shut_down = True

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        params.validate(self.vocab_size)
        if lora_name is not None:
            if lora_name not in self.loras:
                raise ValueError(f"LoRA adapter {lora_name!r} is not loaded")
            self.loras[lora_name].requests_served += 1
        self.lora_of[request_id] = lora_name
        salt = zlib.crc32(lora_name.encode()) if lora_name else 0
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_token_ids)
        if len(prompt_token_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_token_ids)}) + max_tokens exceeds {self.max_model_len}")
        if len(self.running) >= self.max_running:
            raise QueueFullError(f"{len(self.running)} requests waiting")
        self.running.add(request_id)
        self._stats.prompt_tokens_total += len(prompt_token_ids)
        metrics = RequestMetrics(arrival_time=time.time())
        seed = params.seed if params.seed is not None else random.randrange(1 << 30)
        rngs = [random.Random(seed * 31 + i + sum(prompt_token_ids) + salt) for i in range(params.n)]
        texts = [""] * params.n
        counts = [0] * params.n
        done = [False] * params.n
        try:
            step = 0
            while not all(done):
                await asyncio.sleep(self.step_delay)
                if request_id in self.aborted:  # like the real engine: a last output that says so
                    aborted = [CompletionOutput(index=i, finish_reason="abort") for i in range(params.n) if not done[i]]
                    yield RequestOutput(request_id, prompt_token_ids, aborted, finished=True, metrics=metrics)
                    return
                step += 1
                if self.fail_after is not None and step > self.fail_after:
                    raise RuntimeError("fake engine fault")
                now = time.time()
                metrics.first_scheduled_time = metrics.first_scheduled_time or now
                metrics.first_token_time = metrics.first_token_time or now
                outputs = []
                for i in range(params.n):
                    if done[i]:
                        continue
                    outputs.append(self._step_one(i, rngs[i], params, texts, counts, done, max_tokens))
                self._stats.generation_tokens_total += len(outputs)
                finished = all(done)
                if finished:
                    metrics.finished_time = time.time()
                yield RequestOutput(request_id, prompt_token_ids, outputs, finished=finished, metrics=metrics)
        finally:
            self.running.discard(request_id)

    def _step_one(
        self, i: int, rng: random.Random, params: SamplingParams, texts: list[str], counts: list[int],
        done: list[bool], max_tokens: int,
    ) -> CompletionOutput:  # fmt: skip
        char = rng.choice(ALPHABET)
        token = ord(char) + 3
        counts[i] += 1
        texts[i] += char
        out = CompletionOutput(index=i, text=char, token_ids=[token])
        if params.logprobs is not None:
            position = {token: Logprob(-0.25, rank=1, decoded_token=char)}
            for rank, other in enumerate("etaoinshrdlucmfwypvbgkqjxz"[: params.logprobs], start=1):
                if ord(other) + 3 != token:
                    position[ord(other) + 3] = Logprob(-1.0 - rank, rank=rank + 1, decoded_token=other)
            out.logprobs = [position]
        for stop in params.stop or []:
            cut = texts[i].find(stop)
            if cut >= 0:
                done[i] = True
                out.finish_reason, out.stop_reason = "stop", stop
                if not params.include_stop_str_in_output:
                    out.text = char[: max(0, len(char) - (len(texts[i]) - cut))]
                return out
        if counts[i] >= max_tokens:
            done[i] = True
            out.finish_reason = "length"
        return out


@contextlib.asynccontextmanager
async def fake_client(
    config: ServeConfig | None = None, engine: FakeEngine | None = None
) -> AsyncIterator[tuple[Any, FakeEngine]]:
    """An httpx client on an app over a FakeEngine, in this event loop (so tests can run requests
    concurrently and watch the server's state); `client.app` is the Litestar app."""
    import httpx

    from app.http.app import create_app

    engine = engine or FakeEngine()
    app = create_app(config or ServeConfig(model="fake"), engine_factory=lambda _: engine)
    app.state.server.engine = engine  # what the lifespan's background load would do
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        client.app = app  # type: ignore[attr-defined]
        yield client, engine
