"""A small asyncio HTTP/1.1 client and the streaming request functions of the benchmark.

Why not httpx/aiohttp: the load generator shares the CPU with the server it measures (here, two
cores), so per-chunk client work must be as small as possible, and the project should not need
another runtime dependency for it. This client keeps connections alive in a pool, speaks
Content-Length, chunked and read-until-close bodies, and hands the caller each piece of the body
with the `time.perf_counter()` at which it arrived, which is what the metrics are built from.

`send_request` runs one completion or chat request (streamed or not) and returns a `RequestResult`
(see metrics.py); every failure (refused connection, HTTP error, error event in the stream, a
stream cut before `[DONE]`, a timeout) ends up in `result.error`, never as an exception.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bench.serving.metrics import RequestResult

USER_AGENT = "mxext-bench/1"


class HTTPError(Exception):
    """A transport-level failure (connection, framing, timeout), with a short message."""


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    _conn: _Connection | None = field(repr=False, default=None)
    _client: HTTPClient | None = field(repr=False, default=None)
    _done: bool = field(repr=False, default=False)

    async def iter_chunks(self) -> AsyncIterator[tuple[bytes, float]]:
        """The body as (bytes, arrival perf_counter) pieces; the connection is reused when it ends cleanly."""
        conn = self._conn
        assert conn is not None and not self._done, "the body can be read once"
        reader = conn.reader
        clean = False
        try:
            length = self.headers.get("content-length")
            chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
            if chunked:
                while True:
                    line = await reader.readline()
                    if not line.endswith(b"\n"):
                        raise HTTPError("connection closed in the middle of a chunked body")
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while (await reader.readline()).strip():  # trailers, then the empty line
                            pass
                        break
                    data = await reader.readexactly(size + 2)
                    yield data[:-2], time.perf_counter()
            elif length is not None:
                remaining = int(length)
                while remaining > 0:
                    data = await reader.read(min(remaining, 1 << 16))
                    if not data:
                        raise HTTPError(f"connection closed with {remaining} body bytes missing")
                    remaining -= len(data)
                    yield data, time.perf_counter()
            else:
                while data := await reader.read(1 << 16):
                    yield data, time.perf_counter()
                conn.keep_alive = False
            clean = True
        except asyncio.IncompleteReadError:
            raise HTTPError("connection closed in the middle of the body") from None
        except (ConnectionError, OSError) as exc:
            raise HTTPError(f"connection lost while reading the body: {type(exc).__name__}: {exc}") from None
        except ValueError:
            raise HTTPError("malformed chunked body") from None
        finally:
            self._done = True
            self._conn = None
            if self._client is not None:
                self._client.release(conn, reusable=clean and conn.keep_alive)

    async def read(self) -> bytes:
        return b"".join([data async for data, _ in self.iter_chunks()])

    async def json(self) -> Any:
        return json.loads(await self.read())

    def close(self) -> None:
        """Drop a response whose body will not be read (its connection is closed)."""
        if not self._done and self._conn is not None:
            self._done = True
            if self._client is not None:
                self._client.release(self._conn, reusable=False)
            self._conn = None


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    keep_alive: bool = True
    used: int = 0

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing a dead socket
            pass


class HTTPClient:
    """Keep-alive connections to one server (scheme://host:port), `request()` per call."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, max_idle: int = 256) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self.headers = dict(headers or {})
        self._host_header = parts.netloc.rsplit("@", 1)[-1]
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self._closed = False

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self._ssl, limit=1 << 20)
        except (ConnectionError, OSError) as exc:
            raise HTTPError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        return _Connection(reader, writer)

    def release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and not self._closed and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        """Send a request and read the status line and headers; the body is read from the Response.

        A request that fails on a reused keep-alive connection before any answer (the server closed
        it while idle) is sent once more on a fresh connection.
        """
        payload = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        head = [f"{method} {self.base_path}{path} HTTP/1.1", f"Host: {self._host_header}", f"User-Agent: {USER_AGENT}",
                "Accept: */*", f"Content-Length: {len(payload)}"]  # fmt: skip
        if body is not None and not isinstance(body, bytes):
            head.append("Content-Type: application/json")
        for name, value in {**self.headers, **(headers or {})}.items():
            head.append(f"{name}: {value}")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
        while True:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            try:
                conn.writer.write(raw)
                await conn.writer.drain()
                status_line = await conn.reader.readline()
                if not status_line:
                    raise ConnectionResetError("connection closed before the status line")
            except (ConnectionError, OSError) as exc:
                conn.close()
                if reused:
                    continue
                raise HTTPError(f"connection lost before an answer: {type(exc).__name__}: {exc}") from None
            except BaseException:
                conn.close()
                raise
            break
        try:
            version, status, reason = (status_line.decode("latin-1").rstrip("\r\n").split(" ", 2) + [""])[:3]
            headers_out: dict[str, str] = {}
            while True:
                line = await conn.reader.readline()
                if not line:
                    raise HTTPError("connection closed in the middle of the headers")
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers_out[name.strip().lower()] = value.strip()
            conn.used += 1
            conn.keep_alive = version.upper() == "HTTP/1.1" and headers_out.get("connection", "").lower() != "close"
            return Response(int(status), reason, headers_out, conn, self)
        except (ConnectionError, OSError, ValueError) as exc:
            conn.close()
            raise HTTPError(f"bad answer from the server: {type(exc).__name__}: {exc}") from None
        except BaseException:
            conn.close()
            raise

    async def get_json(self, path: str, timeout: float = 30.0) -> tuple[int, Any]:
        return await asyncio.wait_for(self._call("GET", path, None), timeout)

    async def post_json(self, path: str, body: Any, timeout: float = 60.0) -> tuple[int, Any]:
        return await asyncio.wait_for(self._call("POST", path, body), timeout)

    async def _call(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        response = await self.request(method, path, body)
        data = await response.read()
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, data.decode("utf-8", "replace")

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


# ---- the benchmark requests ------------------------------------------------------------------


def build_payload(
    endpoint: str,
    model: str,
    prompt: str,
    max_tokens: int,
    temperature: float,
    stream: bool,
    ignore_eos: bool = False,
) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one generation request."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def _error_text(status: int, reason: str, data: bytes) -> str:
    message = ""
    try:
        parsed = json.loads(data)
        if isinstance(parsed, dict):
            error = parsed.get("error", parsed)
            message = error.get("message", "") if isinstance(error, dict) else str(error)
    except ValueError:
        message = data.decode("utf-8", "replace").strip()[:200]
    return f"HTTP {status} {reason}".strip() + (f": {message}" if message else "")


def _chunk_text(endpoint: str, choice: dict[str, Any]) -> str:
    """The output text a streamed choice carries (chat: content/reasoning; completions: text)."""
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        text = (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
        if not text and delta.get("tool_calls"):
            text = json.dumps(delta["tool_calls"])
        return text
    return choice.get("text") or ""


class SSEParser:
    """Splits a text/event-stream body into the `data:` payloads of its events."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        if b"\r" in self._buffer:
            self._buffer = self._buffer.replace(b"\r\n", b"\n")
        events = []
        while (cut := self._buffer.find(b"\n\n")) >= 0:
            raw, self._buffer = self._buffer[:cut], self._buffer[cut + 2 :]
            lines = [line[5:].removeprefix(b" ") for line in raw.split(b"\n") if line.startswith(b"data:")]
            if lines:
                events.append(b"\n".join(lines).decode("utf-8", "replace"))
        return events

    @property
    def pending(self) -> bytes:
        return self._buffer


async def send_request(
    client: HTTPClient,
    endpoint: str,
    model: str,
    prompt: str,
    max_tokens: int,
    temperature: float,
    stream: bool,
    ignore_eos: bool = False,
    timeout: float = 600.0,
    index: int = 0,
    expected_prompt_tokens: int | None = None,
) -> RequestResult:
    """Run one request; timings from just before it is sent. Never raises (but for cancellation)."""
    path, body = build_payload(endpoint, model, prompt, max_tokens, temperature, stream, ignore_eos)
    result = RequestResult(index=index, model=model, expected_prompt_tokens=expected_prompt_tokens)
    result.start = time.perf_counter()
    try:
        await asyncio.wait_for(_run(client, endpoint, path, body, stream, result), timeout)
    except asyncio.TimeoutError:
        result.fail(f"timed out after {timeout:g} s")
    except HTTPError as exc:
        result.fail(str(exc))
    except (ConnectionError, OSError) as exc:
        result.fail(f"{type(exc).__name__}: {exc}")
    except ValueError as exc:
        result.fail(f"unreadable answer: {exc}")
    if result.end is None:
        result.end = time.perf_counter()
    return result


async def _run(client: HTTPClient, endpoint: str, path: str, body: dict, stream: bool, result: RequestResult) -> None:
    response = await client.request("POST", path, body)
    if response.status != 200:
        data = await response.read()
        result.end = time.perf_counter()
        result.fail(_error_text(response.status, response.reason, data))
        return
    if not stream:
        chunks = [piece async for piece in response.iter_chunks()]
        result.end = chunks[-1][1] if chunks else time.perf_counter()
        answer = json.loads(b"".join(data for data, _ in chunks))
        choices = answer.get("choices") or []
        if choices:
            first = choices[0]
            text = (first.get("message") or {}).get("content") if endpoint == "chat" else first.get("text")
            result.text = text or ""
            result.finish_reason = first.get("finish_reason")
        result.take_usage(answer.get("usage"))
        result.check_complete(streamed=False)
        return

    parser = SSEParser()
    done = False
    async for data, arrived in response.iter_chunks():
        for event in parser.feed(data):
            if event == "[DONE]":
                done = True
                continue
            chunk = json.loads(event)
            if "error" in chunk and not chunk.get("choices"):
                error = chunk["error"]
                result.fail("error event in the stream: " + (error.get("message", "") if isinstance(error, dict) else str(error)))
                continue
            for choice in chunk.get("choices") or []:
                if choice.get("index", 0) != 0:
                    continue
                text = _chunk_text(endpoint, choice)
                if text:
                    result.add_token_chunk(arrived, text)
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
            if chunk.get("usage"):
                result.take_usage(chunk["usage"])
        result.end = arrived
    if not done:
        result.fail("the stream ended before data: [DONE]")
    result.check_complete(streamed=True)
