"""The server's state: the engine (None while loading), what it serves, admission and draining."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from app.adapters.lora_config import LoraServing, resolve_lora_serving
from app.http.errors import APIError, unavailable
from app.http.metrics import ServerMetrics
from app.http.serve_cli import ServeConfig

logger = logging.getLogger("app.http")

EngineFactory = Callable[[ServeConfig], Any]  # blocking: returns a loaded AsyncEngine


def default_model_name(config: ServeConfig) -> str:
    if config.model:
        return config.model
    from app.settings import get_settings

    return get_settings().model


def lora_serving_of(config: ServeConfig) -> LoraServing:
    """The LoRA setup of `config`: its flags over the environment over its --lora-config file."""
    return resolve_lora_serving(
        config.lora_config,
        modules=config.lora_modules,
        max_loras=config.max_loras,
        max_cpu_loras=config.max_cpu_loras,
        max_lora_rank=config.max_lora_rank,
        admin_key=config.admin_key,
    )


def lora_engine_fields(lora: LoraServing) -> dict[str, int]:
    """EngineConfig's LoRA limits."""
    return {
        "max_loras": lora.settings.max_gpu_loras,
        "max_cpu_loras": lora.settings.max_cpu_loras,
        "max_lora_rank": lora.settings.max_lora_rank,
    }


def load_engine(config: ServeConfig, lora: LoraServing | None = None) -> Any:
    """Resolve the model through the store and load the AsyncEngine (blocking, seconds)."""
    from app.engine import AsyncEngine, EngineConfig
    from app.hub.store import ModelStore
    from app.settings import get_settings

    lora = lora or lora_serving_of(config)
    name = default_model_name(config)
    folder = ModelStore(get_settings().store.home).resolve(name)
    engine_config = EngineConfig(
        model=str(folder),
        dtype=config.dtype,
        device=config.device,
        quantization=config.quantization,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        num_kv_blocks=config.num_kv_blocks,
        kv_cache_bytes=config.kv_cache_memory,
        enable_prefix_caching=config.enable_prefix_caching,
        max_waiting=config.max_waiting,
        num_threads=config.num_threads,
        **lora_engine_fields(lora),
    )
    return AsyncEngine.from_config(engine_config)


