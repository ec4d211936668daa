"""EngineCore.step(): schedule → run → sample → update. Single-threaded; the async engine drives it.

A request becomes n Sequences (n > 1 shares the prompt's KV blocks through the prefix cache:
siblings wait for the first one's prompt prefill). Each step returns delta RequestOutputs:
only the sequences that produced text or finished, with just their new tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from app.engine.block_manager import BlockManager
from app.engine.config import EngineConfig
from app.engine.lora import LoRAAdapter, LoRAInfo, LoRAManager
from app.engine.model_runner import ModelRunner
from app.engine.request import (
    CompletionOutput,
    FinishReason,
    Logprob,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
)
from app.engine.sampler import Sampler, SamplingRow
from app.engine.scheduler import Scheduler, SeqStatus, Sequence
from app.engine.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN_CAP = 8192


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 503)."""


@dataclasses.dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_kv_blocks: int


class _SeqState:
    """Per-sequence decoding state kept beside the scheduler's Sequence."""

    __slots__ = ("request", "index", "params", "row", "detok", "stops", "finish_reason", "stop_reason", "logprob_sum")

    def __init__(self, request: _RequestState, index: int, params: SamplingParams, row: SamplingRow,
                 detok: IncrementalDetokenizer, stops: StopStringMatcher | None) -> None:
        self.request = request
        self.index = index
        self.params = params
        self.row = row
        self.detok = detok
        self.stops = stops
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprob_sum = 0.0


