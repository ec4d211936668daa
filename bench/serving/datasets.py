"""The workloads: `prompts` (a file, a YAML list or built-in questions), `random` and `sharegpt`.

`random` follows vLLM's serving benchmark: lengths uniform in [len·(1−r), len·(1+r)], each prompt a
run of token ids `allowed[(offset + i + arange(len)) % len(allowed)]` decoded to text, then
re-encoded and cut or topped up (at most 10 rounds) until it is exactly its length in the model's
tokens. The tokenizer is the server's (`POST /tokenize`, `/detokenize`; its token pool is the
tokens of a built-in English word list, as the server's vocabulary size is not published), or a
local one (`--tokenizer FOLDER`: transformers' AutoTokenizer, the whole vocabulary minus special
tokens, exactly as vLLM).

`sharegpt` reads a ShareGPT JSON file (a list of `{"conversations": [{"from", "value"}, ...]}`): the
first turn is the prompt, the second's token length the output length (unless `--output-len`),
shuffled by the seed, pairs outside vLLM's bounds (< 4 tokens, prompt > 1024, total > 2048) skipped.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.serving.options import BenchOptions, OptionError

DEFAULT_PROMPTS = [
    "Explain what a large language model is in two sentences.",
    "Write a short poem about the sea.",
    "What are the main differences between Python lists and tuples?",
    "Give three tips for writing clear technical documentation.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "How does a hash table work?",
    "List five healthy breakfast ideas.",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "Why is the sky blue?",
    "Describe the water cycle for a ten-year-old.",
]

# Source of the server-tokenizer token pool: common English words, so random prompts decode to
# stable text (each token keeps its leading space and re-encodes the same way).
_WORDS = """the of and to in is was for on that with as by at from his her they this are have be
which one had not but what all were when we there can an your their said if do will each about
how up out them then she many some so these would other into has more two like him see time
could no make than first been its who now people my made over did down only way find use may
water long little very after words called just where most know get through back much before go
good new write our used me man too any day same right look think also around another came come
work three word must because does part even place well such here take why things help put years
different away again off went old number great tell men say small every found still between name
should home big give air line set own under read last never us left end along while might next
sound below saw something thought both few those always looked show large often together asked
house world going want school important until form food keep children feet land side without boy
once animals life enough took sometimes four head above kind began almost live page got earth need
far hand high year mother light parts country father let night following picture being study second
eyes soon times story boys since white days paper hard near sentence better best across during today
others however sure means knew try told young miles sun ways thing whole hear example heard several
change answer room sea against top turned learn point city play toward five using himself usually
money seen car morning river mountain music table question green window number machine engine system
server model token request latency memory garden winter summer autumn spring bridge market library
history science language computer network signal energy planet ocean forest desert village castle
""".split()


@dataclass
class Sample:
    prompt: str
    output_len: int
    prompt_len: int | None = None  # known for random/sharegpt; the server's usage is what is reported
    model: str = ""


class Tokenizer(Protocol):
    async def encode(self, text: str) -> list[int]: ...
    async def decode(self, ids: list[int]) -> str: ...
    async def num_special_tokens(self) -> int: ...
    async def allowed_tokens(self) -> np.ndarray: ...
    def offset_range(self) -> int: ...
    def extra_tokens(self, rng: np.random.Generator, count: int) -> list[int]: ...


class LocalTokenizer:
    """transformers' AutoTokenizer on a folder (or a hub name already in the local cache)."""

    def __init__(self, name_or_path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # pragma: no cover - transformers is a project dependency
            raise OptionError("--tokenizer needs the transformers package") from exc
        local = Path(name_or_path).expanduser()
        try:
            self.tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else name_or_path)
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's path
            raise OptionError(f"cannot load the tokenizer {name_or_path!r}: {exc}") from None

    async def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    async def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    async def num_special_tokens(self) -> int:
        return int(self.tok.num_special_tokens_to_add())

    async def allowed_tokens(self) -> np.ndarray:
        special = set(self.tok.all_special_ids)
        return np.array([t for t in range(self.tok.vocab_size) if t not in special], dtype=np.int64)

    def offset_range(self) -> int:
        return int(self.tok.vocab_size)

    def extra_tokens(self, rng: np.random.Generator, count: int) -> list[int]:
        return rng.integers(0, self.tok.vocab_size, size=count).tolist()