class Admission:
    """One admitted request; `release()` (idempotent) gives its in-flight slot back."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._released = False
        self.streams: Any = None  # the request's EngineStreams, once started (for abort_all)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._state._release(self)


class ServerState:
    """What the routes share. Lives on `app.state.server`."""

    def __init__(self, config: ServeConfig, engine_factory: EngineFactory | None = None) -> None:
        self.config = config
        self.lora = lora_serving_of(config)
        model = default_model_name(config)
        self.served_names: tuple[str, ...] = config.served_model_name or (model,)
        self.model_name = self.served_names[0]
        self.model_root = model
        self.created = int(time.time())
        self.engine: Any = None
        self.load_error: str | None = None
        self.draining = False
        self.in_flight = 0
        self._admitted: set[Admission] = set()
        self.metrics = ServerMetrics(self.model_name, lambda: self.engine)
        self._engine_factory = engine_factory or functools.partial(load_engine, lora=self.lora)
        self.lora_loads = asyncio.Semaphore(2)  # adapter loads at once: each reads and converts weights
        self._idle: asyncio.Event | None = None
        self.on_fatal: Callable[[str], None] | None = None  # set by the embedded server: exit on load failure

    # ---- loading -------------------------------------------------------------------------------

    async def load(self) -> None:
        """Load the engine off the event loop; /health answers 503 meanwhile."""
        started = time.monotonic()
        logger.info("loading model %s", self.model_root)
        try:
            engine = await asyncio.to_thread(self._engine_factory, self.config)
            if self.lora.adapters:
                await asyncio.to_thread(self._load_startup_adapters, engine)
        except Exception as exc:  # noqa: BLE001 - reported on /health and, when embedded, fatal
            self.load_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, (FileNotFoundError, ValueError)):  # the user's to fix; the message says how
                logger.error("loading model %s failed: %s", self.model_root, self.load_error)
            else:
                logger.exception("loading model %s failed", self.model_root)
            if self.on_fatal is not None:
                self.on_fatal(self.load_error)
            return
        if self.draining:  # shut down while loading
            engine.shutdown()
            return
        # What start-up made (model, tokenizer, libraries, the control plane: ~450k objects) lives
        # as long as the process; left to the collector, each full collection walked it all and
        # stalled the event loop for ~200 ms, every few hundred requests. Frozen, it is never
        # scanned, and a full collection only walks what requests made since. Garbage left by the
        # load is collected first (once, before /health turns ready), or frozen cycles would never go.
        gc.collect()
        gc.freeze()
        self.engine = engine
        logger.info(
            "model %s ready as %s (max_model_len=%s) in %.1fs",
            self.model_root, ", ".join(self.served_names), engine.max_model_len, time.monotonic() - started,
        )  # fmt: skip

    def _load_startup_adapters(self, engine: Any) -> None:
        """The adapters of --lora-config (auto_load) and --lora-modules, before /health turns ready."""
        from app.adapters.security import check_adapter_path

        try:
            for spec in self.lora.adapters:
                try:
                    path = check_adapter_path(str(spec.path), self.lora.roots)
                    info = engine.add_lora(spec.name, str(path))
                except (ValueError, OSError) as exc:  # FileNotFoundError included
                    raise ValueError(f"adapter {spec.name!r} from {spec.path}: {exc}") from None
                logger.info("adapter %s loaded from %s (rank %s)", spec.name, path, info.rank)
        except BaseException:
            engine.shutdown()  # the server will not serve: stop the engine's thread too
            raise

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def not_ready_reason(self) -> str:
        if self.draining:
            return "The server is shutting down"
        if self.load_error:
            return f"The model failed to load: {self.load_error}"
        return "The model is still loading"

    # ---- admission -----------------------------------------------------------------------------

    def is_base(self, name: str) -> bool:
        return name in self.served_names or name in self.lora.base_aliases

    def resolve_model(self, name: str | None) -> str | None:
        """The adapter `name` asks for (None: the base model), or 404.

        `model` is a served name (or the seed's literal `base_model`), `<adapter>`, or
        `<base>:<adapter>`; an omitted name means the first served name.
        """
        if name is None or self.is_base(name):
            return None
        base, colon, adapter = name.rpartition(":")  # adapter names have no colon; base names may
        if colon and not self.is_base(base):
            raise self._unknown_model(name, f"`{base}` is not a served model")
        adapter = adapter if colon else name
        engine = self.require_engine()  # adapters are known only once the engine is up
        if not engine.has_lora(adapter):
            raise self._unknown_model(name, f"no adapter named `{adapter}` is loaded")
        return adapter

    def check_model(self, name: str | None) -> None:
        """404 unless `name` is a served name or a loaded adapter (an omitted name means the first)."""
        self.resolve_model(name)

    def adapter_names(self) -> list[str]:
        return sorted(info.name for info in self.loras())

    def loras(self) -> list[Any]:
        """The engine's LoRAInfo list (empty while loading)."""
        engine = self.engine
        return engine.list_loras() if engine is not None else []

    def _unknown_model(self, name: str, why: str) -> APIError:
        served = ", ".join(self.served_names)
        adapters = self.adapter_names()
        shown = ", ".join(adapters[:20]) + (f" and {len(adapters) - 20} more" if len(adapters) > 20 else "")
        offer = f"; the adapters {shown} (as `<adapter>` or `{self.model_name}:<adapter>`)" if adapters else ""
        return APIError(
            404,
            f"The model `{name}` does not exist ({why}). This server serves: {served}{offer}",
            param="model",
            code="model_not_found",
        )

    def require_engine(self) -> Any:
        if self.engine is None or self.draining:
            raise unavailable(f"{self.not_ready_reason()}; retry shortly", retry_after=5)
        return self.engine

    def admit(self) -> Admission:
        """Count one generation request in flight, or 503 while loading or draining."""
        self.require_engine()
        self.in_flight += 1
        if self._idle is not None:
            self._idle.clear()
        admission = Admission(self)
        self._admitted.add(admission)
        return admission

    def _release(self, admission: Admission) -> None:
        self._admitted.discard(admission)
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    # ---- draining ------------------------------------------------------------------------------

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait for in-flight ones; True when all finished in time."""
        self.draining = True
        if self._idle is None:
            self._idle = asyncio.Event()
        if self.in_flight == 0:
            self._idle.set()
        logger.info("draining: %d request(s) in flight, waiting up to %.0fs", self.in_flight, timeout)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            logger.warning("drain timeout: %d request(s) still in flight are aborted", self.in_flight)
            return False

    def abort_all(self) -> None:
        """Abort every request in flight; their answers end with finish_reason "abort"."""
        for admission in list(self._admitted):
            if admission.streams is not None:
                admission.streams.abort()

    def shutdown_engine(self) -> None:
        self.draining = True
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
