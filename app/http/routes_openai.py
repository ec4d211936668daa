"""The OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions, /tokenize, /detokenize.

Handlers are thin: check the model, admit the request, prepare the prompt (completions.py,
chat.py), run it on the engine (generation.py) and answer whole or as SSE (sse.py).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from litestar import Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from app.http.chat import chat_events, chat_response, prepare_chat, render_chat, template_kwargs, template_messages
from app.http.completions import (
    collect_choices,
    completion_events,
    completion_response,
    off_loop_if_large,
    prepare_completion,
)
from app.http.errors import APIError, bad_request
from app.http.generation import ClientDisconnected, EngineStreams, RequestLog, race_disconnect
from app.http.outputs import TokenTexts
from app.http.request_id import request_id_of
from app.http.sampling import check_token_ids, reject_unsupported
from app.http.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from app.http.sse import SSEResponse
from app.http.state import Admission, ServerState

_engine_ids = itertools.count()

ERROR_RESPONSES = {
    400: ResponseSpec(ErrorResponse, description="Invalid request: the message says what to change"),
    401: ResponseSpec(ErrorResponse, description="Missing or wrong API key"),
    404: ResponseSpec(ErrorResponse, description="Unknown model"),
    413: ResponseSpec(ErrorResponse, description="Request body too large"),
    503: ResponseSpec(ErrorResponse, description="Loading, shutting down or at capacity; see Retry-After"),
}
_STREAM_NOTE = "With `stream: true` the answer is `text/event-stream`: chunks of this object, then `data: [DONE]`."


def server_state(request: Request) -> ServerState:
    return request.app.state.server


@get("/v1/models", summary="List the served models and the loaded LoRA adapters", responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    state = server_state(request)
    max_len = state.engine.max_model_len if state.engine is not None else state.config.max_model_len
    cards = [
        ModelCard(id=name, created=state.created, root=state.model_root, max_model_len=max_len)
        for name in state.served_names
    ]
    # As vLLM lists them: the adapter's name, its path as root, the base model as parent.
    cards += [
        ModelCard(id=info.name, created=int(info.loaded_at), root=info.path, parent=state.model_name,
                  max_model_len=max_len)
        for info in sorted(state.loras(), key=lambda info: info.name)
    ]  # fmt: skip
    return ModelList(data=cards)


async def _generate(
    request: Request,
    *,
    endpoint: str,
    model: str | None,
    stream: bool,
    prefix: str,
    prepare: Callable[[Any], Awaitable[tuple[list[tuple[list[int], Any]], Any]]],
    answer: Callable[[str, EngineStreams, Any], Awaitable[Any]],
    events: Callable[[str, EngineStreams, Any], AsyncIterator[bytes]],
) -> Any:
    """The shared life of a generation request: admit, prepare, start, answer whole or streamed, log."""
    state = server_state(request)
    rid = request_id_of(request)
    log = RequestLog(rid, endpoint, model or state.model_name)
    log.stream = stream
    admission: Admission | None = None
    streams: EngineStreams | None = None
    handed_over = False
    try:
        adapter = log.adapter = state.resolve_model(model)
        admission = state.admit()
        prompts, extra = await prepare(state.engine)
        response_id = f"{prefix}-{rid}"
        engine_requests = [(f"{response_id}-{next(_engine_ids)}", ids, params) for ids, params in prompts]
        streams = EngineStreams(state.engine, state.metrics, engine_requests, lora_name=adapter)
        log.streams = streams
        admission.streams = streams
        try:
            await race_disconnect(request.receive, streams.start())
        except APIError as exc:
            if adapter is not None and exc.status == 400 and not state.engine.has_lora(adapter):
                state.resolve_model(model)  # unloaded meanwhile: raises the 404 a new request would get
            raise
        if stream:
            owned_streams, owned_admission = streams, admission

            async def on_close(status: int) -> None:
                await owned_streams.close()
                owned_admission.release()
                log.emit(status)

            handed_over = True
            return SSEResponse(events(response_id, streams, extra), on_close)
        result = await race_disconnect(request.receive, answer(response_id, streams, extra))
        log.emit(200)
        return result
    except APIError as exc:
        log.emit(exc.status, exc.message)
        raise
    except ClientDisconnected:
        log.emit(499, "client disconnected")
        return Response(b"", status_code=499)
    except Exception as exc:
        log.emit(500, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if not handed_over:
            if streams is not None:
                await streams.close()
            if admission is not None:
                admission.release()


@post(
    "/v1/completions",
    summary="Create a completion",
    description=_STREAM_NOTE,
    status_code=200,
    responses=ERROR_RESPONSES,
)
async def create_completion(request: Request, data: JSONBody[CompletionRequest]) -> CompletionResponse:
    state = server_state(request)
    created = int(time.time())
    model = state.model_name if data.model is None else data.model

    async def prepare(engine: Any) -> tuple[list[tuple[list[int], Any]], Any]:
        reject_unsupported(data)
        prepared = await prepare_completion(engine, data)
        return list(zip(prepared.prompt_ids, prepared.params)), prepared

    async def answer(response_id: str, streams: EngineStreams, prepared: Any) -> CompletionResponse:
        choices = await collect_choices(streams, data.n, len(prepared.prompt_ids))
        texts = TokenTexts(state.engine.tokenizer)
        return completion_response(response_id, created, model, data, prepared, choices, streams, texts)

    def events(response_id: str, streams: EngineStreams, prepared: Any) -> AsyncIterator[bytes]:
        texts = TokenTexts(state.engine.tokenizer)
        return completion_events(response_id, created, model, data, prepared, streams, texts)

    return await _generate(
        request, endpoint="completions", model=data.model, stream=data.stream, prefix="cmpl",
        prepare=prepare, answer=answer, events=events,
    )  # fmt: skip


@post(
    "/v1/chat/completions",
    summary="Create a chat completion",
    description=_STREAM_NOTE,
    status_code=200,
    responses=ERROR_RESPONSES,
)
async def create_chat_completion(request: Request, data: JSONBody[ChatCompletionRequest]) -> ChatCompletionResponse:
    state = server_state(request)
    created = int(time.time())
    model = state.model_name if data.model is None else data.model

    async def prepare(engine: Any) -> tuple[list[tuple[list[int], Any]], Any]:
        reject_unsupported(data)
        prepared = await prepare_chat(engine, data)
        return [(prepared.prompt_ids, prepared.params)], prepared

    async def answer(response_id: str, streams: EngineStreams, prepared: Any) -> ChatCompletionResponse:
        choices = await collect_choices(streams, data.n, 1)
        texts = TokenTexts(state.engine.tokenizer)
        return chat_response(response_id, created, model, data, choices, streams, texts)

    def events(response_id: str, streams: EngineStreams, prepared: Any) -> AsyncIterator[bytes]:
        return chat_events(response_id, created, model, data, streams, TokenTexts(state.engine.tokenizer))

    return await _generate(
        request, endpoint="chat", model=data.model, stream=data.stream, prefix="chatcmpl",
        prepare=prepare, answer=answer, events=events,
    )  # fmt: skip


@post("/tokenize", summary="Tokenize a prompt or a chat (as vLLM does)", status_code=200, responses=ERROR_RESPONSES)
async def tokenize(request: Request, data: JSONBody[TokenizeRequest]) -> TokenizeResponse:
    state = server_state(request)
    state.check_model(data.model)
    engine = state.require_engine()
    tokenizer = engine.tokenizer
    if (data.prompt is None) == (data.messages is None):
        raise bad_request("Send exactly one of `prompt` and `messages`")
    if data.prompt is not None:
        add_special = True if data.add_special_tokens is None else data.add_special_tokens
        prompt = data.prompt
        ids = await off_loop_if_large(len(prompt), lambda: tokenizer.encode(prompt, add_special_tokens=add_special))
    else:
        if data.add_generation_prompt and data.continue_final_message:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true")
        messages = template_messages(data.messages or [])
        kwargs = template_kwargs(data)  # type: ignore[arg-type]
        add_special = bool(data.add_special_tokens)

        def encode() -> list[int]:
            text = render_chat(tokenizer, messages, data.add_generation_prompt, data.continue_final_message, **kwargs)
            return tokenizer.encode(text, add_special_tokens=add_special)

        ids = await off_loop_if_large(sum(len(m["content"]) for m in messages), encode)
    answer = TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)
    if data.return_token_strs:
        answer.token_strs = [tokenizer.token_text(t) for t in ids]
    return answer


@post("/detokenize", summary="Turn token ids back into text", status_code=200, responses=ERROR_RESPONSES)
async def detokenize(request: Request, data: JSONBody[DetokenizeRequest]) -> DetokenizeResponse:
    state = server_state(request)
    state.check_model(data.model)
    engine = state.require_engine()
    check_token_ids(data.tokens, engine.vocab_size, param="tokens")
    tokens = data.tokens
    text = await off_loop_if_large(len(tokens), lambda: engine.tokenizer.decode(tokens, skip_special_tokens=False))
    return DetokenizeResponse(prompt=text)


ROUTES = [list_models, create_completion, create_chat_completion, tokenize, detokenize]
