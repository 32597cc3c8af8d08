"""Server building blocks without HTTP: reasoning split, admission, settings, metrics, error paths."""

from __future__ import annotations

import asyncio
import re
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from typer.testing import CliRunner

from deepfleet.cli import app as cli_app
from deepfleet.server.admission import Admission, QueueFull
from deepfleet.server.config import (
    SECTIONS,
    EngineSettings,
    ServeSettings,
    SettingsError,
    load_settings,
    parse_assignment,
)
from deepfleet.server.errors import field_path
from deepfleet.server.metrics import LoadSnapshot, ServerMetrics, nvml_collector
from deepfleet.server.reasoning import ReasoningParser, split_reasoning

README = Path(__file__).parents[3] / "runtime" / "README.md"


# ---- reasoning ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "starts_open", "expected"),
    [
        ("plan it</think>\n\nThe answer.", True, ("plan it", "The answer.")),
        ("still thinking", True, ("still thinking", "")),
        ("<think>hmm</think>ok", False, ("hmm", "ok")),
        ("  <think>hmm</think> ok", False, ("hmm", "ok")),
        ("plain answer", False, (None, "plain answer")),
        ("<thinking is fun", False, (None, "<thinking is fun")),
        ("a</think>b</think>c", True, ("a", "b</think>c")),
        ("", True, ("", "")),
    ],
)
def test_split_reasoning(text, starts_open, expected):
    assert split_reasoning(text, starts_open) == expected


FRAGMENTS = ["<think>", "</think>", "<", "/", "th", "ink>", "</thi", "a", " ", "\n"]


@given(
    text=st.lists(st.sampled_from(FRAGMENTS), max_size=15).map("".join),
    cuts=st.lists(st.integers(0, 60), max_size=8),
    starts_open=st.booleans(),
)
def test_streamed_split_equals_whole_split_however_the_text_is_cut(text, cuts, starts_open):
    bounds = sorted({c for c in cuts if c < len(text)} | {0, len(text)})
    parser = ReasoningParser(starts_open)
    reasoning, content = "", ""
    for a, b in zip(bounds, bounds[1:], strict=False):
        r, c = parser.feed(text[a:b])
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    whole_reasoning, whole_content = split_reasoning(text, starts_open)
    assert (reasoning + r, content + c) == (whole_reasoning or "", whole_content)


# ---- admission ---------------------------------------------------------------------------------------------------


def test_admission_bounds_queue_orders_by_priority_and_survives_cancellation():
    async def scenario():
        adm = Admission(max_concurrent=1, max_queue=3)
        await adm.acquire(0, None)
        order: list[str] = []

        async def waiter(name: str, priority: int) -> None:
            await adm.acquire(priority, None)
            order.append(name)

        tasks = {n: asyncio.create_task(waiter(n, p)) for n, p in [("low", 9), ("high", -1), ("gone", -5)]}
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await adm.acquire(0, None)
        tasks["gone"].cancel()  # a client that left while queued must not keep or leak a slot
        await asyncio.sleep(0)
        assert adm.queued == 2
        with pytest.raises(asyncio.TimeoutError):
            await adm.acquire(0, 0.01)
        for _ in range(2):
            adm.release()
            await asyncio.sleep(0)
        adm.release()
        await asyncio.sleep(0)
        assert order == ["high", "low"] and adm.active == 0 and adm.queued == 0

    asyncio.run(scenario())


# ---- settings ----------------------------------------------------------------------------------------------------


