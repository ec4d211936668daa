"""Batched sampling: penalties, bias, temperature, top-k/top-p/min-p, seeds and logprobs.

Per-row values are tensors, so one step costs the same few ops whatever the mix. Random draws use
the exponential race (argmax of probs / Exponential(1) noise); a seeded row draws its noise from
its own generator, so its tokens do not depend on what else is in the batch.
Logprobs are those of the model's raw distribution (as vLLM reports them by default).
"""

from __future__ import annotations

import dataclasses

import torch

from app.engine.request import SamplingParams


@dataclasses.dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # set for seeded requests
    stop_ids: list[int]  # EOS + stop_token_ids: masked while fewer than min_tokens are out


@dataclasses.dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: (sampled token logprob, its rank, [(token, logprob), ...] top-k) or None.
    logprobs: list[tuple[float, int, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        logits = logits[:, : self.vocab_size]
        want_logprobs = [r.params.logprobs for r in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_logprobs) else None

        logits = self._apply_penalties(logits, rows)
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            tokens = logits.max(dim=-1).indices  # max() is ~3x faster than argmax() on CPU
        else:
            tokens = self._sample(logits, rows, greedy)
        token_list = tokens.tolist()
        return SampleResult(token_list, self._logprobs(raw_logprobs, token_list, want_logprobs))

    # ---- logits processing ----------------------------------------------------------------
    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        cloned = False
        for i, r in enumerate(rows):
            p = r.params
            needs = (
                (p.min_tokens and len(r.output_token_ids) < p.min_tokens and r.stop_ids)
                or p.logit_bias
                or p.repetition_penalty != 1.0
                or p.presence_penalty
                or p.frequency_penalty
            )
            if not needs:
                continue
            if not cloned:
                logits = logits.clone()
                cloned = True
            row = logits[i]
            if p.logit_bias:
                ids = torch.tensor([int(t) for t in p.logit_bias], device=row.device)
                row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), device=row.device, dtype=row.dtype))
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.prompt_token_ids) | set(r.output_token_ids)), device=row.device, dtype=torch.long)
                if seen.numel():
                    vals = row[seen]
                    row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
                out = torch.tensor(r.output_token_ids, device=row.device, dtype=torch.long)
                counts = torch.zeros_like(row).index_add_(0, out, torch.ones_like(out, dtype=row.dtype))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
            if p.min_tokens and len(r.output_token_ids) < p.min_tokens and r.stop_ids:
                row[torch.tensor(r.stop_ids, device=row.device)] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], greedy: list[bool]) -> torch.Tensor:
        dev = logits.device
        temps = torch.tensor([1.0 if g else r.params.temperature for r, g in zip(rows, greedy)], device=dev)
        scaled = logits / temps[:, None]
        top_k = [r.params.top_k for r in rows]
        top_p = [r.params.top_p for r in rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            scaled = _top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        min_p = [r.params.min_p for r in rows]
        if any(m > 0 for m in min_p):
            mp = torch.tensor(min_p, device=dev)[:, None]
            probs = probs.masked_fill(probs < mp * probs.amax(dim=-1, keepdim=True), 0.0)
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=dev).exponential_(generator=self.generator)
        for i, r in enumerate(rows):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            sampled = torch.where(torch.tensor(greedy, device=dev), logits.argmax(dim=-1), sampled)
        return sampled

    # ---- logprobs -------------------------------------------------------------------------
    @staticmethod
    def _logprobs(raw: torch.Tensor | None, tokens: list[int], want: list[int | None]):
        if raw is None:
            return [None] * len(tokens)
        out: list[tuple[float, int, list[tuple[int, float]]] | None] = []
        max_k = max(k for k in want if k is not None)
        top_vals, top_ids = (raw.topk(max_k, dim=-1) if max_k > 0 else (None, None))
        tok_t = torch.tensor(tokens, device=raw.device)
        chosen = raw.gather(1, tok_t[:, None]).squeeze(1)
        ranks = (raw > chosen[:, None]).sum(dim=-1) + 1
        chosen_l, ranks_l = chosen.tolist(), ranks.tolist()
        tv = top_vals.tolist() if top_vals is not None else None
        ti = top_ids.tolist() if top_ids is not None else None
        for i, k in enumerate(want):
            if k is None:
                out.append(None)
                continue
            top = list(zip(ti[i][:k], tv[i][:k])) if k > 0 else []
            out.append((chosen_l[i], ranks_l[i], top))
        return out


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    dev = logits.device
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([t if t > 0 else vocab for t in top_k], device=dev)
    positions = torch.arange(vocab, device=dev)[None, :]
    sorted_logits = sorted_logits.masked_fill(positions >= k[:, None], float("-inf"))
    p = torch.tensor(top_p, device=dev)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum = probs.cumsum(dim=-1)
    drop = (cum - probs) > p[:, None]  # keep the smallest set whose mass reaches p (at least one)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)
