"""One engine across several devices: the driver (this process, rank 0) and one worker process per further rank.

Arrangement (as vLLM's multiprocessing executor and nano-vllm's model runner, written from their design, not their
code): the scheduler, block manager, sampler and detokenizer stay in the driver, which alone sees requests. Every
rank holds its slice of the weights, its own KV cache (its KV heads) and its own CUDA graphs. Each step the driver
sends the step's inputs (per scheduled sequence: the new tokens, where they start, the block table) down a pipe to
every worker, then runs its own forward; the ranks meet in the layers' collectives, so they run the same batch in
lock-step and only the driver's logits are sampled (every rank gets all logits from the vocab all-gather). Anything
that must happen on every rank (KV-cache allocation, memory profiling, CUDA-graph set-up) goes down the same pipe
as a call; the driver waits for the workers' answers.

Why pipes and not broadcast_object_list over the process group: a pipe is one pickled message per worker (tens of
microseconds), it does not tie the control path to the NCCL communicator, and a dead worker shows up as a broken
pipe or an exit status instead of a stalled collective. A shared-memory ring (nano-vllm) would save the pickling;
it is the next step if the send shows up in a decode-step profile.

Failure: a watchdog thread watches the workers' exit status and a heartbeat each writes to shared memory. A worker
that exits, or whose heartbeat stops for `collective_timeout_s`, is a fatal error naming the rank: the remaining
workers are killed (so a collective the driver waits in fails at once) and `on_fatal` is called with the message
(the server's engine process reports it and exits; offline, the next call raises it). Collectives themselves time
out after `collective_timeout_s` (process-group timeout), so a stall in NCCL or gloo also ends as an error."""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import torch

from deepfleet.distributed import parallel_state as ps
from deepfleet.distributed.nccl_env import child_env
from deepfleet.distributed.step import StepInputs
from deepfleet.quant import kv_cache

log = logging.getLogger(__name__)

# methods of ModelRunner that must run on every rank (they allocate per-rank state or run forwards)
ALL_RANKS = frozenset({"allocate_kv_cache", "profile_kv_budget", "init_graphs", "capture_graphs", "propose_mtp"})
_WATCH_INTERVAL_S = 0.2


@dataclass(frozen=True)
class RunnerSpec:
    """What a worker needs to build its ModelRunner (all picklable)."""

    model: str
    dtype: torch.dtype
    device_type: str
    max_model_len: int
    block_size: int
    enforce_eager: bool
    load_format: str
    quantization: str | None
    mtp_layers: int
    size: int
    expert_parallel: bool
    init_method: str
    timeout_s: float
    num_threads: int
    kv_cache_dtype: str = "auto"


