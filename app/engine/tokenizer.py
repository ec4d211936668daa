"""The engine's tokenizer layer: encode/decode, incremental detokenization, stop strings, chat templates.

Loading goes through `transformers.AutoTokenizer` (so the folder is read exactly as HF reads it), but the hot
paths (encode, decode, incremental detokenization) call the Rust `tokenizers.Tokenizer` directly to keep the
Python overhead per request and per step small.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["Tokenizer", "IncrementalDetokenizer", "StopStringMatcher"]

_REPLACEMENT = "\ufffd"
# How many prompt tokens the incremental detokenizer decodes as context before the first generated token,
# as vLLM does: enough for SentencePiece/byte-level decoders to get the leading space of the first piece right.
_INITIAL_CONTEXT_TOKENS = 5
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character map that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _json_types(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types (like transformers does), so the sandbox only sees inert data."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_json_types(k): _json_types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_types(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_json_types(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models (e.g. the HTTP layer's messages)
        return _json_types(value.model_dump())
    return f"<{type(value).__name__}>"


_JINJA_CACHE: dict[str, Any] = {}


def _compile_chat_template(source: str):
    """Compile a chat template in a sandbox with the environment transformers gives templates."""
    cached = _JINJA_CACHE.get(source)
    if cached is not None:
        return cached

    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant spans for training masks; rendering ignores it.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class _Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class _Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    try:
        compiled = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the model's chat template does not compile ({e}); fix chat_template.jinja") from e
    if len(_JINJA_CACHE) > 32:
        _JINJA_CACHE.clear()
    _JINJA_CACHE[source] = compiled
    return compiled


class Tokenizer:
    """A HF tokenizer folder, with fast paths into the Rust backend."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: set[int] | None = None, path: Path | None = None):
        backend = getattr(hf_tokenizer, "_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"{path or 'the tokenizer'} has no fast (tokenizer.json) tokenizer; "
                "convert the model with a tokenizer.json, slow tokenizers are not supported"
            )
        self._hf = hf_tokenizer
        self._backend = backend
        self.path = path
        self.vocab_size: int = len(hf_tokenizer)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        eos = set(eos_token_ids or ())
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        self.eos_token_ids: set[int] = eos
        special = set(hf_tokenizer.all_special_ids)
        # What the Rust decoder skips with skip_special_tokens: the added tokens marked special.
        for token_id, added in backend.get_added_tokens_decoder().items():
            if added.special:
                special.add(token_id)
        self.all_special_ids: set[int] = special
        template = getattr(hf_tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one is the chat template
            template = template.get("default")
        self.chat_template: str | None = template or None
        self._special_tokens_map: dict[str, Any] = dict(hf_tokenizer.special_tokens_map)
        self._token_text_cache: dict[int, str] = {}
        self._byte_level = self._has_byte_level_decoder()
        # The backend's post-processor normally carries HF's add_bos/add_eos; check once, else go through HF.
        probe = "Hello world"
        self._fast_encode = all(
            hf_tokenizer.encode(probe, add_special_tokens=flag) == backend.encode(probe, add_special_tokens=flag).ids
            for flag in (True, False)
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ValueError(f"tokenizer folder {str(path)!r} does not exist; pass a HF model folder")
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{str(path)!r} has no tokenizer.json; pass a HF model folder with a fast tokenizer")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:  # a broken folder is the user's to fix
            raise ValueError(f"cannot load the tokenizer in {str(path)!r} ({e}); check its tokenizer files") from e
        eos: set[int] = set()
        gen_path = path / "generation_config.json"
        if gen_path.is_file():
            try:
                gen = json.loads(gen_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ValueError(f"{gen_path} is not valid JSON ({e}); fix or remove it") from e
            value = gen.get("eos_token_id") if isinstance(gen, dict) else None
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list):
                eos.update(v for v in value if isinstance(v, int))
        return cls(hf, eos, path)

    def _has_byte_level_decoder(self) -> bool:
        try:
            decoder = json.loads(self._backend.to_str()).get("decoder") or {}
        except Exception:
            return False
        stack = [decoder]
        while stack:
            d = stack.pop()
            if not isinstance(d, dict):
                continue
            if d.get("type") == "ByteLevel":
                return True
            stack.extend(d.get("decoders") or [])
        return False

    # -- encode / decode -------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"the prompt must be a string, got {type(text).__name__}")
        if self._fast_encode:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        try:
            return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        except (TypeError, OverflowError) as e:
            raise ValueError(
                f"token ids must be non-negative integers below {self.vocab_size} ({e}); fix the token ids"
            ) from e

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str | None]:
        id_to_token = self._backend.id_to_token
        return [id_to_token(i) for i in token_ids]

    def token_text(self, token_id: int) -> str:
        """The text of one token, for logprobs: real text, or "bytes:\\xe4\\xbd" for a partial UTF-8 byte token."""
        cached = self._token_text_cache.get(token_id)
        if cached is not None:
            return cached
        text = self._token_text(token_id)
        self._token_text_cache[token_id] = text
        return text

    def _token_text(self, token_id: int) -> str:
        if not isinstance(token_id, int) or token_id < 0:
            raise ValueError(f"token id must be a non-negative integer, got {token_id!r}")
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary (size {self.vocab_size})")
        text = self._backend.decode([token_id], skip_special_tokens=False)
        if piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text  # SentencePiece decoders strip the leading space of the first piece
        if _REPLACEMENT not in text:
            return text
        raw: bytes | None = None
        if token_id in self._backend.get_added_tokens_decoder():
            return text
        m = _BYTE_TOKEN.match(piece)
        if m:
            raw = bytes([int(m.group(1), 16)])
        elif self._byte_level and all(c in _BYTE_DECODER for c in piece):
            raw = bytes(_BYTE_DECODER[c] for c in piece)
        if raw is None:
            return text
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    # -- chat template ---------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the chat as transformers' apply_chat_template(..., tokenize=False) does.

        Extra keyword arguments (tools, documents, enable_thinking, ...) are passed to the template.
        """
        if self.chat_template is None:
            raise ValueError(
                "the model has no chat template; use the completions endpoint with a plain prompt, "
                "or add a chat_template.jinja to the model folder"
            )
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages must be a list of message objects, got {type(messages).__name__}")
        chat = []
        for i, message in enumerate(messages):
            if callable(getattr(message, "model_dump", None)):
                message = message.model_dump()
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {message!r}")
            chat.append({k: v for k, v in message.items() if v is not None})
        chat = _json_types(chat)
        # transformers aliases reasoning fields under the names templates read
        for i, message in enumerate(chat):
            reasoning = next(
                (message[k] for k in ("reasoning_content", "thinking", "reasoning") if message.get(k) is not None),
                None,
            )
            if reasoning is not None:
                chat[i] = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        variables = {**self._special_tokens_map, **kwargs}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        variables = _json_types(variables)
        template = _compile_chat_template(self.chat_template)
        import jinja2

        try:
            return template.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template rejected the messages: {e}") from e
        except (TypeError, KeyError, AttributeError, IndexError) as e:
            raise ValueError(f"the chat template could not render these messages ({e}); check their fields") from e


class IncrementalDetokenizer:
    """Turns generated token ids into text as they come, never emitting half a UTF-8 character.

    The vLLM/TextStreamer scheme: `prefix_offset`..`read_offset` is text already emitted (decoded again only as
    context), `read_offset`.. is pending. The new text is decode(tokens[prefix:]) minus decode(tokens[prefix:read]),
    held back while it ends in U+FFFD (an incomplete multi-byte sequence).
    """

    __slots__ = (
        "_decode",
        "_skip",
        "_tokens",
        "_prefix_offset",
        "_read_offset",
        "_prefix_text",
        "_pieces",
        "_text",
        "_n_context",
    )

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self._decode = tokenizer._backend.decode
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-_INITIAL_CONTEXT_TOKENS:]) if prompt_token_ids else []
        prefix_text = self._decode(context, skip_special_tokens=skip_special_tokens) if context else ""
        if prefix_text.endswith(_REPLACEMENT) or prefix_text.startswith(_REPLACEMENT):
            # The prompt ends (or the context starts) inside a multi-byte character: its bytes would merge with
            # the generated ones, so decode the generated tokens on their own instead.
            context, prefix_text = [], ""
        self._tokens: list[int] = context
        self._n_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = prefix_text
        self._pieces: list[str] = []
        self._text: str | None = ""

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = "".join(self._pieces)
        return self._text

    @property
    def token_ids(self) -> list[int]:
        return self._tokens[self._n_context :]

    def add(self, token_id: int) -> str:
        tokens = self._tokens
        tokens.append(token_id)
        full = self._decode(tokens[self._prefix_offset :], skip_special_tokens=self._skip)
        prefix_text = self._prefix_text
        if len(full) <= len(prefix_text) or full[-1] == _REPLACEMENT:
            return ""  # nothing new yet (special token skipped, or an incomplete character)
        new_text = full[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = read = len(tokens)
        self._prefix_text = self._decode(tokens[self._prefix_offset : read], skip_special_tokens=self._skip)
        self._pieces.append(new_text)
        self._text = None
        return new_text

    def flush(self) -> str:
        """At the end of generation: the held-back text (a trailing U+FFFD that no later token completed)."""
        tokens = self._tokens
        if self._read_offset >= len(tokens):
            return ""
        full = self._decode(tokens[self._prefix_offset :], skip_special_tokens=self._skip)
        new_text = full[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(tokens)
        self._prefix_text = self._decode(tokens[self._prefix_offset :], skip_special_tokens=self._skip)
        if new_text:
            self._pieces.append(new_text)
            self._text = None
        return new_text


class StopStringMatcher:
    """Finds stop strings in streamed text, across token boundaries.

    Text that may still be the start of a stop string is held back until it is known not to be one. When
    several stops match, the one that completes first wins (ties: the one that starts first), so the result
    does not depend on how the text was split into pieces.
    """

    __slots__ = ("stops", "include_stop_str_in_output", "_tail", "_max_hold", "matched", "finished")

    def __init__(self, stops: list[str], include_stop_str_in_output: bool = False):
        if isinstance(stops, str):
            stops = [stops]
        for s in stops or ():
            if not isinstance(s, str):
                raise ValueError(f"stop strings must be strings, got {s!r}")
        self.stops: list[str] = list(dict.fromkeys(s for s in (stops or ()) if s))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._tail = ""  # the last text seen that may be the start of a stop (held back unless include)
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self.matched: str | None = None
        self.finished = False

    def feed(self, new_text: str) -> tuple[str, str | None]:
        if self.finished:
            return "", None
        if not self.stops:
            return new_text, None
        tail = self._tail
        s = tail + new_text if tail else new_text
        best_end = best_start = -1
        best: str | None = None
        for stop in self.stops:
            i = s.find(stop)
            if i < 0:
                continue
            end = i + len(stop)
            if best is None or end < best_end or (end == best_end and i < best_start):
                best, best_start, best_end = stop, i, end
        if best is not None:
            self.finished = True
            self.matched = best
            self._tail = ""
            if self.include_stop_str_in_output:
                return s[len(tail) : best_end], best  # the tail was already emitted
            return s[:best_start], best
        hold = self._hold_length(s)
        self._tail = s[len(s) - hold :] if hold else ""
        if self.include_stop_str_in_output:
            return new_text, None  # everything up to a stop is emitted anyway: no need to hold it back
        return s[: len(s) - hold], None

    def _hold_length(self, s: str) -> int:
        """Length of the longest suffix of `s` that is a proper prefix of some stop string."""
        best = 0
        limit = min(self._max_hold, len(s))
        for stop in self.stops:
            for n in range(min(len(stop) - 1, limit), best, -1):
                if s.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """At finish without a stop match: the held-back text."""
        if self.finished:
            return ""
        tail, self._tail = self._tail, ""
        self.finished = True
        return "" if self.include_stop_str_in_output else tail
