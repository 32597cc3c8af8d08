import asyncio
import time

import numpy as np
import pytest

from deepfleet.batching.batcher import DynamicBatcher
from deepfleet.batching.errors import DeadlineExceeded, ServiceUnavailable
from deepfleet.batching.examples import classifier_config
from deepfleet.batching.metrics import BatcherMetrics
from deepfleet.batching.shapes import prepare

pytestmark = pytest.mark.asyncio


def _request(value: float, rows: int = 1):
    cfg = classifier_config(features=4, classes=4)
    return prepare(cfg, {"x": np.full((rows, 4), value, np.float32)}, {})


async def _batcher(backend, **settings):
    b = DynamicBatcher(classifier_config(features=4, classes=4, **settings), backend, BatcherMetrics())
    b.start()
    return b


async def test_full_batches_form_under_load_and_each_request_gets_its_own_rows(fake_classifier):
    backend = fake_classifier(seconds=0.02)
    # a long delay: full batches close at once, and a slow CI box cannot split them
    b = await _batcher(backend, max_batch_size=8, max_queue_delay_ms=500)
    results = await asyncio.gather(*(b.infer(_request(i)) for i in range(24)))
    await b.stop()
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r["logits"], np.full((1, 4), 2 * i, np.float32))
    assert backend.batches == [8, 8, 8]


async def test_a_lone_request_waits_at_most_max_queue_delay(fake_classifier):
    backend = fake_classifier()
    b = await _batcher(backend, max_batch_size=8, max_queue_delay_ms=30)
    start = time.monotonic()
    await b.infer(_request(1))
    waited = time.monotonic() - start
    await b.stop()
    assert 0.025 <= waited < 1.0 and backend.batches == [1]


async def test_multi_row_requests_count_rows_towards_the_batch(fake_classifier):
    backend = fake_classifier(seconds=0.02)
    b = await _batcher(backend, max_batch_size=8, max_queue_delay_ms=500)
    start = time.monotonic()

    async def timed(i):
        await b.infer(_request(i, rows=3))
        return time.monotonic() - start

    took = await asyncio.gather(*(timed(i) for i in range(4)))
    await b.stop()
    assert backend.batches == [6, 6]  # 3 + 3 fits, a third 3-row request would exceed 8 ...
    assert max(took[:2]) < 0.3 < min(took[2:])  # ... so the first batch goes at once; the second waits the delay


async def test_queued_request_past_its_deadline_gets_deadline_exceeded_and_never_runs(fake_classifier):
    backend = fake_classifier(seconds=0.4)
    b = await _batcher(backend, max_batch_size=1, max_queue_delay_ms=0)
    busy = asyncio.ensure_future(b.infer(_request(1)))
    await asyncio.sleep(0.02)  # the first request now occupies the only instance
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await b.infer(_request(2), timeout_s=0.03)
    assert time.monotonic() - start < 0.3  # answered at the deadline, not when the instance frees up
    await busy
    await b.infer(_request(3))
    await b.stop()
    assert backend.batches == [1, 1]  # request 2 was dropped, not executed late


async def test_full_queue_rejects_at_once(fake_classifier):
    backend = fake_classifier(seconds=0.1)
    b = await _batcher(backend, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)
    running = [asyncio.ensure_future(b.infer(_request(0)))]
    await asyncio.sleep(0.02)  # the first one runs ...
    running += [asyncio.ensure_future(b.infer(_request(i))) for i in (1, 2)]
    await asyncio.sleep(0.02)  # ... two wait: the queue is full
    with pytest.raises(ServiceUnavailable, match="queue is full"):
        await b.infer(_request(9))
    await asyncio.gather(*running)
    await b.stop()


async def test_a_failing_request_does_not_fail_the_others_in_its_batch(fake_classifier):
    backend = fake_classifier(fail_value=13.0)
    b = await _batcher(backend, max_batch_size=4, max_queue_delay_ms=20)
    results = await asyncio.gather(*(b.infer(_request(v)) for v in (1, 13, 2)), return_exceptions=True)
    await b.stop()
    assert isinstance(results[1], ValueError)
    assert results[0]["logits"][0, 0] == 2 and results[2]["logits"][0, 0] == 4


async def test_stop_fails_queued_requests_with_unavailable(fake_classifier):
    b = await _batcher(fake_classifier(seconds=0.1), max_batch_size=1, max_queue_delay_ms=0)
    tasks = [asyncio.ensure_future(b.infer(_request(i))) for i in range(3)]
    await asyncio.sleep(0.02)
    await b.stop()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[-1], ServiceUnavailable)


async def test_adaptive_control_shrinks_the_target_when_the_backend_is_saturated(fake_classifier):
    backend = fake_classifier(seconds=0.01)
    b = await _batcher(backend, max_batch_size=16, max_queue_delay_ms=1,
                       adaptive={"enabled": True, "min_batch_size": 2, "interval_ms": 20})
    assert b.target_batch_size == 16

    async def client(i):
        for _ in range(15):
            await b.infer(_request(i))

    await asyncio.gather(*(client(i) for i in range(32)))
    await b.stop()
    assert b.target_batch_size < 16  # busy ~100 % of the time: ×0.7 per interval
    assert max(backend.batches[-3:]) <= b.controller.target / 0.7 + 1