class ServerTokenizer:
    """The server's /tokenize and /detokenize (vLLM's and ours take the same bodies)."""

    def __init__(self, client: Any, model: str) -> None:
        self.client = client
        self.model = model
        self._pool: np.ndarray | None = None

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        status, data = await self.client.post_json(path, body)
        if status != 200:
            message = data.get("error", data) if isinstance(data, dict) else data
            hint = "" if status == 503 else "; pass --tokenizer FOLDER to tokenize locally"
            raise OptionError(f"the server's {path} answered {status}: {message}{hint}")
        return data

    async def encode(self, text: str) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        return list((await self._post("/tokenize", body))["tokens"])

    async def decode(self, ids: list[int]) -> str:
        return (await self._post("/detokenize", {"model": self.model, "tokens": list(ids)}))["prompt"]

    async def num_special_tokens(self) -> int:
        body = {"model": self.model, "prompt": "hello", "add_special_tokens": True}
        with_special = len((await self._post("/tokenize", body))["tokens"])
        return max(0, with_special - len(await self.encode("hello")))

    async def allowed_tokens(self) -> np.ndarray:
        if self._pool is None:
            ids: set[int] = set()
            for i in range(0, len(_WORDS), 64):
                chunk = _WORDS[i : i + 64]
                ids.update(await self.encode(" " + " ".join(chunk)))
                ids.update(await self.encode(" " + " ".join(w.capitalize() for w in chunk)))
            self._pool = np.array(sorted(ids), dtype=np.int64)
        return self._pool

    def offset_range(self) -> int:
        return len(self._pool) if self._pool is not None else 1

    def extra_tokens(self, rng: np.random.Generator, count: int) -> list[int]:
        assert self._pool is not None
        return self._pool[rng.integers(0, len(self._pool), size=count)].tolist()


async def fit_to_length(
    tokenizer: Tokenizer, ids: list[int], target: int, rng: np.random.Generator, rounds: int = 10
) -> tuple[str, int]:
    """Decode `ids`, re-encode, cut or top up until the text is `target` tokens: (text, its length).

    vLLM's gen_prompt_decode_to_target_len, step for step (so a local tokenizer and the same seed
    give vLLM's prompts)."""
    remaining = rounds
    while True:
        text = await tokenizer.decode(ids)
        ids = await tokenizer.encode(text)
        if remaining <= 0 or len(ids) == target:
            break
        if len(ids) < target:
            ids = ids + tokenizer.extra_tokens(rng, target - len(ids))
        else:
            ids = ids[:target]
        remaining -= 1
    return text, len(ids)


async def random_samples(opts: BenchOptions, tokenizer: Tokenizer) -> list[Sample]:
    """vLLM's RandomDataset (no prefix), in the same order of random draws."""
    rng = np.random.default_rng(opts.seed)
    allowed = await tokenizer.allowed_tokens()
    if len(allowed) == 0:
        raise OptionError("the tokenizer gave no usable token ids for the random dataset")
    specials = await tokenizer.num_special_tokens() if opts.endpoint == "completions" else 0
    real_in = max(0, opts.input_len - specials)
    r = opts.range_ratio
    in_low, in_high = math.floor(real_in * (1 - r)), math.ceil(real_in * (1 + r))
    if in_low < 1:
        raise OptionError(f"--input-len {opts.input_len} leaves no room for random tokens")
    out_len = opts.completion_tokens_target
    out_low, out_high = max(1, math.floor(out_len * (1 - r))), max(1, math.ceil(out_len * (1 + r)))
    n = opts.num_prompts
    input_lens = rng.integers(in_low, in_high + 1, size=n)
    output_lens = rng.integers(out_low, out_high + 1, size=n)
    offsets = rng.integers(0, tokenizer.offset_range(), size=n)
    samples = []
    for i in range(n):
        ids = allowed[(int(offsets[i]) + i + np.arange(input_lens[i])) % len(allowed)].tolist()
        text, length = await fit_to_length(tokenizer, ids, int(input_lens[i]), rng)
        samples.append(Sample(prompt=text, output_len=int(output_lens[i]), prompt_len=length + specials))
    return samples


