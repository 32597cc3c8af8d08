"""One scripted engine run shared by the parity suites (tensor parallelism, speculative decoding): requests arrive
over several steps and one is aborted mid-generation, so chunked prefill, prefix hits, aborts and preemption all
happen in the same run whose tokens the suites compare."""

from __future__ import annotations

from collections.abc import Callable


def drive(engine, prompts: dict[str, list[int]], arrivals: dict[int, list[str]], params_for: Callable,
          abort: tuple[str, int] = ("gone", 6)) -> dict[str, tuple]:
    """Step `engine` until it is idle; returns request id -> (finish reason, token ids)."""
    done, step = {}, 0
    while step == 0 or engine.has_unfinished_requests():
        for rid in arrivals.get(step, []):
            engine.add_request(rid, prompts[rid], params_for(rid))
        if step == abort[1]:
            engine.abort_request(abort[0])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.outputs[0].finish_reason, out.outputs[0].token_ids)
        step += 1
    return done
