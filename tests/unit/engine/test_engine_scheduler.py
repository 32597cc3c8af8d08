"""Scheduler and block manager without a model: token budget and sequence limit, KV blocks all returned after
1,000 random requests (with preemption, prefix sharing and aborts), bounded waiting of low-priority requests."""

import random

from deepfleet.engine.block_manager import BlockManager
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.engine.scheduler import AGEING_STEPS, Scheduler
from deepfleet.engine.sequence import Sequence


def _seq(rid, prompt, max_tokens=8, priority=0):
    return Sequence(rid, None, prompt, SamplingParams(max_tokens=max_tokens), priority=priority)


def _step(sched: Scheduler, rng: random.Random) -> list[Sequence]:
    """One scheduler iteration with a fake model: every sequence whose tokens are all computed gets a token."""
    out = sched.schedule()
    assert out.num_tokens <= sched.max_num_batched_tokens
    assert len(out.scheduled) <= sched.max_num_seqs
    assert len(sched.running) <= sched.max_num_seqs
    assert len({id(s) for s, _ in out.scheduled}) == len(out.scheduled)
    for seq, n in out.scheduled:
        assert n >= 1
        assert len(seq.block_table) * sched.blocks.block_size >= seq.num_computed_tokens + n
    sched.update_after_step(out)
    finished = []
    for seq, _ in out.scheduled:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(rng.randrange(1000))
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                sched.remove(seq)
                finished.append(seq)
    return finished


def test_random_requests_respect_limits_and_free_every_block():
    rng = random.Random(0)
    blocks = BlockManager(num_blocks=48, block_size=4)
    sched = Scheduler(blocks, max_num_seqs=6, max_num_batched_tokens=32)
    shared = [rng.randrange(1000) for _ in range(12)]  # a common "system prompt" for prefix-cache sharing
    pending = [
        _seq(f"r{i}", (shared if rng.random() < 0.5 else []) + [rng.randrange(1000) for _ in range(rng.randint(1, 40))],
             max_tokens=rng.randint(1, 24), priority=rng.randint(0, 3))
        for i in range(1000)
    ]
    done = aborted = steps = 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add(pending.pop())
        if sched.running and rng.random() < 0.02:
            sched.remove(rng.choice(sched.running))  # abort / cancellation mid-flight
            aborted += 1
        done += len(_step(sched, rng))
        steps += 1
        assert steps < 100_000
    assert done + aborted == 1000
    assert sched.num_preemptions > 0, "the block pool is small enough that preemption must happen"
    assert blocks.prefix_hits > 0
    assert blocks.num_free_blocks == blocks.num_blocks
    assert all(c == 0 for c in blocks.ref_counts)


def test_low_priority_request_is_not_starved():
    rng = random.Random(1)
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=2, max_num_batched_tokens=64)
    low = _seq("low", [1, 2, 3], max_tokens=2, priority=5)
    sched.add(low)
    admitted_at = None
    for step in range(200):
        sched.add(_seq(f"hi{step}", [4, 5, 6], max_tokens=2, priority=0))  # a steady stream of urgent requests
        _step(sched, rng)
        if low.num_computed_tokens > 0 or low.output_token_ids:
            admitted_at = step
            break
    assert admitted_at is not None
    # urgent requests that arrive later are overtaken once ageing has closed the priority gap
    assert admitted_at <= 5 * AGEING_STEPS + 2


def test_prompt_longer_than_budget_is_prefilled_in_chunks():
    rng = random.Random(2)
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=4, max_num_batched_tokens=16)
    seq = _seq("long", list(range(50)), max_tokens=1)
    sched.add(seq)
    chunks = []
    while sched.has_unfinished():
        out = sched.schedule()
        chunks += [n for s, n in out.scheduled if s is seq]
        sched.update_after_step(out)
        for s, _ in out.scheduled:
            if s.num_computed_tokens == s.num_tokens:
                s.append_token(rng.randrange(10))
                sched.remove(s)
    assert chunks == [16, 16, 16, 2]


def test_prefix_cache_reuses_full_blocks_and_counts_hits():
    blocks = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    rng = random.Random(3)
    a = _seq("a", list(range(10)), max_tokens=1)
    sched.add(a)
    while sched.has_unfinished():
        _step(sched, rng)
    b = _seq("b", list(range(10)) + [99], max_tokens=1)
    sched.add(b)
    out = sched.schedule()
    assert b.num_cached_tokens == 8  # two full blocks of a's prompt
    assert out.scheduled == [(b, 3)]
    assert (blocks.prefix_queries, blocks.prefix_hits) == (8 + 8, 8)


def test_waiting_ages_by_scheduler_steps_frozen_while_running_and_reset_by_preemption():
    """Ageing counts schedule() calls spent waiting (kept as a step count, with no per-waiting-sequence work per
    step): 3 calls waiting -> 3; admitted -> frozen at its value; preempted -> counts again from 0."""
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=1, max_num_batched_tokens=64)
    first, second = _seq("first", [1, 2, 3], max_tokens=4), _seq("second", [4, 5, 6], max_tokens=4)
    sched.add(first)
    sched.add(second)
    for expected in range(3):  # first runs; second waits for its slot
        assert sched.waited_steps(second) == expected
        sched.update_after_step(sched.schedule())
    assert sched.waited_steps(second) == 3 and sched.waited_steps(first) == 0
    sched.remove(first)
    sched.update_after_step(sched.schedule())  # second admitted after 3 steps waiting
    assert second in sched.running and sched.waited_steps(second) == 3
    sched.update_after_step(sched.schedule())
    assert sched.waited_steps(second) == 3  # frozen while it runs
    out = type(sched.schedule())()
    sched._preempt(second, out)
    assert sched.waited_steps(second) == 0
    sched.max_num_seqs = 0  # (no slot: it stays waiting)
    sched.schedule()
    sched.schedule()
    assert sched.waited_steps(second) == 2
