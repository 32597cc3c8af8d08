"""Tensor and expert parallelism on CPU: real worker processes joined over gloo, the same tiny random-weight models
as the HF parity tests. Expectation: greedy tokens and finish reasons identical to the one-process engine (itself
checked against Hugging Face transformers in tests/unit/engine/test_engine_parity.py) through one scripted run with
chunked prefill, a prefix-cache hit, an abort and preemption; a worker that is killed or stops answering ends the
engine (and `deepfleet serve`) within a bounded time with its rank named; a size the model cannot be split over is
refused before anything is loaded."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from scripted_requests import drive
from typer.testing import CliRunner

from deepfleet.cli import app as cli_app
from deepfleet.distributed.executor import check_parallel_config
from deepfleet.distributed.nccl_env import child_env, read_nccl_conf
from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.models.tiny import make_tiny_model

torch.set_num_threads(1)

PREFIX = list(range(100, 132))  # two full 16-token blocks shared by two requests


def _prompts() -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(11)

    def rand(n):
        return torch.randint(0, 530, (n,), generator=g).tolist()

    return {"a": PREFIX + rand(18), "long": rand(90), "gone": rand(20), "b": PREFIX + rand(13), "c": rand(40)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("qwen2", "llama", "deepseek_v3")}


def _engine(model_dir: Path, tp: int = 1, **kw) -> LLMEngine:
    # 48-token budget: the 90-token prompt is prefilled in chunks; 12 blocks for ~16 needed: preemption
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", tensor_parallel_size=tp,
                                  max_num_batched_tokens=48, num_kv_blocks=12, max_num_seqs=4, **kw))


def _scripted_run(engine: LLMEngine) -> dict:
    """Requests arrive over several steps; "b" reuses "a"'s prefix blocks; "gone" is aborted mid-generation."""
    prompts = _prompts()
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=24)
    arrivals = {0: ["a", "long", "gone"], 3: ["b"], 5: ["c"]}
    done = drive(engine, prompts, arrivals, lambda rid: params)
    stats = engine.stats()
    return {"done": done, "preemptions": stats.num_preemptions, "prefix_hits": stats.prefix_cache_hits}


@pytest.fixture(scope="module")
def reference(models) -> dict[str, dict]:
    # async scheduling (the default) at every size: step N+1 launches before step N's tokens reach the host
    return {arch: _scripted_run(_engine(d)) for arch, d in models.items()}


def test_the_scripted_run_exercises_what_it_claims(reference):
    for arch, ref in reference.items():
        assert ref["preemptions"] > 0 and ref["prefix_hits"] > 0, arch
        assert ref["done"]["gone"][0] == "abort", arch
        assert all(ref["done"][r][0] == "length" and len(ref["done"][r][1]) == 24 for r in "abc"), arch


@pytest.mark.parametrize(("arch", "tp", "ep"), [("qwen2", 2, False), ("llama", 2, False), ("deepseek_v3", 2, False),
                                                ("deepseek_v3", 2, True), ("qwen2", 4, False)])
