"""POST /v1/completions: prompts to token ids, and engine outputs to OpenAI's text_completion shape."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec
from msgspec import UNSET

from app.engine.request import SamplingParams
from app.http.errors import bad_request, encode_error_event
from app.http.generation import EngineStreams
from app.http.outputs import Choice, TokenTexts, completion_logprobs, finish_reason_of, usage
from app.http.schemas import MAX_PROMPTS, CompletionChoice, CompletionRequest, CompletionResponse
from app.http.sampling import build_params, check_token_ids, fit_to_context
from app.http.sse import DONE

logger = logging.getLogger("app.http")
T = TypeVar("T")

# Inputs longer than this are tokenized in a worker thread, off the event loop.
INLINE_TOKENIZE_CHARS = 4096


async def off_loop_if_large(size: int, fn: Callable[[], T]) -> T:
    if size > INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(fn)
    return fn()


def sse_event(payload: Any) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


@dataclasses.dataclass
class PreparedCompletion:
    prompt_ids: list[list[int]]
    params: list[SamplingParams]  # one per prompt (max_tokens fitted to each)
    echo_texts: list[str] | None


def split_prompts(prompt: str | list[Any]) -> list[str | list[int]]:
    """OpenAI's four prompt forms (str, [str], [int], [[int]]) as a list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise bad_request(
        "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids; "
        "do not mix them",
        param="prompt",
    )


async def prepare_completion(engine: Any, req: CompletionRequest) -> PreparedCompletion:
    prompts = split_prompts(req.prompt)
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"At most {MAX_PROMPTS} prompts per request; got {len(prompts)}", param="prompt")
    tokenizer = engine.tokenizer
    size = sum(len(p) for p in prompts if isinstance(p, str))

    def encode_all() -> list[list[int]]:
        return [
            tokenizer.encode(p, add_special_tokens=req.add_special_tokens) if isinstance(p, str) else p
            for p in prompts
        ]

    prompt_ids = await off_loop_if_large(size, encode_all)
    for ids in prompt_ids:
        check_token_ids(ids, engine.vocab_size)
    params = build_params(req, logprobs=req.logprobs, vocab_size=engine.vocab_size)
    fitted = [fit_to_context(params, len(ids), engine.max_model_len, what="prompt") for ids in prompt_ids]
    echo_texts = None
    if req.echo:
        echo_texts = [
            p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False) for p in prompts
        ]
    return PreparedCompletion(prompt_ids, fitted, echo_texts)


async def collect_choices(streams: EngineStreams, n: int, num_prompts: int) -> list[Choice]:
    choices = [Choice(index=i) for i in range(n * num_prompts)]
    async for prompt_index, output in streams:
        for delta in output.outputs:
            choices[prompt_index * n + delta.index].add(delta)
    return choices


def completion_response(
    response_id: str,
    created: int,
    model: str,
    req: CompletionRequest,
    prepared: PreparedCompletion,
    choices: list[Choice],
    streams: EngineStreams,
    texts: TokenTexts,
) -> CompletionResponse:
    out = []
    for choice in choices:
        prefix = prepared.echo_texts[choice.index // req.n] if prepared.echo_texts else ""
        logprobs = None
        if req.logprobs is not None:
            logprobs, _ = completion_logprobs(choice.token_ids, choice.logprobs, texts, req.logprobs, len(prefix))
        out.append(
            CompletionChoice(
                index=choice.index,
                text=prefix + choice.text,
                logprobs=logprobs,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
            )
        )
    return CompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=out,
        usage=usage(streams.prompt_tokens, streams.completion_tokens, streams.cached_tokens),
    )


async def completion_events(
    response_id: str,
    created: int,
    model: str,
    req: CompletionRequest,
    prepared: PreparedCompletion,
    streams: EngineStreams,
    texts: TokenTexts,
) -> AsyncIterator[bytes]:
    """text_completion chunks, one choice each; a final usage chunk on request; then [DONE]."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunk_usage = None if include_usage else UNSET
    offsets: dict[int, int] = {}
    try:
        async for prompt_index, output in streams:
            for delta in output.outputs:
                index = prompt_index * req.n + delta.index
                text = delta.text
                if prepared.echo_texts and index not in offsets:
                    text = prepared.echo_texts[prompt_index] + text
                offsets.setdefault(index, 0)
                logprobs = None
                if req.logprobs is not None and delta.token_ids:
                    logprobs, offsets[index] = completion_logprobs(
                        delta.token_ids, delta.logprobs or [], texts, req.logprobs, offsets[index]
                    )
                reason = finish_reason_of(delta)
                if not text and reason is None and logprobs is None:
                    continue
                choice = CompletionChoice(
                    index=index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=reason,
                    stop_reason=delta.stop_reason if reason else None,
                )
                yield sse_event(CompletionResponse(response_id, created, model, [choice], usage=chunk_usage))
        if include_usage:
            final = usage(streams.prompt_tokens, streams.completion_tokens, streams.cached_tokens)
            yield sse_event(CompletionResponse(response_id, created, model, [], usage=final))
    except Exception as exc:  # noqa: BLE001 - a fault mid-stream is an error event, then [DONE]
        logger.exception("completion stream %s failed", response_id)
        yield encode_error_event(500, f"Internal error while generating: {type(exc).__name__}: {exc}")
    yield DONE
