"""The failover drill's arithmetic and its refusal without a lab (the drill itself runs with `make drill`)."""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("drill", Path(__file__).resolve().parents[3] / "bench" / "drill.py")
drill = importlib.util.module_from_spec(_spec)
sys.modules["drill"] = drill  # dataclasses look their module up there
_spec.loader.exec_module(drill)


def test_no_lab_stops_with_the_reason(monkeypatch, capsys):
    monkeypatch.setattr(drill, "all_states", lambda: [])
    assert drill.main(["--scenario", "kill"]) == 2
    assert "no lab is up in this checkout" in capsys.readouterr().err


def test_summary_figures():
    R = drill.Request
    fault = 100.0
    results = [
        R(90.0, 90.5, True), R(91.0, 91.5, True), R(92.0, 92.5, True),  # baseline: P50 0.5 s
        R(99.8, 101.3, True),  # in flight at the fault, re-run elsewhere: held 1.3 s past the fault
        R(100.05, 100.75, True),  # sent before HAProxy's verdict: 0.2 s beyond the median
        R(100.5, 101.0, False, "RemoteDisconnected"),
    ]
    events = [{"t": 100.12, "server": "lab-2", "status": "UP 1/2"}, {"t": 100.15, "server": "lab-2", "status": "DOWN"},
              {"t": 110.0, "server": "lab-2", "status": "UP"}]
    c0 = {"lab-1": {"wretr": "0", "wredis": "0"}, "lab-2": {"wretr": "1", "wredis": "0"}}
    c1 = {"lab-1": {"wretr": "0", "wredis": "2"}, "lab-2": {"wretr": "3", "wredis": "0"}}
    s = drill.summarise("kill", "lab-2", fault, results, events, c0, c1)
    assert s["detection_ms"] == 150 and s["returned_after_s"] == 10.0
    assert s["switchover_ms"] == 200 and s["inflight_at_fault"] == 1 and s["inflight_held_ms"] == 1300
    assert s["failed"] == 1 and s["failed_examples"] == ["RemoteDisconnected"] and s["retried_by_haproxy"] == 4
    assert s["p50_before_ms"] == 500 and s["other_host_flaps"] == 0