def test_tensor_parallel_greedy_tokens_equal_one_process(models, reference, arch, tp, ep):
    # qwen2 at 4 ranks: 2 KV heads, each replicated on two ranks
    engine = _engine(models[arch], tp, expert_parallel=ep)
    try:
        got = _scripted_run(engine)
        params = dict(engine.runner.model.named_parameters())  # rank 0 holds only its slices
    finally:
        engine.runner.close()
    assert got == reference[arch]
    assert params["model.embed_tokens.weight"].shape[0] == 544 // tp
    if arch == "deepseek_v3":
        assert params["model.layers.0.self_attn.q_b_proj.weight"].shape[0] == 4 // tp * (16 + 8)  # heads
        experts = params["model.layers.1.mlp.experts.w13"]
        assert experts.shape[:2] == ((8 // tp, 2 * 32) if ep else (8, 2 * 32 // tp))  # whole experts or slices


# Block-FP8 at 2 ranks: every split bound a multiple of the 128-wide scale blocks (8 MLA heads: 4 × 64 q rows and
# 4 × 32 o_proj input features per rank; 128 expert inner rows per rank; 4 KV heads × 64 for qwen2's k and v)
FP8_SPLITTABLE = {"deepseek_v3": dict(num_attention_heads=8, num_key_value_heads=8, moe_intermediate_size=256),
                  "qwen2": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4)}


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory) -> dict[str, tuple[Path, str | None]]:
    """(model dir, engine.quantization): DeepSeek-V3 in the published block-FP8 format, qwen2 quantized on load."""
    root = tmp_path_factory.mktemp("tp_fp8")
    v3 = make_tiny_model(root / "v3", "deepseek_v3", fp8=True, **FP8_SPLITTABLE["deepseek_v3"])
    qwen2 = make_tiny_model(root / "qwen2", "qwen2", **FP8_SPLITTABLE["qwen2"])
    return {"deepseek_v3": (v3, None), "qwen2": (qwen2, "fp8")}


@pytest.mark.parametrize(("arch", "ep"), [("deepseek_v3", False), ("deepseek_v3", True), ("qwen2", False)])
def test_fp8_split_over_two_ranks_gives_the_one_process_tokens(fp8_models, arch, ep):
    model_dir, quantization = fp8_models[arch]
    want = _scripted_run(_engine(model_dir, quantization=quantization))
    engine = _engine(model_dir, 2, expert_parallel=ep, quantization=quantization)
    try:
        got = _scripted_run(engine)
        params = dict(engine.runner.model.named_parameters())
    finally:
        engine.runner.close()
    assert got == want
    fp8 = torch.float8_e4m3fn
    if arch == "qwen2":  # rank 0's slices: q|k|v rows 3 × 128 of 3 × 256, o_proj input features 128 of 256
        assert params["model.layers.0.self_attn.qkv_proj.weight"].shape == (384, 256)
        assert params["model.layers.0.self_attn.qkv_proj.weight_scale_inv"].shape == (3, 2)
        assert params["model.layers.0.self_attn.o_proj.weight_scale_inv"].shape == (2, 1)
        assert params["model.layers.0.mlp.down_proj.weight"].dtype == fp8
        return
    assert params["model.layers.0.self_attn.o_proj.weight"].shape == (256, 128)
    assert params["model.layers.0.self_attn.o_proj.weight_scale_inv"].shape == (2, 1)
    w13, s13 = params["model.layers.1.mlp.experts.w13"], params["model.layers.1.mlp.experts.w13_scale_inv"]
    assert w13.dtype == fp8
    assert (w13.shape, s13.shape) == (((4, 512, 256), (4, 4, 2)) if ep else ((8, 256, 256), (8, 2, 2)))


def test_an_fp8_split_inside_a_scale_block_is_refused_naming_the_tensor(tmp_path):
    # the default tiny FP8 DeepSeek-V3: 4 heads × 32 = 128 o_proj input features, 64 per rank at 2 ranks
    model_dir = make_tiny_model(tmp_path / "v3", "deepseek_v3", fp8=True)
    with pytest.raises(ValueError) as err:
        _engine(model_dir, 2)
    assert ("engine.tensor_parallel_size=2 with FP8 weights: model.layers.0.self_attn.o_proj.weight [256, 128] would "
            "be split with rank 0 holding input features [0, 64) of 128") in str(err.value)


def test_the_serial_loop_at_two_ranks_gives_the_serial_one_process_tokens(models, reference):
    # async scheduling off: each step's tokens reach the host before the next launch, so the abort lands a step
    # later and the aborted request keeps one more token: the scripted run tells the two loops apart, which shows
    # that the tensor-parallel runs above, equal to the async reference, really overlapped their steps
    want = _scripted_run(_engine(models["qwen2"], async_scheduling=False))
    assert want["done"]["gone"] != reference["qwen2"]["done"]["gone"]
    engine = _engine(models["qwen2"], 2, async_scheduling=False)
    try:
        got = _scripted_run(engine)
    finally:
        engine.runner.close()
    assert got == want


