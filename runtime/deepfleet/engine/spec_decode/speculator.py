"""What the engine calls around one step when `engine.speculative` is set.

Before scheduling, `propose` appends up to k drafts to each decoding sequence's token ids (`num_draft_tokens`
marks them), so the scheduler allocates KV blocks and token budget for the last real token plus its drafts, and
the model runner computes them as one chunk of k + 1 rows with logits on every row (the paged attention path
that serves chunked prefill: each row attends to the cache and the rows before it). `fit` drops drafts the
schedule did not make room for (budget, preemption). `sample` verifies (verify.py); `accept` replaces the drafts
by the emitted tokens and shortens the step's computed count to the kept positions, so the scheduler's
bookkeeping, block hashing for the prefix cache and the next step's inputs see only real tokens. KV slots of
rejected drafts stay in the sequence's blocks and are overwritten by the next step's tokens at those positions;
blocks allocated for them stay with the sequence, which grows into them.

Engine steps are serial while speculating (no async scheduling: drafts depend on the previous step's tokens). The
verify rows are prefill-path chunks, not pure decodes: on CUDA a prefill graph serves them where one of its token
buckets fits, else they run eagerly; with MTP the runner captures no graphs (spec_decode/mtp.py)."""

from __future__ import annotations

import weakref

from deepfleet.engine.sampler import SampledToken, Sampler
from deepfleet.engine.scheduler import SchedulerOutput
from deepfleet.engine.sequence import Sequence, Status
from deepfleet.engine.spec_decode import ngram
from deepfleet.engine.spec_decode.config import SpeculativeConfig
from deepfleet.engine.spec_decode.metrics import SpecDecodeStats
from deepfleet.engine.spec_decode.mtp import MtpRequest
from deepfleet.engine.spec_decode.verify import verify


def draftable(seq: Sequence) -> bool:
    """Requests whose sampling depends on their own output so far (penalties, logits processors: grammars,
    logit_bias, min_tokens, watermarks) or that want logprobs are decoded one token per step."""
    p = seq.params
    return (p.logprobs is None and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
            and p.frequency_penalty == 0.0 and not seq.sampling.logits_processors)


class Speculator:
    def __init__(self, cfg: SpeculativeConfig, max_model_len: int):
        self.cfg, self.max_model_len = cfg, max_model_len
        self.stats = SpecDecodeStats(accepted_per_position=[0] * cfg.num_speculative_tokens)
        self._mtp_drafts: weakref.WeakKeyDictionary[Sequence, list[int]] = weakref.WeakKeyDictionary()
        self._drafted: list[Sequence] = []

    def room(self, seq: Sequence) -> int:
        """Drafts worth scoring: the bonus token always comes, so at most max_tokens - 1 more and within the context."""
        return max(0, min(self.cfg.num_speculative_tokens, seq.params.max_tokens - len(seq.output_token_ids) - 1,
                          self.max_model_len - seq.num_tokens - 1))

    # ---- before the model runs ------------------------------------------------------------------------------------
    def propose(self, running: list[Sequence]) -> None:
        self._drafted = []
        for seq in running:
            if seq.num_uncomputed != 1 or not draftable(seq) or not (k := self.room(seq)):
                continue
            if self.cfg.method == "ngram":
                drafts = ngram.propose(seq.token_ids, k, self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max)
            else:
                drafts = self._mtp_drafts.pop(seq, [])[:k]
            if drafts:
                seq.token_ids.extend(drafts)
                seq.num_draft_tokens = len(drafts)
                self._drafted.append(seq)

    def fit(self, out: SchedulerOutput) -> None:
        """Keep only drafts the schedule computes (a sequence preempted, left out or cut by the budget keeps
        fewer or none); decodes without drafts go back in front."""
        scheduled = {id(s): n for s, n in out.scheduled}
        for seq in self._drafted:
            n = scheduled.get(id(seq))
            keep = min(seq.num_draft_tokens, n - 1) if n is not None and seq.status is Status.RUNNING else 0
            drop = seq.num_draft_tokens - keep
            if drop:
                del seq.token_ids[-drop:]
            seq.num_draft_tokens = keep
        out.scheduled.sort(key=lambda sn: sn[1] != 1)

    # ---- after ----------------------------------------------------------------------------------------------------
    def sample(self, logits, seqs: list[Sequence], sampler: Sampler) -> list[list[SampledToken]]:
        """Per sampled sequence, the tokens to append: verified drafts + one, or the sampler's one token."""
        rows, start = [], 0
        for seq in seqs:
            rows.append(range(start, start + 1 + seq.num_draft_tokens))
            start += 1 + seq.num_draft_tokens
        out: list[list[SampledToken]] = [[] for _ in seqs]
        plain = [i for i, s in enumerate(seqs) if not s.num_draft_tokens]
        drafted = [i for i, s in enumerate(seqs) if s.num_draft_tokens]
        if plain:
            index = [rows[i][0] for i in plain]
            picked = logits if len(index) == logits.shape[0] else logits[index]
            for i, tok in zip(plain, sampler(picked, [seqs[i].sampling for i in plain]), strict=True):
                out[i] = [tok]
        if drafted:
            index = [r for i in drafted for r in rows[i]]
            drafts = [seqs[i].token_ids[-seqs[i].num_draft_tokens :] for i in drafted]
            emitted = verify(logits[index], [seqs[i].sampling for i in drafted], drafts)
            for i, d, tokens in zip(drafted, drafts, emitted, strict=True):
                self.stats.record(len(d), len(tokens) - 1)
                out[i] = [SampledToken(t, None) for t in tokens]
        return out

    @staticmethod
    def take_drafts_back(seq: Sequence) -> int:
        """Remove the scored drafts from token_ids (the emitted tokens are appended as usual); returns how many."""
        d = seq.num_draft_tokens
        if d:
            del seq.token_ids[-d:]
            seq.num_draft_tokens = 0
        return d

    # ---- MTP ------------------------------------------------------------------------------------------------------
    def mtp_requests(self, computed: list[tuple[Sequence, int]], kept: list[int]) -> list[tuple[Sequence, MtpRequest]]:
        """After the emitted tokens are appended, before the scheduler counts the step: one request per still
        running sequence over the positions it kept (`kept`, of the `computed` rows in the runner's token order)."""
        requests, row = [], 0
        for (seq, n), k in zip(computed, kept, strict=True):
            if seq.status is Status.RUNNING:
                s = seq.num_computed_tokens
                wants = self.room(seq) if s + k + 1 == seq.num_tokens and draftable(seq) else 0
                requests.append((seq, MtpRequest(row, s, k, seq.token_ids[s + 1 : s + k + 1], seq.block_table,
                                                 wants)))
            row += n
        return requests

    def keep_mtp_drafts(self, requests: list[tuple[Sequence, MtpRequest]], drafts: list[list[int]]) -> None:
        for (seq, _), d in zip(requests, drafts, strict=True):
            if d:
                self._mtp_drafts[seq] = d
