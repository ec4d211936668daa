"""AsyncEngine: the engine core stepping in one thread, requests streaming to asyncio consumers.

Requests and aborts enter through a thread-safe command queue drained between steps; each step's
outputs go back to the event loop in one `call_soon_threadsafe` call and fan out to one
asyncio.Queue per request. Leaving the `generate` iterator early (a client disconnect, a
cancelled task) aborts the request, so its KV blocks are free within a step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator

from app.engine.config import EngineConfig
from app.engine.core import EngineCore, EngineStats, QueueFullError
from app.engine.lora import LoRAInfo
from app.engine.request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served."""


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._consumers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending_adds = 0
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="mxext-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model and start the step thread (blocking: call it off the event loop)."""
        return cls(EngineCore(config))

    # ---- what the server reads ------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.core.vocab_size

    def stats(self) -> EngineStats:
        return self.core.stats()

    # ---- LoRA adapters --------------------------------------------------------------------
    def add_lora(self, name: str, path: str) -> LoRAInfo:
        """Read, validate and host-cache the PEFT adapter at `path` as `name` (blocking: call it
        through asyncio.to_thread). An existing name gets a new version; its requests in flight
        finish on the old weights. Raises FileNotFoundError, or ValueError saying why."""
        return self.core.add_lora(name, path)

    def remove_lora(self, name: str) -> bool:
        """Unregister `name` (False if unknown); requests in flight on it finish first."""
        return self.core.remove_lora(name)

    def list_loras(self) -> list[LoRAInfo]:
        return self.core.list_loras()

    def has_lora(self, name: str) -> bool:
        return self.core.has_lora(name)

    # ---- requests -------------------------------------------------------------------------
    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        prompt: str | None = None,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield delta outputs until the request finishes, on the base model or on the adapter
        `lora_name`. Raises ValueError (also for an unknown adapter) / QueueFullError first."""
        if self._stopped:
            raise EngineDeadError("the engine has stopped")
        request_id = request_id or uuid.uuid4().hex
        self.core.validate(prompt_token_ids, params)
        # The adapter version is held from here, so unloading it now lets this request finish.
        lora = self.core.acquire_lora(lora_name) if lora_name is not None else None
        try:
            with self._lock:
                if len(self.core.scheduler.waiting) + self._pending_adds >= self.core.config.max_waiting:
                    raise QueueFullError(f"the waiting queue is full ({self.core.config.max_waiting} requests); retry later")
                if request_id in self._consumers:
                    raise ValueError(f"request id {request_id!r} is already in use")
                self._pending_adds += 1
                outputs: asyncio.Queue = asyncio.Queue()
                self._consumers[request_id] = (asyncio.get_running_loop(), outputs)
        except BaseException:
            if lora is not None:
                self.core.release_lora(lora)
            raise
        self._commands.put(("add", request_id, list(prompt_token_ids), params, prompt, lora))
        self._wake.set()
        finished = False
        try:
            while True:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._consumers.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Stop a request; idempotent. Its blocks are freed before the next step."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        while not self._stopped:
            self._drain_commands()
            if not core.has_work():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = core.step()
            except Exception as exc:  # a fault of ours: fail what is in flight, keep serving
                log.exception("engine step failed; aborting the requests in flight")
                self._fail_all(exc)
                continue
            if outputs:
                self._deliver(outputs)
        self._fail_all(EngineDeadError("the engine has stopped"))

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, request_id, ids, params, prompt, lora = cmd
                with self._lock:
                    self._pending_adds -= 1
                    abandoned = request_id not in self._consumers
                if abandoned:  # abandoned before it started
                    if lora is not None:
                        self.core.release_lora(lora)
                    continue
                try:
                    self.core.add_request(request_id, ids, params, prompt, lora=lora)
                except Exception as exc:
                    self._deliver_to(request_id, exc)
            else:
                out = self.core.abort(cmd[1])
                if out is not None:
                    self._deliver([out])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                consumer = self._consumers.get(out.request_id)
                if consumer is not None:
                    by_loop.setdefault(consumer[0], []).append((consumer[1], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop has closed
                pass

    def _deliver_to(self, request_id: str, item) -> None:
        with self._lock:
            consumer = self._consumers.get(request_id)
        if consumer is not None:
            try:
                consumer[0].call_soon_threadsafe(consumer[1].put_nowait, item)
            except RuntimeError:
                pass

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self.core.requests):
            self.core.abort(request_id)
        with self._lock:
            ids = list(self._consumers)
        for request_id in ids:
            self._deliver_to(request_id, exc)


def _put_all(items: list) -> None:
    for q, out in items:
        q.put_nowait(out)