def test_settings_precedence_file_env_flags(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: /m\nport: 9000\nmax_concurrent: 4\nengine:\n  max_num_seqs: 8\n  dtype: float16\n")
    env = {"DEEPFLEET_MAX_CONCURRENT": "6", "DEEPFLEET_ENGINE__MAX_NUM_SEQS": "12", "DEEPFLEET_OTHER_TOOL": "x"}
    s = load_settings(cfg, {"engine": {"dtype": "bfloat16"}}, env=env)
    assert (s.port, s.max_concurrent) == (9000, 6)
    assert s.engine.engine_kwargs() == {"max_num_seqs": 12, "dtype": "bfloat16"}
    assert s.model_name() == "m"


def test_settings_toml_and_errors_name_the_field(tmp_path):
    cfg = tmp_path / "serve.toml"
    cfg.write_text('model = "/m"\n[engine]\ngpu_memory_utilization = 0.8\n')
    assert load_settings(cfg, env={}).engine.gpu_memory_utilization == 0.8
    with pytest.raises(SettingsError, match=r"engine\.max_num_seqs"):
        load_settings(None, {"model": "/m", **parse_assignment("engine.max_num_seqs=0")}, env={})
    with pytest.raises(SettingsError, match="max_queu"):
        load_settings(None, {"model": "/m", "max_queu": 1}, env={})
    with pytest.raises(SettingsError, match="--set"):
        parse_assignment("no-equals-sign")


def test_engine_settings_mirror_the_engine_config():
    """Every EngineSettings field is an EngineConfig field (they are passed through by name)."""
    from dataclasses import fields

    from deepfleet.engine.llm_engine import EngineConfig

    assert set(EngineSettings.model_fields) <= {f.name for f in fields(EngineConfig)} - {"model"}


def test_every_setting_and_metric_is_documented():
    readme = README.read_text()
    for name in ServeSettings.model_fields:
        assert f"`{name}`" in readme, name
    for section, model in SECTIONS.items():
        for name in model.model_fields:
            assert f"`{section}.{name}`" in readme, f"{section}.{name}"
    metrics = ServerMetrics(lambda: LoadSnapshot(0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0, True))
    for family in metrics.registry.collect():
        assert f"`{family.name}" in readme, family.name


def test_serve_help_lists_every_setting():
    out = CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for name in ServeSettings.model_fields:
        if name != "engine":
            assert name in out, name
    for section, model in SECTIONS.items():
        for name in model.model_fields:
            assert f"{section}.{name}" in out, f"{section}.{name}"


def test_serve_print_config_applies_flags(tmp_path):
    out = CliRunner().invoke(cli_app, ["serve", str(tmp_path), "--port", "1234", "--set", "engine.block_size=32",
                                       "--print-config"])
    assert out.exit_code == 0, out.output
    assert '"port": 1234' in out.output and '"block_size": 32' in out.output
    bad = CliRunner().invoke(cli_app, ["serve", str(tmp_path), "--set", "max_concurrent=0"])
    assert bad.exit_code == 2 and "max_concurrent" in bad.output


# ---- metrics -----------------------------------------------------------------------------------------------------


def test_metrics_expose_source_document_names_with_matching_labels():
    snap = LoadSnapshot(2, 3, 4, 5, 0.25, 10, 4, 1, 100, 50, True)
    m = ServerMetrics(lambda: snap)
    m.request_done("/v1/chat/completions", 200, 0.2)
    text = generate_latest(m.registry).decode()
    labels = '{endpoint="/v1/chat/completions",status="200"}'
    assert f"deepseek_inference_requests_total{labels} 1.0" in text
    assert f"deepseek_inference_latency_seconds_sum{labels} 0.2" in text
    assert f"deepseek_inference_latency_seconds_count{labels} 1.0" in text
    assert "deepseek_inference_queue_length 8.0" in text  # admission queue + engine waiting
    assert "deepseek_inference_prefix_cache_hit_rate 0.4" in text
    assert "deepseek_inference_kv_cache_usage_ratio 0.25" in text
    assert "deepseek_inference_preemptions_total 1.0" in text
    assert not re.search(r"^deepseek_gpu_", text, re.M)  # no GPU collector given


def test_nvml_collector_reads_every_gpu(monkeypatch):
    handles = ["h0", "h1"]
    fake = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: len(handles),
        nvmlDeviceGetHandleByIndex=lambda i: handles[i],
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=5 << 30, total=80 << 30),
        nvmlDeviceGetTemperature=lambda h, kind: 71,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    m = ServerMetrics(lambda: LoadSnapshot(0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0, True), nvml_collector())
    text = generate_latest(m.registry).decode()
    for gpu in ("0", "1"):
        assert f'deepseek_gpu_utilization_percent{{gpu="{gpu}"}} 87.0' in text
        assert f'deepseek_gpu_temperature_celsius{{gpu="{gpu}"}} 71.0' in text
        total = re.search(rf'^deepseek_gpu_memory_total_bytes{{gpu="{gpu}"}} (\S+)$', text, re.M).group(1)
        assert float(total) == 80 << 30


def test_no_nvml_means_no_gpu_metrics(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as on a host without the NVIDIA library
    assert nvml_collector() is None


def test_field_path_drops_union_tags():
    assert field_path(("messages", 0, "content", "list[TextPart]", 1, "type")) == "messages[0].content[1].type"
    assert field_path(("prompt", "str")) == "prompt"


def test_stream_cursor_loses_no_text_when_the_output_grows_while_it_reads():
    """The engine process's reader thread extends a request's cumulative output while the request's handler reads
    it: text appended between the handler's read of the new text and of the length must come in the next delta,
    not be skipped (a non-streamed answer once lost two tokens' text this way under load). Here the output grows
    by one piece inside every read, deterministically."""
    from deepfleet.engine.outputs import CompletionOutput
    from deepfleet.server.render import ChoiceCursor

    class GrowsWhileRead(CompletionOutput):
        __slots__ = ("pieces",)

        def text_since(self, start, end=None):
            text = super().text_since(start, end)
            if self.pieces:
                self.extend_text(self.pieces.pop(0))  # the other thread's append, between the two reads
            return text

    out = GrowsWhileRead(0, "", [], None)
    out.pieces = [" Emoji", " carries", "urr", "ue"]
    out.extend_text(" 4096 lazy")
    cursor = ChoiceCursor(None)
    sent = [cursor.advance(out)[1] for _ in range(5)]
    out.finish_reason = "length"
    sent.append(cursor.advance(out)[1])
    assert "".join(sent) == " 4096 lazy Emoji carriesurrue" == out.text
