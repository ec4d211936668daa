"""From an OpenAI request to the engine's SamplingParams, with every check that can answer 400 first.

Parameters we do not implement yet are rejected here with a message that says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from app.engine.request import SamplingParams
from app.http.errors import APIError, bad_request
from app.http.schemas import ChatCompletionRequest, CompletionRequest, _SamplingFields


def reject_unsupported(req: _SamplingFields) -> None:
    """400 for parameters we know but do not serve yet: never silently ignore them."""
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options can only be set when stream is true", param="stream_options")
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        raise bad_request(
            f"response_format type {fmt.type!r} is not supported yet; omit response_format or use type 'text'",
            param="response_format",
            code="unsupported_parameter",
        )
    if isinstance(req, ChatCompletionRequest):
        if req.tools:
            raise _unsupported("tools", "tool calling is not supported yet; remove `tools`")
        if req.functions:
            raise _unsupported("functions", "function calling is not supported yet; remove `functions`")
        if req.tool_choice not in (None, "none", "auto"):
            raise _unsupported("tool_choice", "tool calling is not supported yet; remove `tool_choice`")
        if req.function_call not in (None, "none", "auto"):
            raise _unsupported("function_call", "function calling is not supported yet; remove `function_call`")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        if req.add_generation_prompt and req.continue_final_message:
            raise bad_request(
                "continue_final_message and add_generation_prompt cannot both be true; "
                "set add_generation_prompt to false to continue the final message",
                param="continue_final_message",
            )
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise _unsupported("suffix", "suffix (fill-in-the-middle) is not supported; remove `suffix`")
        if req.best_of is not None and req.best_of != req.n:
            raise _unsupported("best_of", "best_of other than n is not supported; remove `best_of`")
        if req.echo and req.logprobs is not None:
            raise _unsupported(
                "echo", "echo together with logprobs (prompt logprobs) is not supported yet; drop one of them"
            )


def _unsupported(param: str, message: str) -> APIError:
    return bad_request(message, param=param, code="unsupported_parameter")


def logit_bias_ids(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    result = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(
                f"logit_bias keys must be token ids written as strings, like \"1234\"; got {key!r}",
                param="logit_bias",
            ) from None
        result[token] = float(value)
    return result


def max_tokens_of(req: _SamplingFields) -> int | None:
    if isinstance(req, ChatCompletionRequest):
        return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return req.max_tokens  # type: ignore[attr-defined]


def build_params(req: _SamplingFields, *, logprobs: int | None, vocab_size: int) -> SamplingParams:
    """The engine's SamplingParams for this request; ValueError from validation becomes a 400."""
    fields: dict[str, Any] = {
        "n": req.n,
        "seed": req.seed,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "logit_bias": logit_bias_ids(req.logit_bias),
        "max_tokens": max_tokens_of(req),
        "min_tokens": req.min_tokens,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "logprobs": logprobs,
    }
    optional = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    try:
        params = SamplingParams(**fields)
        params.validate(vocab_size)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    return params


def fit_to_context(
    params: SamplingParams, prompt_len: int, max_model_len: int, *, what: str = "messages"
) -> SamplingParams:
    """Check prompt + max_tokens against the context; an unset max_tokens takes what is left (a copy)."""
    params = dataclasses.replace(params)
    if prompt_len == 0:
        raise bad_request(f"The {what} encode to zero tokens; send a non-empty prompt", param="prompt")
    if params.max_tokens is None:
        remaining = max_model_len - prompt_len
        if remaining < 1:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, your {what} "
                f"resulted in {prompt_len} tokens, which leaves no room for a completion. "
                f"Please reduce the length of the {what}.",
                code="context_length_exceeded",
            )
        params.max_tokens = remaining
    elif prompt_len + params.max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the {what}, {params.max_tokens} in the "
            f"completion). Please reduce the length of the {what} or completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if params.min_tokens > params.max_tokens:
        raise bad_request(
            f"min_tokens ({params.min_tokens}) is more than max_tokens ({params.max_tokens}); lower min_tokens",
            param="min_tokens",
        )
    return params


def check_token_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    for token in ids:
        if not 0 <= token < vocab_size:
            raise bad_request(
                f"Token id {token} in `{param}` is outside the vocabulary (0..{vocab_size - 1})", param=param
            )
