"""POST /v1/chat/completions: messages through the chat template, outputs to OpenAI's chat shapes."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from msgspec import UNSET

from app.engine.request import SamplingParams
from app.http.completions import off_loop_if_large, sse_event
from app.http.errors import bad_request, encode_error_event
from app.http.generation import EngineStreams
from app.http.outputs import Choice, TokenTexts, chat_logprobs, finish_reason_of, usage
from app.http.sampling import build_params, fit_to_context
from app.http.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Delta,
)
from app.http.sse import DONE

logger = logging.getLogger("app.http")

# chat_template_kwargs may not override what the server itself passes to the template.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "conversation", "tokenize", "add_generation_prompt", "continue_final_message", "chat_template",
     "return_dict", "return_tensors", "tools", "documents"}
)  # fmt: skip


@dataclasses.dataclass
class PreparedChat:
    prompt_ids: list[int]
    params: SamplingParams


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template reads them; 400 for what a text-only, tool-less server can't take."""
    result = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role in ("tool", "function"):
            raise bad_request(
                f"{where}: role {message.role!r} needs tool calling, which is not supported yet",
                param=f"{where}.role",
                code="unsupported_parameter",
            )
        if message.tool_calls or message.function_call is not None:
            raise bad_request(
                f"{where}: tool calls are not supported yet; send the assistant's text content only",
                param=f"{where}.tool_calls",
                code="unsupported_parameter",
            )
        if message.audio is not None:
            raise bad_request(f"{where}: audio is not supported", param=f"{where}.audio")
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type not in ("text", "refusal"):
                    raise bad_request(
                        f"{where}.content[{j}]: content of type {part.type!r} is not supported; "
                        "this model reads text only",
                        param=f"{where}.content[{j}].type",
                        code="unsupported_parameter",
                    )
                texts.append(part.text if part.type == "text" else part.refusal or "")
            content = "\n".join(t or "" for t in texts)
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
        entry["content"] = content or ""
        if message.name is not None:
            entry["name"] = message.name
        result.append(entry)
    return result


def template_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    extra = dict(req.chat_template_kwargs or {})
    clash = sorted(RESERVED_TEMPLATE_KWARGS & extra.keys())
    if clash:
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(clash)}; use the request fields instead",
            param="chat_template_kwargs",
        )
    return extra


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    continue_final_message: bool = False,
    **kwargs: Any,
) -> str:
    """The chat template applied; template errors (say, roles out of order) become a 400.

    With `continue_final_message` the text stops right after the last message's content, so the
    model continues it (what transformers does: templates know nothing of it).
    """
    try:
        import jinja2

        template_errors: tuple[type[BaseException], ...] = (jinja2.TemplateError, ValueError, TypeError, KeyError)
    except ImportError:  # pragma: no cover
        template_errors = (ValueError, TypeError, KeyError)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except template_errors as exc:
        raise bad_request(f"The chat template could not render these messages: {exc}", param="messages") from None
    if continue_final_message:
        final = messages[-1]["content"]
        end = text.rfind(final) if final else -1
        if end < 0 and final.strip():
            final = final.strip()
            end = text.rfind(final)
        if end < 0:
            raise bad_request(
                "continue_final_message needs a final message with content the template keeps",
                param="continue_final_message",
            )
        text = text[: end + len(final)]
    return text


async def prepare_chat(engine: Any, req: ChatCompletionRequest) -> PreparedChat:
    messages = template_messages(req.messages)
    kwargs = template_kwargs(req)
    tokenizer = engine.tokenizer
    size = sum(len(m["content"]) for m in messages)

    def encode() -> list[int]:
        text = render_chat(tokenizer, messages, req.add_generation_prompt, req.continue_final_message, **kwargs)
        return tokenizer.encode(text, add_special_tokens=req.add_special_tokens)

    prompt_ids = await off_loop_if_large(size, encode)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = build_params(req, logprobs=logprobs, vocab_size=engine.vocab_size)
    return PreparedChat(prompt_ids, fit_to_context(params, len(prompt_ids), engine.max_model_len))


def chat_response(
    response_id: str,
    created: int,
    model: str,
    req: ChatCompletionRequest,
    choices: list[Choice],
    streams: EngineStreams,
    texts: TokenTexts,
) -> ChatCompletionResponse:
    out = []
    for choice in choices:
        logprobs = None
        if req.logprobs:
            logprobs = chat_logprobs(choice.token_ids, choice.logprobs, texts, req.top_logprobs or 0)
        out.append(
            ChatChoice(
                index=choice.index,
                message=AssistantMessage(content=choice.text),
                logprobs=logprobs,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
            )
        )
    return ChatCompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=out,
        usage=usage(streams.prompt_tokens, streams.completion_tokens, streams.cached_tokens),
    )


async def chat_events(
    response_id: str,
    created: int,
    model: str,
    req: ChatCompletionRequest,
    streams: EngineStreams,
    texts: TokenTexts,
) -> AsyncIterator[bytes]:
    """chat.completion.chunk events as OpenAI sends them: role first, content deltas, finish, [DONE]."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunk_usage = None if include_usage else UNSET

    def chunk(choice: ChatChunkChoice) -> bytes:
        return sse_event(ChatCompletionChunk(response_id, created, model, [choice], usage=chunk_usage))

    try:
        for index in range(req.n):
            yield chunk(ChatChunkChoice(index=index, delta=Delta(role="assistant", content="")))
        async for _, output in streams:
            for delta in output.outputs:
                logprobs = None
                if req.logprobs and delta.token_ids:
                    logprobs = chat_logprobs(delta.token_ids, delta.logprobs or [], texts, req.top_logprobs or 0)
                if delta.text or logprobs is not None:
                    yield chunk(ChatChunkChoice(index=delta.index, delta=Delta(content=delta.text), logprobs=logprobs))
                reason = finish_reason_of(delta)
                if reason is not None:
                    yield chunk(
                        ChatChunkChoice(
                            index=delta.index, delta=Delta(), finish_reason=reason, stop_reason=delta.stop_reason
                        )
                    )
        if include_usage:
            final = usage(streams.prompt_tokens, streams.completion_tokens, streams.cached_tokens)
            yield sse_event(ChatCompletionChunk(response_id, created, model, [], usage=final))
    except Exception as exc:  # noqa: BLE001 - a fault mid-stream is an error event, then [DONE]
        logger.exception("chat stream %s failed", response_id)
        yield encode_error_event(500, f"Internal error while generating: {type(exc).__name__}: {exc}")
    yield DONE
