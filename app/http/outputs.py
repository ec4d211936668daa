"""Turning the engine's output deltas into OpenAI choices, logprobs and usage (shared by both APIs)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from app.engine.request import CompletionOutput, Logprob
from app.http.schemas import (
    ChatLogprobs,
    ChatLogprobToken,
    CompletionLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)

# JSON has no -inf; vLLM reports impossible tokens as -9999.0 too.
MIN_LOGPROB = -9999.0


@dataclasses.dataclass
class Choice:
    """One sequence's output so far, accumulated from deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = str(getattr(delta.finish_reason, "value", delta.finish_reason))
            self.stop_reason = delta.stop_reason


def finish_reason_of(delta: CompletionOutput) -> str | None:
    reason = delta.finish_reason
    return None if reason is None else str(getattr(reason, "value", reason))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def _clamp(value: float) -> float:
    return value if value == value and value > MIN_LOGPROB else MIN_LOGPROB  # NaN and -inf too


class TokenTexts:
    """The text of a token id as logprobs report it (the engine's decoded_token when it gave one)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __call__(self, token_id: int, logprob: Logprob | None = None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self._tokenizer.token_text(token_id)


def token_bytes(text: str) -> list[int]:
    """The UTF-8 bytes of a token's text; "bytes:\\xe4\\xbd" (half a character) gives the raw bytes."""
    if text.startswith("bytes:"):
        try:
            return list(bytes(int(h, 16) for h in text[len("bytes:") :].split("\\x")[1:]))
        except ValueError:
            pass
    return list(text.encode("utf-8"))


def _ranked(position: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The top-k entries of one position, best first."""
    entries = sorted(
        position.items(), key=lambda item: (item[1].rank if item[1].rank is not None else 1 << 30, -item[1].logprob)
    )
    return entries[:k]


def completion_logprobs(
    token_ids: Iterable[int],
    positions: Iterable[dict[int, Logprob]],
    texts: TokenTexts,
    k: int,
    text_offset: int,
) -> tuple[CompletionLogprobs, int]:
    """The legacy completions logprobs of some tokens, and the text offset after them."""
    result = CompletionLogprobs()
    for token_id, position in zip(token_ids, positions):
        sampled = position.get(token_id)
        token = texts(token_id, sampled)
        result.tokens.append(token)
        result.token_logprobs.append(_clamp(sampled.logprob) if sampled else None)
        top = {texts(t, lp): _clamp(lp.logprob) for t, lp in _ranked(position, k)}
        if sampled is not None:
            top.setdefault(token, _clamp(sampled.logprob))
        result.top_logprobs.append(top)
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result, text_offset


def chat_logprobs(
    token_ids: Iterable[int], positions: Iterable[dict[int, Logprob]], texts: TokenTexts, k: int
) -> ChatLogprobs:
    content = []
    for token_id, position in zip(token_ids, positions):
        sampled = position.get(token_id)
        token = texts(token_id, sampled)
        top = []
        for t, lp in _ranked(position, k):
            text = texts(t, lp)
            top.append(TopLogprob(token=text, logprob=_clamp(lp.logprob), bytes=token_bytes(text)))
        content.append(
            ChatLogprobToken(
                token=token,
                logprob=_clamp(sampled.logprob) if sampled else MIN_LOGPROB,
                bytes=token_bytes(token),
                top_logprobs=top,
            )
        )
    return ChatLogprobs(content=content)
