"""Continuous batching by token budget (the vLLM v1 idea). Pure Python: no torch.

Every step, each running sequence asks for the tokens it has not computed yet (1 for decode, a
chunk for an unfinished prefill), then waiting sequences are admitted while the step's token
budget, `max_num_seqs` and the free KV blocks allow. Chunked prefill falls out of this. When
blocks run out, the newest running sequence is preempted: its blocks go back, and it returns to
the front of the waiting queue to be recomputed (prompt + what it generated so far).

With LoRA, a sequence whose adapter cannot get a device slot this step (all pinned by running
sequences of other adapters) waits; behind it only base-model sequences are admitted that step,
so the slots drain and it cannot starve. A running sequence pins its adapter's slot.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections import deque
from collections.abc import Hashable
from typing import Any

from app.engine.block_manager import BlockManager, BlockSequence


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrival_counter = itertools.count()


class Sequence(BlockSequence):
    """One generated sequence: a request with n=2 has two, sharing the prompt's blocks."""

    def __init__(
        self,
        seq_id: str,
        prompt_token_ids: list[int],
        *,
        max_tokens: int,
        extra_key: Hashable = None,
        leader: Sequence | None = None,
        payload: Any = None,
        lora: Any = None,
    ) -> None:
        super().__init__(list(prompt_token_ids), extra_key)
        self.seq_id = seq_id
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_tokens = max_tokens
        self.status = SeqStatus.WAITING
        self.arrival = next(_arrival_counter)
        # A sibling whose prompt prefill this one waits for, so it can share the prompt's blocks.
        self.leader = leader
        self.num_preemptions = 0
        self.payload = payload  # the engine core's per-sequence state (sampling, detokenizer, ...)
        self.lora = lora  # the LoRA adapter version it runs on (None: the base model)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on
    sample: bool  # whether this step produces the sequence's next token


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        lora_slots: Any = None,
    ) -> None:
        self.block_manager = block_manager
        # Device slots for LoRA adapters: `pin(adapter) -> bool`, `unpin(adapter)` (LoRAManager).
        self.lora_slots = lora_slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove `seq` wherever it is and give back its blocks (finished or aborted)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._unpin(seq)
        elif seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq)
        seq.status = SeqStatus.FINISHED

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        # Running sequences first, oldest first; the newest gives way when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, seq.num_computed_tokens + n)
                scheduled.append(self._scheduled(seq, n))
                budget -= n
                i += 1
                continue
            break  # `seq` itself was preempted: nothing newer is left to run

        # Then admit waiting sequences in arrival order (preempted ones are at the front).
        if not preempted:
            skipped: list[Sequence] = []
            lora_blocked = False  # a sequence waits for a LoRA slot: admit only base sequences after it
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if seq.leader is not None and seq.leader.status is not SeqStatus.FINISHED and (
                    seq.leader.num_computed_tokens < seq.leader.num_prompt_tokens
                ):
                    skipped.append(self.waiting.popleft())  # share the leader's prompt blocks later
                    continue
                if seq.lora is not None and self.lora_slots is not None:
                    if lora_blocked or not self.lora_slots.pin(seq.lora):
                        lora_blocked = True
                        skipped.append(self.waiting.popleft())
                        continue
                if not seq.block_table:
                    bm.match_prefix(seq)
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if not bm.can_allocate(seq, seq.num_computed_tokens + n):
                    bm.free(seq)  # drop the prefix-cache references until it can run
                    self._unpin(seq)
                    break
                self.waiting.popleft()
                bm.allocate(seq, seq.num_computed_tokens + n)
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                scheduled.append(self._scheduled(seq, n))
                budget -= n
            self.waiting.extendleft(reversed(skipped))
        return SchedulerOutput(scheduled, preempted)

    @staticmethod
    def _scheduled(seq: Sequence, n: int) -> ScheduledSeq:
        return ScheduledSeq(seq, n, sample=seq.num_computed_tokens + n == seq.num_tokens)

    def _unpin(self, seq: Sequence) -> None:
        if seq.lora is not None and self.lora_slots is not None:
            self.lora_slots.unpin(seq.lora)

    def _preempt(self, seq: Sequence) -> None:
        self._unpin(seq)
        self.block_manager.free(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, output: SchedulerOutput) -> None:
        """Record the tokens this step computed (sampled tokens are appended by the caller)."""
        for item in output.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.commit_computed(item.seq)
