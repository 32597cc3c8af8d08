"""A request as the engine tracks it: its tokens, how many of them have KV in the cache, its blocks and its
output state. The engine serves n=1 per request (the server fans out n), so request and sequence coincide."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from deepfleet.engine.detokenizer import IncrementalDetokenizer, StopChecker
from deepfleet.engine.outputs import TextSoFar
from deepfleet.engine.sampler import SamplingState
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.watermark.greenlist import GreenListProcessor

_arrival = itertools.count()
PLACEHOLDER = -1  # a sampled token still on the device (async scheduling): the next step reads it there


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# the members for the loops that test every sequence every step: a member read through its class costs ~140 ns in
# CPython 3.11 (the enum metaclass's attribute lookup), a module global ~10 ns
RUNNING, FINISHED = Status.RUNNING, Status.FINISHED


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    deadline: float | None = None  # time.monotonic() value after which the request times out
    arrival: int = field(default_factory=lambda: next(_arrival))  # admission order, breaks priority ties
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0  # tokens whose keys/values are in the cache
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    waited_steps: int = 0  # while running: the scheduler steps it waited before admission (for ageing)
    wait_since: int = 0  # the scheduler's step count when it last began waiting (arrival or preemption)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: TextSoFar = field(default_factory=TextSoFar)  # the output text released so far (stop strings held back)
    logprobs: list[dict] | None = None
    sampling: SamplingState = field(init=False)
    detokenizer: IncrementalDetokenizer | None = None
    stop_checker: StopChecker | None = None
    # how the engine treats it, set by LLMEngine.add_request:
    stream: bool = True  # reported every step it advances; False: only once it ends (offline callers)
    text_per_token: bool = True  # text built as tokens arrive (streamed, or stop strings); else once at the end
    end_ids: frozenset[int] = frozenset()  # tokens that end it: stop_token_ids, and EOS unless ignore_eos
    reads_output: bool = False  # its sampling reads its output so far (penalties, logits processors)
    argmax_only: bool = False  # its token is its logits row's argmax (greedy, no logprobs, nothing applied)
    pending_row: int = -1  # row of the latest placeholder in its step's sampled-token tensor
    final_pending: bool = False  # its latest token (in flight or not) is its last by length: nothing to schedule
    last_index: int = field(init=False)  # index in token_ids of its last token (max_tokens, or the context)
    lora_slot: int | None = None  # the LoRA adapter's slot (deepfleet/lora/); None: the base model
    cache_salt: bytes | None = None  # roots its prefix-cache hashes (the adapter's): None for the base model
    num_draft_tokens: int = 0  # speculative drafts at the end of token_ids, scored (not yet accepted) this step
    prompt_logprobs: list[dict | None] | None = None  # with params.prompt_logprobs: filled as the prompt is computed

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.last_index = len(self.prompt_token_ids) + self.params.max_tokens - 1  # (the engine caps it by context)
        self.sampling = SamplingState(self.params, self.prompt_token_ids, [])
        if self.params.watermark is not None:
            self.sampling.logits_processors.append(GreenListProcessor(self.params.watermark, self.prompt_token_ids[-1]))
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has nothing before it

    @property
    def output_token_ids(self) -> list[int]:
        return self.sampling.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is FINISHED

    def add_placeholder(self, row: int) -> int:
        """A token was sampled into `row` of this step's result; returns its index in token_ids."""
        self.token_ids.append(PLACEHOLDER)
        self.pending_row = row
        index = len(self.token_ids) - 1
        self.final_pending = index >= self.last_index  # (counted while still in flight)
        return index

    def append_token(self, token_id: int) -> None:
        """Serial form (a token already on the host)."""
        self.resolve_token(self.add_placeholder(-1), token_id)

    def resolve_token(self, index: int, token_id: int) -> None:
        self.token_ids[index] = token_id
        self.sampling.output_token_ids.append(token_id)
