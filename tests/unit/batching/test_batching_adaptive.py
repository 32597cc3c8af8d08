import pytest

from deepfleet.batching.adaptive import AdaptiveBatchSize, LoadMeter


def test_grows_by_half_below_30_percent_and_stops_at_max():
    c = AdaptiveBatchSize(1, 32, initial=4)
    assert [c.observe(0.1) for _ in range(6)] == [6, 9, 14, 21, 32, 32]


def test_shrinks_by_30_percent_above_80_percent_and_stops_at_min():
    c = AdaptiveBatchSize(2, 32)
    assert c.target == 32
    assert [c.observe(0.95) for _ in range(8)] == [22, 15, 10, 7, 4, 2, 2, 2]


def test_holds_between_thresholds_and_at_the_thresholds():
    c = AdaptiveBatchSize(1, 64, initial=10)
    for load in (0.3, 0.5, 0.8):
        assert c.observe(load) == 10


def test_a_target_of_one_can_grow():
    c = AdaptiveBatchSize(1, 8, initial=1)
    assert c.observe(0.0) == 2


def test_rejects_bounds_out_of_order():
    with pytest.raises(ValueError, match="min_batch_size"):
        AdaptiveBatchSize(8, 4)


def test_load_meter_reports_busy_fraction_once_per_interval():
    meter = LoadMeter(interval_s=0.1, instances=2, now=0.0)
    meter.add_busy(0.05)
    assert meter.poll(0.05) is None
    meter.add_busy(0.05)
    assert meter.poll(0.1) == pytest.approx(0.5)  # 0.1 s busy over 0.1 s × 2 instances
    assert meter.poll(0.25) == 0.0
