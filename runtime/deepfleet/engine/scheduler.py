"""Continuous batching under a token budget.

Each step packs, in order of urgency, the running sequences (one decode token each, or the next chunk of a prompt
being prefilled in pieces) and then waiting sequences (their prompt, or as much of it as the budget leaves: chunked
prefill), never exceeding `max_num_batched_tokens` tokens or `max_num_seqs` sequences.

Urgency is the request priority (lower = more urgent) minus an ageing credit for every step spent waiting, so a
low-priority request waits at most about `priority gap × AGEING_STEPS` steps behind a stream of urgent ones.
When the KV cache runs out of blocks, the least urgent running sequence (newest on ties) is preempted: its blocks
are freed and it goes back to waiting, to be recomputed from its prompt plus the tokens it already generated."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat

from deepfleet.engine.block_manager import BlockManager
from deepfleet.engine.sequence import RUNNING, Sequence, Status

AGEING_STEPS = 8  # waiting steps that make a request one priority level more urgent


@dataclass
class SchedulerOutput:
    # (sequence, tokens to compute this step); decodes (one token, something already cached) come first
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_decodes: int = 0  # the entries of one token, all first in `scheduled`
    # sequences whose block tables changed since the last step that ran (the runner updates only their rows)
    table_changes: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        # Order is kept between steps: running sequences' urgency is fixed while they run, and waiting ones all age
        # at the same rate, so a list needs sorting only after sequences joined it
        self._running_sorted = self._waiting_sorted = True
        self.num_preemptions = 0
        self._steps = 0  # schedule() calls done: a waiting sequence has waited _steps - wait_since of them

    def waited_steps(self, seq: Sequence) -> int:
        """Steps spent waiting since arrival or the last preemption (frozen while the sequence runs)."""
        return seq.waited_steps if seq.status is Status.RUNNING else self._steps - seq.wait_since

    def urgency(self, seq: Sequence) -> tuple[float, int]:
        return (seq.priority - self.waited_steps(seq) / AGEING_STEPS, seq.arrival)

    def add(self, seq: Sequence) -> None:
        seq.status, seq.wait_since = Status.WAITING, self._steps
        self.waiting.append(seq)
        self._waiting_sorted = False

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, aborted, timed out) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status, seq.wait_since = Status.WAITING, self._steps
        self.waiting.append(seq)
        self._waiting_sorted = False
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _decode_run(self, start: int, budget: int) -> int:
        """The end of the run of running sequences from `start` that are decodes whose last block has room or gets
        a free block now (the steady state: nobody to preempt), as far as `budget` tokens go. One tight loop: no
        entry built, no counter kept per sequence."""
        bs, running, allocate = self.blocks.block_size, self.running, self.blocks.allocate
        stop = min(len(running), start + budget)
        for end in range(start, stop):
            seq = running[end]
            computed = seq.num_computed_tokens
            if seq.final_pending or len(seq.token_ids) - computed != 1:
                return end
            if computed >= len(seq.block_table) * bs and not allocate(seq, 1):  # (False: nothing changed)
                return end
        return stop

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        if not self._running_sorted:
            self.running.sort(key=self.urgency)
            self._running_sorted = True
        chunks = False  # any scheduled prefill chunk (else the decodes-first order below holds already)
        i, running, scheduled, decodes = 0, self.running, out.scheduled, 0
        while i < len(running) and budget > 0:
            end = self._decode_run(i, budget)
            if end > i:  # (their (sequence, 1) entries built in C)
                scheduled.extend(zip(running[i:end], repeat(1)))
                decodes, budget, i = decodes + end - i, budget - (end - i), end
                continue
            seq = running[i]
            if seq.final_pending:  # its last token is still in flight: nothing to compute
                i += 1
                continue
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            while not self.blocks.allocate(seq, n):
                victim = self.running[-1]  # least urgent, newest
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                out.scheduled.append((seq, n))
                decodes += n == 1
                chunks = chunks or n != 1
                budget -= n
                i += 1
        # admit waiting sequences while budget, sequence slots and blocks allow
        if not self._waiting_sorted:
            self.waiting.sort(key=self.urgency)
            self._waiting_sorted = True
        admitted: list[Sequence] = []
        for seq in self.waiting:
            if budget <= 0 or len(self.running) + len(admitted) >= self.max_num_seqs:
                break
            if seq in out.preempted:
                continue  # not re-admitted in the step that evicted it
            queried, hit = self.blocks.allocate_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.allocate(seq, n):
                self.blocks.free_seq(seq)  # cached blocks stay findable for the next attempt
                break  # keep the order: nothing less urgent jumps ahead while blocks are short
            self.blocks.prefix_queries += queried
            self.blocks.prefix_hits += hit
            if not seq.output_token_ids:
                seq.num_cached_tokens = hit
            seq.waited_steps = self._steps - seq.wait_since  # its urgency while it runs
            seq.status = Status.RUNNING
            admitted.append(seq)
            out.scheduled.append((seq, n))
            decodes += n == 1
            chunks = chunks or n != 1
            budget -= n
        for seq in admitted:
            self.waiting.remove(seq)
        if admitted:
            self.running.extend(admitted)
            self._running_sorted = False
        self._steps += 1  # every sequence still waiting ages by one step (no per-sequence work)
        # decodes first: the attention batches them in one call
        if chunks:
            out.scheduled.sort(key=lambda sn: sn[1] != 1)
        out.num_decodes = decodes
        if scheduled:  # (a step that runs nothing leaves the changes for the next that does)
            out.table_changes = self.blocks.take_changed()
        return out

    def update_after_step(self, out: SchedulerOutput) -> None:
        bs, register = self.blocks.block_size, self.blocks.register_full_blocks
        for seq, n in out.scheduled:
            if seq.status is not RUNNING:  # ended while the step ran (async scheduling): blocks are freed
                continue
            seq.num_computed_tokens += n
            if n != 1 or seq.num_computed_tokens % bs == 0:  # (a decode fills a block once every bs steps)
                register(seq)