class _RequestState:
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "seqs", "metrics", "num_cached_tokens", "lora")

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], lora=None) -> None:
        self.lora = lora  # the LoRAAdapter version it holds (released when the request ends)
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.seqs: list[Sequence] = []
        self.metrics = RequestMetrics()
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return all(s.status is SeqStatus.FINISHED for s in self.seqs)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        folder = Path(config.model)
        self.tokenizer = Tokenizer.from_pretrained(folder)
        model_max = _model_max_len(folder)
        self.max_model_len = config.max_model_len or min(model_max, DEFAULT_MAX_MODEL_LEN_CAP)
        if config.max_model_len and config.max_model_len > model_max:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's {model_max} positions")
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, self.max_model_len)
        kv_tokens = self.runner.num_blocks * config.block_size
        if kv_tokens < self.max_model_len:
            log.warning("KV cache holds %d tokens; max_model_len capped from %d", kv_tokens, self.max_model_len)
            self.max_model_len = kv_tokens
        self.vocab_size = self.runner.model_config.vocab_size
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.lora = self.runner.lora  # LoRAManager, None with enable_lora=False
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            lora_slots=self.lora,
        )
        self.sampler = Sampler(self.vocab_size, self.runner.device, config.seed)
        self.requests: dict[str, _RequestState] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ---- requests -------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError saying what to change; nothing is queued."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: send at least one token")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        params.validate(self.vocab_size)
        n_prompt = len(prompt_token_ids)
        if n_prompt >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n_prompt} tokens but this model's maximum context length is "
                f"{self.max_model_len}; shorten the prompt"
            )
        if params.max_tokens is not None and n_prompt + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens; you requested "
                f"{n_prompt + params.max_tokens} ({n_prompt} in the prompt, {params.max_tokens} in the "
                f"completion): reduce the prompt or max_tokens"
            )

    # ---- LoRA adapters (any thread) --------------------------------------------------------
    def _lora_manager(self) -> LoRAManager:
        if self.lora is None:
            raise ValueError("LoRA adapters are disabled on this engine (enable_lora=False)")
        return self.lora

    def add_lora(self, name: str, path: str) -> LoRAInfo:
        """Read, validate and host-cache a PEFT adapter (blocking; a new version if `name` exists)."""
        return self._lora_manager().add(name, path)

    def remove_lora(self, name: str) -> bool:
        return self.lora.remove(name) if self.lora is not None else False

    def list_loras(self) -> list[LoRAInfo]:
        return self.lora.list() if self.lora is not None else []

    def has_lora(self, name: str) -> bool:
        return self.lora is not None and self.lora.has(name)

    def acquire_lora(self, name: str) -> LoRAAdapter:
        """Hold the current version of `name` for one request; ValueError if unknown."""
        return self._lora_manager().acquire(name)

    def release_lora(self, adapter: LoRAAdapter) -> None:
        self._lora_manager().release(adapter)

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, lora_name: str | None = None,
                    lora: LoRAAdapter | None = None) -> None:
        """Queue a request, on the base model or on adapter `lora_name`. `lora` is an adapter
        version already held by `acquire_lora`: this call takes it over (released on failure)."""
        if lora is None and lora_name is not None:
            lora = self.acquire_lora(lora_name)
        try:
            self._add_request(request_id, prompt_token_ids, params, prompt, lora)
        except BaseException:
            if lora is not None:
                self.release_lora(lora)
            raise
        if lora is not None:
            lora.requests_served += 1

    def _add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     prompt: str | None, lora: LoRAAdapter | None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests); retry later")
        req = _RequestState(request_id, prompt, list(prompt_token_ids), lora)
        extra_key = lora.cache_key if lora is not None else None
        max_tokens = params.max_tokens or (self.max_model_len - len(prompt_token_ids))
        stop_ids = [] if params.ignore_eos else sorted(self.tokenizer.eos_token_ids)
        stop_ids += [t for t in params.stop_token_ids if t not in stop_ids]
        leader: Sequence | None = None
        for i in range(params.n):
            seq = Sequence(f"{request_id}#{i}", prompt_token_ids, max_tokens=max_tokens, leader=leader,
                           extra_key=extra_key, lora=lora)
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device)
                gen.manual_seed((params.seed + i) % (2**63))
            row = SamplingRow(params, req.prompt_token_ids, [], gen, stop_ids)
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, params.skip_special_tokens)
            stops = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
            seq.payload = _SeqState(req, i, params, row, detok, stops)
            req.seqs.append(seq)
            leader = leader or seq
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.prompt_tokens_total += len(prompt_token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish every sequence of the request with reason 'abort' and free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        outputs = []
        for seq in req.seqs:
            if seq.status is not SeqStatus.FINISHED:
                self.scheduler.finish(seq)
                st: _SeqState = seq.payload
                st.finish_reason = FinishReason.ABORT.value
                outputs.append(CompletionOutput(st.index, finish_reason=st.finish_reason))
        req.metrics.finished_time = time.time()
        self._release(req)
        return RequestOutput(req.request_id, req.prompt_token_ids, outputs, True, req.prompt,
                             req.num_cached_tokens, req.metrics)

    def _release(self, req: _RequestState) -> None:
        if req.lora is not None:
            adapter, req.lora = req.lora, None
            self.release_lora(adapter)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        now = time.time()
        for item in sched.scheduled:
            req = item.seq.payload.request
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.num_cached_tokens = item.seq.num_computed_tokens
        logits, sampling = self.runner.execute(sched)
        self.scheduler.update(sched)
        if logits is None:
            return []
        result = self.sampler(logits, [item.seq.payload.row for item in sampling])
        now = time.time()
        deltas: dict[str, list[CompletionOutput]] = {}
        for item, token, lp in zip(sampling, result.token_ids, result.logprobs):
            seq = item.seq
            delta = self._append_token(seq, token, lp)
            req = seq.payload.request
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            deltas.setdefault(req.request_id, []).append(delta)
        outputs = []
        for request_id, completions in deltas.items():
            req = self.requests[request_id]
            finished = req.finished
            if finished:
                req.metrics.finished_time = now
                del self.requests[request_id]
                self._release(req)
            outputs.append(RequestOutput(request_id, req.prompt_token_ids, completions, finished, req.prompt,
                                         req.num_cached_tokens, req.metrics))
        return outputs

    def _append_token(self, seq: Sequence, token: int, lp) -> CompletionOutput:
        st: _SeqState = seq.payload
        params = st.params
        seq.token_ids.append(token)
        st.row.output_token_ids.append(token)
        self.generation_tokens_total += 1
        n_out = seq.num_output_tokens

        logprobs = None
        if lp is not None:
            value, rank, top = lp
            st.logprob_sum += value
            entry = {token: Logprob(value, rank, self.tokenizer.token_text(token))}
            for i, (tid, v) in enumerate(top):
                if tid not in entry:
                    entry[tid] = Logprob(v, i + 1, self.tokenizer.token_text(tid))
            logprobs = [entry]

        new_text = st.detok.add(token)
        text = new_text
        finish: str | None = None
        can_stop = n_out >= params.min_tokens  # no stop of any kind before min_tokens
        if can_stop and token in st.row.stop_ids:
            finish = FinishReason.STOP.value
            is_eos = token in self.tokenizer.eos_token_ids and token not in params.stop_token_ids
            st.stop_reason = None if is_eos else token
            # Release text held back for a possible stop string; the stop token's own text is
            # part of the output only when asked for.
            text = st.stops.flush() if st.stops is not None else ""
            if params.include_stop_str_in_output:
                text += new_text
        elif st.stops is not None and can_stop:
            text, matched = st.stops.feed(new_text)
            if matched is not None:
                finish, st.stop_reason = FinishReason.STOP.value, matched
        if finish is None and (n_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len):
            finish = FinishReason.LENGTH.value
            if st.stops is not None:
                text += st.stops.flush()
        if finish is not None:
            if finish == FinishReason.LENGTH.value or st.stop_reason is None:
                text += st.detok.flush()  # a character cut off mid-way still shows up
            st.finish_reason = finish
            self.scheduler.finish(seq)
        return CompletionOutput(
            st.index, text, [token], logprobs,
            st.logprob_sum if params.logprobs is not None else None,
            st.finish_reason, st.stop_reason,
        )

    # ---- stats ----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage(),
            num_preemptions_total=self.scheduler.num_preemptions,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_kv_blocks=bm.num_blocks,
        )


def _model_max_len(folder: Path) -> int:
    import json

    cfg = json.loads((folder / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or 2048)
