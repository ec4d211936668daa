"""A scripted OpenAI-compatible server on raw asyncio, for testing the benchmark's arithmetic.

It answers /v1/completions and /v1/chat/completions (streamed or not), /tokenize, /detokenize and
/v1/models. A stream waits `ttft` seconds, sends the first output chunk, then waits each of `gaps`
before the next one; every output chunk carries `tokens_per_chunk` tokens, and usage (when asked
for) reports their sum. Chat streams start with a role-only chunk sent at once (as OpenAI's and
ours do), which must not count as the first token.

What it actually did is in `exchanges`, one `Exchange` per generation request, in
`time.perf_counter()` seconds (the client's clock when both run in one process): when the request
arrived, when the response head, each output chunk and the last event (`[DONE]`, or the whole
JSON answer) were written. A busy machine makes the sleeps overshoot, so tests of the client
compare its measurements with these times, not with the script's.

Faults: `status` answers every generation request with that HTTP status; `die_after_chunks=k`
makes the server cut every connection and stop listening once any stream has sent k output
chunks (a crash mid-run); `omit_usage` leaves usage out of the stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Exchange:
    """One generation request as the server saw it; times are perf_counter() at each event."""

    request: dict[str, Any]
    received: float  # the request line arrived (read by the server)
    head: float | None = None  # the response head was written
    chunks: list[float] = field(default_factory=list)  # each output-carrying chunk was written
    end: float | None = None  # the last event (streams: `data: [DONE]`) or the whole answer was written


@dataclass
class Script:
    ttft: float = 0.05
    gaps: list[float] = field(default_factory=lambda: [0.02, 0.02, 0.02])
    tokens_per_chunk: int = 1
    status: int = 200
    die_after_chunks: int | None = None
    omit_usage: bool = False
    prompt_tokens: int = 7


class FakeOpenAIServer:
    def __init__(self, script: Script | None = None, api_key: str | None = None) -> None:
        self.script = script or Script()
        self.api_key = api_key
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        self.exchanges: list[Exchange] = []  # per generation request, in arrival order
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._chunks_total = 0
        self._dead = False
        self._vocab: dict[str, int] = {}
        self._words: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeOpenAIServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._dead = True
        for writer in list(self._writers):
            writer.transport.abort()
        if self.server is not None:
            self.server.close()
        current = asyncio.current_task()
        others = [task for task in self._tasks if task is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def __aenter__(self) -> FakeOpenAIServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- HTTP --------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while not self._dead:
                line = await reader.readline()
                received = time.perf_counter()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                data = json.loads(body) if body else {}
                if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
                    await self._json(writer, 401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                    continue
                await self._route(writer, method, path, data, received)
        except (ConnectionError, asyncio.IncompleteReadError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.transport.abort()

    async def _json(self, writer: asyncio.StreamWriter, status: int, obj: Any) -> float:
        """Write a JSON answer; returns when it was written."""
        payload = json.dumps(obj).encode()
        head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
        writer.write(head.encode() + payload)
        written = time.perf_counter()
        await writer.drain()
        return written

    async def _route(self, writer: asyncio.StreamWriter, method: str, path: str, data: dict, received: float) -> None:
        if path == "/v1/models":
            await self._json(writer, 200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        elif path == "/tokenize":
            tokens = self._encode(data.get("prompt", ""))
            await self._json(writer, 200, {"count": len(tokens), "max_model_len": 4096, "tokens": tokens})
        elif path == "/detokenize":
            await self._json(writer, 200, {"prompt": " ".join(self._words[t] for t in data["tokens"])})
        elif path in ("/v1/completions", "/v1/chat/completions"):
            self.requests.append(data)
            exchange = Exchange(data, received)
            self.exchanges.append(exchange)
            if self.script.status != 200:
                error = {"error": {"message": "scripted failure", "type": "server_error"}}
                exchange.head = exchange.end = await self._json(writer, self.script.status, error)
            elif data.get("stream"):
                await self._stream(writer, path.endswith("chat/completions"), data, exchange)
            else:
                await self._whole(writer, path.endswith("chat/completions"), data, exchange)
        else:
            await self._json(writer, 404, {"error": {"message": "no route", "type": "invalid_request_error"}})

    def _encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            if word not in self._vocab:
                self._vocab[word] = len(self._words)
                self._words.append(word)
            out.append(self._vocab[word])
        return out

    def _completion_tokens(self) -> int:
        return (1 + len(self.script.gaps)) * self.script.tokens_per_chunk

    def _usage(self) -> dict[str, int]:
        n = self._completion_tokens()
        return {"prompt_tokens": self.script.prompt_tokens, "completion_tokens": n, "total_tokens": n + self.script.prompt_tokens}

    async def _whole(self, writer: asyncio.StreamWriter, chat: bool, data: dict, exchange: Exchange) -> None:
        await asyncio.sleep(self.script.ttft + sum(self.script.gaps))
        text = "tok " * self._completion_tokens()
        choice = {"index": 0, "finish_reason": "length"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        answer = {"id": "x", "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                  "usage": self._usage()}  # fmt: skip
        exchange.head = exchange.end = await self._json(writer, 200, answer)

    async def _stream(self, writer: asyncio.StreamWriter, chat: bool, data: dict, exchange: Exchange) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        exchange.head = time.perf_counter()

        async def event(obj: Any) -> float:
            """Write one SSE event as one HTTP chunk; returns when it was written."""
            payload = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            written = time.perf_counter()
            await writer.drain()
            return written

        include_usage = bool((data.get("stream_options") or {}).get("include_usage")) and not self.script.omit_usage
        usage_field = {"usage": None} if include_usage else {}
        kind = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            await event({"id": "x", "object": kind, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], **usage_field})
        delays = [self.script.ttft, *self.script.gaps]
        piece = "tok " * self.script.tokens_per_chunk
        for i, delay in enumerate(delays):
            await asyncio.sleep(delay)
            last = i == len(delays) - 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last and not chat else None}
            choice.update({"delta": {"content": piece}} if chat else {"text": piece})
            exchange.chunks.append(await event({"id": "x", "object": kind, "choices": [choice], **usage_field}))
            self._chunks_total += 1
            if self.script.die_after_chunks is not None and self._chunks_total >= self.script.die_after_chunks:
                await self.stop()
                return
        if chat:
            await event({"id": "x", "object": kind, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], **usage_field})
        if include_usage:
            await event({"id": "x", "object": kind, "choices": [], "usage": self._usage()})
        exchange.end = await event(b"[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
