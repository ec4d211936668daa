"""LLM: the offline API vLLM users know — `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

from app.engine.config import EngineConfig
from app.engine.core import EngineCore
from app.engine.lora import LoRARequest
from app.engine.request import CompletionOutput, RequestOutput, SamplingParams

PromptType = str | list[int] | dict


def resolve_model(model: str) -> str:
    """A folder path as is; a store name (e.g. smollm2-135m-instruct) through the model store."""
    if Path(model).is_dir():
        return str(Path(model))
    from app.hub.store import ModelStore
    from app.settings import get_settings

    return str(ModelStore(get_settings().store.home).resolve(model))


class LLM:
    def __init__(self, model: str, dtype: str = "auto", **engine_args) -> None:
        self.config = EngineConfig(model=resolve_model(model), dtype=dtype, **engine_args)
        self.engine = EngineCore(self.config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """One cumulative RequestOutput per prompt, in the order given. `lora_request`: one adapter
        for every prompt or one per prompt (None: the base model); loaded on first use, and
        reloaded when a name comes with another path."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"{len(params_list)} sampling params for {len(prompt_list)} prompts: give one or one per prompt")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_list = [lora_request] * len(prompt_list)
        else:
            lora_list = list(lora_request)
            if len(lora_list) != len(prompt_list):
                raise ValueError(f"{len(lora_list)} LoRA requests for {len(prompt_list)} prompts: give one or one per prompt")
        for lora in {r for r in lora_list if r is not None}:
            current = self.engine.lora.get(lora.name) if self.engine.lora is not None else None
            if current is None or current.path != str(lora.path):
                self.engine.add_lora(lora.name, str(lora.path))
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        for prompt, params, lora in zip(prompt_list, params_list, lora_list):
            text, ids = self._encode(prompt)
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, ids, params, prompt=text,
                                    lora_name=lora.name if lora is not None else None)
            order.append(request_id)
            results[request_id] = RequestOutput(
                request_id, ids, [CompletionOutput(i) for i in range(params.n)], prompt=text
            )
        bar = _progress(len(order)) if use_tqdm else None
        while self.engine.has_work():
            for delta in self.engine.step():
                _accumulate(results[delta.request_id], delta)
                if delta.finished and bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [results[r] for r in order]

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        return None, list(prompt)


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _accumulate(total: RequestOutput, delta: RequestOutput) -> None:
    for d in delta.outputs:
        out = total.outputs[d.index]
        out.text += d.text
        out.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            out.logprobs = (out.logprobs or []) + d.logprobs
        out.cumulative_logprob = d.cumulative_logprob
        out.finish_reason = d.finish_reason
        out.stop_reason = d.stop_reason
    total.finished = delta.finished
    total.num_cached_tokens = delta.num_cached_tokens
    total.metrics = delta.metrics


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")
