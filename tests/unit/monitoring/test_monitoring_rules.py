"""monitoring/ as code: promtool validates and unit-tests every rule; the Grafana dashboard is checked
against the dashboard schema Grafana loads (the fields and shapes it requires), its PromQL is parsed by
promtool, and its threshold lines are the alert thresholds (one source: rules/alerts.yml)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[3] / "monitoring"
RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
TEST_FILES = sorted((MONITORING / "tests").glob("*.yml"))
DASHBOARD = MONITORING / "dashboards" / "deepfleet.json"
SEVERITIES = {"L1", "L2", "L3"}


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: it comes from Debian's `prometheus` package (scripts/install-deps.sh)"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "rules" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def recorded_names() -> set[str]:
    doc = yaml.safe_load((MONITORING / "rules" / "recording.yml").read_text())
    return {r["record"] for g in doc["groups"] for r in g["rules"]}


def test_rule_files_pass_promtool_check():
    assert RULE_FILES, "no rule files in monitoring/rules"
    res = promtool("check", "rules", *map(str, RULE_FILES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_pass():
    assert TEST_FILES, "no promtool tests in monitoring/tests"
    res = promtool("test", "rules", *map(str, TEST_FILES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    firing, quiet = set(), set()
    for path in TEST_FILES:
        doc = yaml.safe_load(path.read_text())
        for group in doc["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), f"alerts never tested firing: {sorted(names - firing)}"
    assert names - quiet == set(), f"alerts never tested quiet: {sorted(names - quiet)}"


def test_alerts_carry_severity_and_text():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]


def threshold(alert: str) -> float:
    (rule,) = [r for r in alert_rules() if r["alert"] == alert]
    return float(re.search(r"[<>]\s*([0-9.]+)\s*$", rule["expr"].strip()).group(1))


def test_thresholds_are_the_documents():
    # Source documents: P99 > 100 ms chat / > 500 ms general, GPU util < 30 % or > 95 %, queue > 50,
    # errors > 1 %, GPU temperature > 85 °C.
    assert threshold("DeepfleetChatLatencyP99High") == 0.1
    assert threshold("DeepfleetGeneralLatencyP99High") == 0.5
    assert threshold("DeepfleetGPUUtilizationLow") == 30
    assert threshold("DeepfleetGPUUtilizationSaturated") == 95
    assert threshold("DeepfleetQueueBacklog") == 50
    assert threshold("DeepfleetErrorRateHigh") == 0.01
    assert threshold("DeepfleetGPUTemperatureHigh") == 85
    (jump,) = [r for r in alert_rules() if r["alert"] == "DeepfleetLatencyJump"]
    assert "> 1.3 *" in jump["expr"]


# The part of Grafana's dashboard schema (schemaVersion 39) a provisioned dashboard must satisfy to load
# and render: typed top-level fields, panels with unique ids, a 24-column grid, and Prometheus targets.
GRID = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
DATASOURCE_REF = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {"type": {"type": "string"}, "uid": {"type": "string"}},
}
PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"enum": ["row", "timeseries", "stat", "gauge", "bargauge", "table", "text", "heatmap"]},
        "title": {"type": "string", "minLength": 1},
        "gridPos": GRID,
        "datasource": DATASOURCE_REF,
        "targets": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["refId", "expr"],
                "properties": {
                    "refId": {"type": "string", "pattern": "^[A-Z]$"},
                    "expr": {"type": "string", "minLength": 1},
                    "legendFormat": {"type": "string"},
                    "datasource": DATASOURCE_REF,
                },
            },
        },
        "fieldConfig": {
            "type": "object",
            "required": ["defaults", "overrides"],
            "properties": {
                "defaults": {
                    "type": "object",
                    "properties": {
                        "unit": {"type": "string"},
                        "thresholds": {
                            "type": "object",
                            "required": ["mode", "steps"],
                            "properties": {
                                "mode": {"enum": ["absolute", "percentage"]},
                                "steps": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "required": ["color", "value"],
                                        "properties": {"value": {"type": ["number", "null"]}},
                                    },
                                },
                            },
                        },
                    },
                },
                "overrides": {"type": "array"},
            },
        },
    },
    "if": {"properties": {"type": {"const": "row"}}},
    "then": {"required": ["collapsed", "panels"]},
    "else": {"required": ["datasource", "targets", "fieldConfig"]},
}
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels", "time", "templating", "annotations"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "tags": {"type": "array", "items": {"type": "string"}},
        "refresh": {"type": "string"},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array", "items": {"type": "object", "required": ["name", "type"]}}},
        },
        "annotations": {"type": "object", "required": ["list"]},
        "panels": {"type": "array", "minItems": 1, "items": PANEL},
    },
}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def data_panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_matches_schema(dashboard):
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)


def test_dashboard_layout_and_datasource(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} overflows the 24-column grid"
        area = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & area, f"{p['title']} overlaps another panel"
        cells |= area
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for p in data_panels(dashboard):
        for ref in [p["datasource"], *(t["datasource"] for t in p["targets"])]:
            assert ref["type"] == "prometheus"
            var = re.fullmatch(r"\$\{(\w+)\}", ref["uid"])
            assert var and var.group(1) in variables, f"{p['title']}: datasource must be a dashboard variable"


def test_dashboard_queries_parse(dashboard, tmp_path):
    # promtool has no offline expression checker; a rule file of the expressions gets them parsed.
    rules = [
        {"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": t["expr"]}
        for p in data_panels(dashboard)
        for t in p["targets"]
    ]
    path = tmp_path / "dashboard_exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = promtool("check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_dashboard_covers_the_required_views(dashboard):
    exprs = " ".join(t["expr"] for p in data_panels(dashboard) for t in p["targets"])
    for needle in [
        "ttft",  # time to first token
        "tpot",  # time per output token
        "inference_requests:rate5m",  # throughput
        "generated_tokens",
        "queue_length",
        "kv_cache_usage",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_FB_USED",
        "errors:ratio_rate5m",
        "p99_5m",
    ]:
        assert needle in exprs, f"dashboard has no panel for {needle}"
    used = set(re.findall(r"deepfleet:[a-z0-9_:]+", exprs))
    assert used <= recorded_names(), f"dashboard reads unrecorded series {sorted(used - recorded_names())}"


def panel_thresholds(dashboard: dict, metric: str) -> set[float]:
    (panel,) = [p for p in data_panels(dashboard) if metric in p["targets"][0]["expr"]]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return {s["value"] for s in steps if s["value"] is not None}


def test_dashboard_threshold_lines_are_the_alert_thresholds(dashboard):
    assert panel_thresholds(dashboard, "latency_seconds:p99_5m") == {
        threshold("DeepfleetChatLatencyP99High"),
        threshold("DeepfleetGeneralLatencyP99High"),
    }
    assert panel_thresholds(dashboard, "DCGM_FI_DEV_GPU_UTIL") == {
        threshold("DeepfleetGPUUtilizationLow"),
        threshold("DeepfleetGPUUtilizationSaturated"),
    }
    assert panel_thresholds(dashboard, "DCGM_FI_DEV_GPU_TEMP") == {threshold("DeepfleetGPUTemperatureHigh")}
    assert panel_thresholds(dashboard, "queue_length") == {threshold("DeepfleetQueueBacklog")}
    assert panel_thresholds(dashboard, "errors:ratio_rate5m") == {threshold("DeepfleetErrorRateHigh")}


def test_runtime_exports_every_metric_the_rules_and_dashboard_read(dashboard):
    from dataclasses import fields

    from prometheus_client import generate_latest

    from deepfleet.server.metrics import LoadSnapshot, ServerMetrics

    snapshot = LoadSnapshot(**{f.name: 0 for f in fields(LoadSnapshot)})
    metrics = ServerMetrics(lambda: snapshot)
    for endpoint in ("/v1/chat/completions", "/v1/completions"):  # labelled series appear once observed
        metrics.request_done(endpoint, 200, 0.05)
        metrics.ttft.labels(endpoint).observe(0.01)
        metrics.tpot.labels(endpoint).observe(0.01)
    exposed = {line.split("{")[0].split(" ")[0] for line in generate_latest(metrics.registry).decode().splitlines()}
    text = " ".join(p.read_text() for p in RULE_FILES) + json.dumps(dashboard)
    used = set(re.findall(r"\bdeepseek_[a-z_]+", text))
    assert used, "rules read no runtime metric"
    assert used <= exposed, f"rules/dashboard read metrics the runtime does not export: {sorted(used - exposed)}"


DCGM_FIELDS = MONITORING / "dcgm-fields.csv"


def dcgm_fields_collected() -> set[str]:
    rows = [ln.split(",") for ln in DCGM_FIELDS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert all(len(r) >= 3 and r[1].strip() in {"gauge", "counter"} for r in rows), "field, type, help"
    return {r[0].strip() for r in rows}


def test_dcgm_exporter_collects_every_field_the_rules_and_dashboard_read():
    read = set()
    for path in [*RULE_FILES, DASHBOARD]:
        read |= set(re.findall(r"DCGM_FI_[A-Z0-9_]+", path.read_text()))
    assert read, "no DCGM field referenced"
    assert read - dcgm_fields_collected() == set()


def test_gpu_health_alerts_cover_the_hardware_faults():
    names = {r["alert"] for r in alert_rules()}
    for fault in ("Xid", "ECCUncorrectableVolatile", "ECCUncorrectableAggregate", "NVLink", "Throttled",
                  "PageRetirement"):
        assert any(fault in n for n in names), fault