def device_for(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device(device_type)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Heartbeats:
    """One float64 per rank in shared memory: the last time.monotonic() the rank's heartbeat thread ran, 0 until
    its first beat (a worker still importing torch is not late; one that never joins fails the rendezvous)."""

    def __init__(self, size: int, name: str | None = None):
        self.shm = SharedMemory(name=name, create=name is None, size=8 * size)
        self.view = self.shm.buf.cast("d")
        if name is not None:  # attached by a worker: the driver owns (and unlinks) it, not the worker's tracker
            resource_tracker.unregister(self.shm._name, "shared_memory")
        else:
            for r in range(size):
                self.view[r] = 0.0

    def beat(self, rank: int) -> None:
        self.view[rank] = time.monotonic()

    def age(self, rank: int) -> float:
        return time.monotonic() - self.view[rank] if self.view[rank] else 0.0

    def close(self, unlink: bool = False) -> None:
        self.view.release()
        self.shm.close()
        if unlink:
            self.shm.unlink()


class _Worker:
    def __init__(self, rank: int, proc: subprocess.Popen, conn: Connection):
        self.rank, self.proc, self.conn = rank, proc, conn

    def describe_exit(self) -> str:
        code = self.proc.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        return f"tensor-parallel worker rank {self.rank} (pid {self.proc.pid}) {how}"


class ParallelRunner:
    """Looks like a ModelRunner to the engine; drives `size - 1` worker processes beside its own rank-0 runner."""

    def __init__(self, spec: RunnerSpec, build_runner: Callable[[RunnerSpec, int], Any]):
        self.spec = spec
        self.failed: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self._closed = False
        self.heartbeats = Heartbeats(spec.size)
        self.workers: list[_Worker] = []
        try:
            for rank in range(1, spec.size):
                self.workers.append(self._spawn(rank))
            self._watchdog = threading.Thread(target=self._watch, name="deepfleet-tp-watchdog", daemon=True)
            self._watchdog.start()
            self._collect("start")  # every worker has imported torch: the rendezvous below is quick
            if spec.device_type == "cuda":
                torch.cuda.set_device(0)  # before NCCL: its communicator binds the current device
            ps.init(0, spec.size, spec.init_method, device_for(spec.device_type, 0), spec.timeout_s,
                    spec.expert_parallel)
            self.runner = build_runner(spec, 0)
            self._collect("load")
            atexit.register(self.close)  # workers stop with the driver, not as orphans of a broken pipe
        except BaseException:
            self.close()
            raise

    # ---- workers --------------------------------------------------------------------------------------------------
    def _spawn(self, rank: int) -> _Worker:
        parent_end, child_end = socket.socketpair()
        env = child_env(os.environ)
        env["DEEPFLEET_TP_HEARTBEATS"] = self.heartbeats.shm.name
        proc = subprocess.Popen([sys.executable, "-m", "deepfleet.distributed.worker", str(rank),
                                 str(child_end.fileno())], pass_fds=[child_end.fileno()], env=env)
        child_end.close()
        conn = Connection(parent_end.detach())
        conn.send(self.spec)
        return _Worker(rank, proc, conn)

    def _watch(self) -> None:
        while not self._closed:
            for w in self.workers:
                if w.proc.poll() is not None:
                    return self._fatal(w.describe_exit())
                if (age := self.heartbeats.age(w.rank)) > self.spec.timeout_s:
                    return self._fatal(f"tensor-parallel worker rank {w.rank} (pid {w.proc.pid}) is not responding "
                                       f"(no heartbeat for {age:.0f} s, collective_timeout_s="
                                       f"{self.spec.timeout_s:g})")
            time.sleep(_WATCH_INTERVAL_S)

    def _fatal(self, message: str) -> None:
        if self._closed or self.failed:
            return
        self.failed = message
        log.error("%s: stopping the engine", message)
        self._kill_workers()
        if self.on_fatal is not None:
            self.on_fatal(message)

    def _kill_workers(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()

    def _send(self, message: Any) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for w in self.workers:
            try:
                w.conn.send_bytes(payload)
            except OSError:
                self._raise_failure()

    def _collect(self, what: str) -> list[Any]:
        """Each worker's answer to the last call, in rank order (an exception a worker sent is re-raised)."""
        answers = []
        for w in self.workers:
            try:
                ok, value = w.conn.recv()
            except (EOFError, OSError):
                self._raise_failure()
            if not ok:
                raise RuntimeError(f"tensor-parallel worker rank {w.rank} failed in {what}: {value}")
            answers.append(value)
        return answers

    def _raise_failure(self, cause: BaseException | None = None):
        for w in self.workers:
            if w.proc.poll() is not None and not self.failed:
                self._fatal(w.describe_exit())
        raise RuntimeError(self.failed or f"tensor-parallel step failed ({cause})") from cause

    # ---- the ModelRunner interface --------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in ALL_RANKS:
            return lambda *args: self.call(name, *args)
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(name)
        return getattr(runner, name)

    def call(self, name: str, *args: Any) -> Any:
        """Run a runner method on every rank; a number (profile_kv_budget) is the minimum over the ranks."""
        if self.failed:
            raise RuntimeError(self.failed)
        self._send(("call", name, args))
        try:
            mine = getattr(self.runner, name)(*args)
        except RuntimeError as e:
            self._raise_failure(e)
        answers = self._collect(name)
        return min([mine, *answers]) if isinstance(mine, int) else mine

    def execute(self, out, prev_token_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """`prev_token_ids` (async scheduling): the step in flight's sampled tokens, still on the device; they go
        to the workers by a broadcast queued behind the sampler, so the driver does not wait for them."""
        if self.failed:
            raise RuntimeError(self.failed)
        self._send(("execute", StepInputs.of(out, prev_token_ids)))
        try:
            if prev_token_ids is not None:
                ps.broadcast(prev_token_ids.contiguous())
            return self.runner.execute(out, prev_token_ids)
        except RuntimeError as e:  # a collective failed: name the rank when one is gone
            time.sleep(2 * _WATCH_INTERVAL_S)
            self._raise_failure(e)

    def close(self) -> None:
        """Stop the workers and leave the process group (the engine may be rebuilt in this process)."""
        if self._closed:
            return
        self._closed = True
        for w in self.workers:
            try:
                w.conn.send_bytes(pickle.dumps(("stop",)))
            except OSError:
                pass
        for w in self.workers:
            try:
                w.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.conn.close()
        ps.destroy()
        self.heartbeats.close(unlink=True)
        atexit.unregister(self.close)


def local_init_method() -> str:
    """Rendezvous of one host's ranks: a free TCP port on loopback."""
    return f"tcp://127.0.0.1:{_free_port()}"


def check_parallel_config(cfg, size: int, expert_parallel: bool, device: torch.device,
                          quantization: str | None = None) -> None:
    """Refuse, before any process starts or weight loads, a size the model or the host cannot be split over."""
    setting = f"engine.tensor_parallel_size={size}"
    if size < 1:
        raise ValueError(f"{setting}: must be >= 1")
    if expert_parallel and not cfg.get("n_routed_experts"):
        raise ValueError(f"engine.expert_parallel: {cfg.arch} has no routed experts to split")
    if size == 1:
        return
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise ValueError(f"{setting}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if device.type == "cuda" and device.index not in (None, 0):
        raise ValueError(f"{setting}: device {device} given; tensor parallelism uses cuda:0..cuda:{size - 1}")
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    if heads % size:
        raise ValueError(f"{setting}: the model's {heads} attention heads (num_attention_heads) do not split evenly")
    if cfg.arch != "deepseek_v3" and kv % size and size % kv:
        raise ValueError(f"{setting}: the model's {kv} KV heads (num_key_value_heads) neither split evenly over "
                         f"{size} ranks nor replicate evenly (size must divide or be a multiple of it)")
    dims = {"intermediate_size": cfg.get("intermediate_size")}
    if cfg.get("n_routed_experts"):
        experts = cfg.get("n_routed_experts")
        if expert_parallel and experts % size:
            raise ValueError(f"engine.expert_parallel with {setting}: {experts} routed experts (n_routed_experts) "
                             f"do not split evenly")
        dims["moe_intermediate_size * n_shared_experts"] = (cfg.get("moe_intermediate_size") *
                                                            (cfg.get("n_shared_experts") or 0)) or None
        if not expert_parallel:
            dims["moe_intermediate_size"] = cfg.get("moe_intermediate_size")
    for name, value in dims.items():
        if value and value % size:
            raise ValueError(f"{setting}: {name}={value} does not split evenly")
    if quantization or cfg.get("quantization_config"):
        from deepfleet.distributed.fp8_split import check_fp8_split

        check_fp8_split(cfg, size, expert_parallel, quantization)


def make_runner(model: str, cfg, dtype: torch.dtype, device: torch.device, max_model_len: int, block_size: int,
                enforce_eager: bool, load_format: str, quantization: str | None = None, size: int = 1,
                expert_parallel: bool = False, timeout_s: float = 60.0, max_loras: int = 0, max_lora_rank: int = 0,
                mtp_layers: int = 0,
                kv_cache_dtype: str = "auto"):
    """A ModelRunner (one device: no workers, the layers' group has size 1) or a ParallelRunner over `size`
    devices. The configuration is checked first, so a bad size fails before any process starts."""
    from deepfleet.distributed.worker import build_runner
    from deepfleet.engine.model_runner import ModelRunner

    check_parallel_config(cfg, size, expert_parallel, device, quantization)
    kv_cache.cache_dtype(kv_cache_dtype, dtype, cfg.raw, device)  # refused before any process starts
    if size == 1:
        if expert_parallel:
            log.info("engine.expert_parallel with tensor_parallel_size=1: every expert is on the one device")
        return ModelRunner(cfg, dtype, device, max_model_len, block_size, enforce_eager, load_format, quantization,
                           max_loras, max_lora_rank, mtp_layers, kv_cache_dtype)
    if max_loras:
        raise ValueError("engine.enable_lora: LoRA adapters with tensor_parallel_size > 1 are not supported yet")
    spec = RunnerSpec(model, dtype, device.type, max_model_len, block_size, enforce_eager, load_format, quantization,
                      mtp_layers, size, expert_parallel, local_init_method(), timeout_s, torch.get_num_threads(),
                      kv_cache_dtype)
    return ParallelRunner(spec, build_runner)
