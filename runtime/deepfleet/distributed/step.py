"""What one engine step sends to the workers: per scheduled sequence, only what the model runner reads to build
its inputs (the new tokens and where they start, the block table, whether the last token is sampled), so the
message grows with the tokens computed in the step, not with the sequences' lengths."""

from __future__ import annotations

from dataclasses import dataclass

from deepfleet.engine.scheduler import SchedulerOutput


class _Window:
    """token_ids[start:stop] of a sequence for a worker that received only the tokens computed this step, indexed
    as the sequence's token_ids are (and as long: `total` tokens)."""

    __slots__ = ("chunk", "start", "total")

    def __init__(self, start: int, chunk: list[int], total: int):
        self.start, self.chunk, self.total = start, chunk, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int | slice) -> int | list[int]:
        if isinstance(i, slice):
            return self.chunk[i.start - self.start : i.stop - self.start]
        return self.chunk[i - self.start]


@dataclass(eq=False)
class SeqView:
    """The part of a Sequence the model runner reads."""

    num_computed_tokens: int
    num_tokens: int
    token_ids: _Window
    block_table: list[int]
    pending_row: int  # a placeholder (-1) token's row in the previous step's sampled tokens
    num_draft_tokens: int = 0  # speculative drafts at the end of the new tokens: their rows get logits too


@dataclass
class StepInputs:
    """Async scheduling: a decode token sampled by the step still in flight is a placeholder here, as on the
    driver; `prev_rows` is the size of that step's sampled-token tensor, which the driver broadcasts (device to
    device, no host round trip) right after this message so each rank fills its placeholders from it."""

    # (start, num_tokens, new tokens, block table, placeholder row, speculative drafts among the new tokens)
    seqs: list[tuple[int, int, list[int], list[int], int, int]]
    prev_rows: int = 0
    num_decodes: int = 0  # SchedulerOutput.num_decodes

    @classmethod
    def of(cls, out: SchedulerOutput, prev_token_ids=None) -> StepInputs:
        return cls([(s.num_computed_tokens, s.num_tokens,
                     s.token_ids[s.num_computed_tokens : s.num_computed_tokens + n], s.block_table, s.pending_row,
                     s.num_draft_tokens)
                    for s, n in out.scheduled], 0 if prev_token_ids is None else prev_token_ids.numel(),
                   out.num_decodes)

    def scheduler_output(self) -> SchedulerOutput:
        return SchedulerOutput(scheduled=[
            (SeqView(start, total, _Window(start, new, total), table, row, drafts), len(new))
            for start, total, new, table, row, drafts in self.seqs], num_decodes=self.num_decodes)