def read_prompts_file(path: str) -> list[str]:
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise OptionError(f"cannot read the prompts file {path}: {exc.strerror or exc}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise OptionError(f"the prompts file {path} has no prompts (one prompt a line)")
    return prompts


def prompt_samples(opts: BenchOptions) -> list[Sample]:
    """--prompts-file (one a line), else the YAML's prompts, else built-in questions; cycled to --num-prompts."""
    if opts.prompts_file:
        prompts = read_prompts_file(opts.prompts_file)
    elif opts.prompts:
        prompts = list(opts.prompts)
    else:
        prompts = DEFAULT_PROMPTS
    return [Sample(prompt=prompts[i % len(prompts)], output_len=opts.max_tokens) for i in range(opts.num_prompts)]


async def sharegpt_samples(opts: BenchOptions, tokenizer: Tokenizer) -> list[Sample]:
    path = Path(str(opts.dataset_path)).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OptionError(f"cannot read the ShareGPT file {path}: {exc}") from None
    pairs = [
        (entry["conversations"][0]["value"], entry["conversations"][1]["value"])
        for entry in data
        if isinstance(entry, dict) and len(entry.get("conversations") or []) >= 2
    ]
    order = np.random.default_rng(opts.seed).permutation(len(pairs))
    samples: list[Sample] = []
    for start in range(0, len(order), 32):
        batch = [pairs[j] for j in order[start : start + 32]]
        lengths = await asyncio.gather(*(_pair_lengths(tokenizer, p, c, opts.output_len) for p, c in batch))
        for (prompt, _), (prompt_len, output_len) in zip(batch, lengths):
            if prompt_len < 4 or output_len < 4 or prompt_len > 1024 or prompt_len + output_len > 2048:
                continue
            samples.append(Sample(prompt=prompt, output_len=output_len, prompt_len=prompt_len))
            if len(samples) == opts.num_prompts:
                return samples
    if not samples:
        raise OptionError(f"{path} has no usable conversations")
    return samples


async def _pair_lengths(tokenizer: Tokenizer, prompt: str, completion: str, output_len: int | None) -> tuple[int, int]:
    prompt_len = len(await tokenizer.encode(prompt))
    if output_len is None:
        output_len = len(await tokenizer.encode(completion))
    return prompt_len, output_len


def assign_models(samples: list[Sample], model: str, lora: dict[str, float] | None, seed: int) -> None:
    """Every sample's `model`: the base model, or an adapter drawn by weight from the --lora mix."""
    if not lora:
        for sample in samples:
            sample.model = model
        return
    names = list(lora)
    weights = np.array([lora[n] for n in names], dtype=np.float64)
    picks = np.random.default_rng(seed + 1).choice(len(names), size=len(samples), p=weights / weights.sum())
    for sample, pick in zip(samples, picks):
        sample.model = names[int(pick)]


async def load_samples(opts: BenchOptions, client: Any) -> list[Sample]:
    """The workload of a run, the model of each request assigned."""
    name = opts.dataset_name
    if name == "prompts":
        samples = prompt_samples(opts)
    else:
        tokenizer: Tokenizer = LocalTokenizer(opts.tokenizer) if opts.tokenizer else ServerTokenizer(client, opts.model or "")
        samples = await (random_samples(opts, tokenizer) if name == "random" else sharegpt_samples(opts, tokenizer))
    assign_models(samples, opts.model or "", opts.lora, opts.seed)
    return samples