@pytest.mark.parametrize(("arch", "method"), [("deepseek_v3", "mtp"), ("qwen2", "ngram")])
def test_speculative_decoding_at_two_ranks_gives_the_one_process_tokens(models, reference, arch, method):
    """engine.speculative: the verify rows' logits and the MTP layer (a call every rank runs) stay in lock-step."""
    engine = _engine(models[arch], 2, speculative={"method": method, "num_speculative_tokens": 2})
    try:
        got = _scripted_run(engine)
        spec = engine.stats().spec_decode
    finally:
        engine.runner.close()
    assert got["done"].pop("gone")[0] == "abort"  # after more tokens than without drafts: several per step
    assert got["done"] == {r: v for r, v in reference[arch]["done"].items() if r != "gone"}
    assert spec.num_drafts > 0


def _wait_for(pred, timeout: float) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_worker_killed_during_a_step_ends_the_engine_naming_its_rank(models):
    engine = _engine(models["qwen2"], 2, collective_timeout_s=30)
    fatal: list[str] = []
    engine.runner.on_fatal = fatal.append  # the server's engine process reports this and exits
    try:
        pid = engine.runner.workers[0].proc.pid
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1"):
            for i in range(100_000):  # keep the ranks stepping until the kill lands inside a step
                if not engine.has_unfinished_requests():
                    engine.add_request(str(i), [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
                engine.step()
        assert time.monotonic() - start < 10
        assert fatal and f"rank 1 (pid {pid}) was killed by signal 9" in fatal[0]
        with pytest.raises(RuntimeError, match="rank 1"):  # and it stays failed
            engine.step()
    finally:
        engine.runner.close()


def test_a_hung_worker_ends_the_engine_after_the_timeout(models):
    engine = _engine(models["qwen2"], 2, collective_timeout_s=3)
    fatal: list[str] = []
    engine.runner.on_fatal = fatal.append
    pid = engine.runner.workers[0].proc.pid
    try:
        os.kill(pid, signal.SIGSTOP)
        waited = _wait_for(lambda: fatal, timeout=10)
        assert 2.5 < waited < 10
        assert "rank 1" in fatal[0] and "not responding" in fatal[0] and "collective_timeout_s=3" in fatal[0]
    finally:
        engine.runner.close()


def _cfg(heads=4, kv=2, arch="qwen2", **extra):
    values = {"intermediate_size": 128, **extra}
    return SimpleNamespace(arch=arch, num_heads=heads, num_kv_heads=kv, get=lambda k, d=None: values.get(k, d))


@pytest.mark.parametrize(("cfg", "size", "ep", "device", "needle"), [
    (_cfg(), 3, False, "cpu", "engine.tensor_parallel_size=3: the model's 4 attention heads"),
    (_cfg(heads=12, kv=3), 2, False, "cpu", "3 KV heads (num_key_value_heads) neither split"),
    (_cfg(heads=8, intermediate_size=100), 8, False, "cpu", "intermediate_size=100 does not split"),
    (_cfg(), 2, False, "cuda", "only 0 CUDA device(s) are visible"),
    (_cfg(), 2, True, "cpu", "engine.expert_parallel: qwen2 has no routed experts"),
    (_cfg(arch="deepseek_v3", n_routed_experts=6, moe_intermediate_size=32), 4, True, "cpu",
     "6 routed experts (n_routed_experts) do not split evenly"),
])
def test_sizes_the_model_or_host_cannot_take_are_refused(cfg, size, ep, device, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA host: the visible-device count is not 0")
    with pytest.raises(ValueError) as err:
        check_parallel_config(cfg, size, ep, torch.device(device))
    assert needle in str(err.value)


def test_a_bad_size_fails_before_any_weight_is_read(models, tmp_path):
    broken = tmp_path / "m"
    broken.mkdir()
    for f in models["qwen2"].iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "model.safetensors").unlink()  # loading weights would fail with a different error
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        _engine(broken, 3)


def test_worker_environment_takes_the_rendered_nccl_conf_and_keeps_multicast_off(tmp_path):
    conf = tmp_path / "nccl.conf"
    conf.write_text("# rendered\nNCCL_DEBUG=WARN\nNCCL_IB_DISABLE=1\nNCCL_NVLS_ENABLE=1\n")
    assert read_nccl_conf(conf)["NCCL_IB_DISABLE"] == "1"
    env = child_env({"DEEPFLEET_NCCL_CONF": str(conf), "NCCL_DEBUG": "INFO"})
    assert env["NCCL_IB_DISABLE"] == "1" and env["NCCL_DEBUG"] == "INFO"  # the process environment wins
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1"
    conf.write_text("NCCL_DEBUG\n")
    with pytest.raises(ValueError, match=r"nccl.conf:1: expected KEY=VALUE"):
        read_nccl_conf(conf)


def test_serve_flag_sets_the_engine_setting(tmp_path):
    out = CliRunner().invoke(cli_app, ["serve", str(tmp_path), "--tensor-parallel-size", "2", "--print-config"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["engine"]["tensor_parallel_size"] == 2


def _workers_of(pid: int) -> list[int]:
    """pids of deepfleet.distributed.worker processes below `pid` (server -> engine process -> workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            grand = int((Path("/proc") / str(ppid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"deepfleet.distributed.worker" in cmd and grand == pid:
            found.append(int(entry.name))
    return found


def test_serve_with_two_ranks_answers_and_stops_naming_a_killed_worker(models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepfleet"), "serve", str(models["qwen2"]), "--host", "127.0.0.1",
           "--port", str(port), "--tensor-parallel-size", "2", "--set", "warmup_requests=1",
           "--set", "engine.device=cpu", "--set", "engine.dtype=float32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: proc.poll() is not None or _ready(url), timeout=120)
        assert proc.poll() is None, proc.communicate()[0]
        r = httpx.post(url + "/v1/completions", json={"model": models["qwen2"].name, "prompt": [1, 2, 3],
                                                      "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        (worker,) = _workers_of(proc.pid)
        os.kill(worker, signal.SIGKILL)
        proc.wait(timeout=30)
        log = proc.stdout.read()
        assert proc.returncode != 0
        assert "tensor-parallel worker rank 1" in log and "killed by signal 9" in log, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz").status_code == 200
    except httpx.TransportError:
        return False


# Run in a child process: a failed rendezvous leaves torch's process-group counter raised in the process that tried,
# so a later gloo group in this pytest process would wait on other store keys (default_pg/1) than its fresh workers.
_JOIN_A_GROUP_NOBODY_HOLDS = """
import socket, torch
from deepfleet.distributed import parallel_state
with socket.socket() as s:  # a port nobody listens on: rank 1 waits for a rank 0 that never comes
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
try:
    parallel_state.init(1, 2, f"tcp://127.0.0.1:{port}", torch.device("cpu"), timeout_s=1)
except RuntimeError as e:
    print(e)
else:
    raise SystemExit("joined a group nobody holds")
print("group size after the failure:", parallel_state.group().size)
"""


def test_a_rank_that_cannot_join_the_group_is_named_with_the_setting():
    r = subprocess.run([sys.executable, "-c", _JOIN_A_GROUP_NOBODY_HOLDS], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"engine.tensor_parallel_size=2: rank 1 could not join the gloo process group at "
                     r"tcp://127.0.0.1:\d+", r.stdout), r.stdout
    assert "group size after the failure: 1" in r.stdout
