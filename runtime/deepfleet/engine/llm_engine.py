"""The synchronous engine the server and the offline API drive: add requests, call `step()` until done.

One step = schedule (token budget, priorities, preemption) -> run the model -> sample -> append tokens, detokenize,
check stops -> report every request that advanced or ended. A bad request is refused in `add_request` with a
ValueError naming the problem and never reaches the batch, so other requests keep being served."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deepfleet import defaults
from deepfleet.distributed.executor import make_runner
from deepfleet.engine import memory
from deepfleet.engine.block_manager import BlockManager
from deepfleet.engine.detokenizer import IncrementalDetokenizer, StopChecker
from deepfleet.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from deepfleet.engine.sampler import Sampler, make_generator
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.engine.scheduler import Scheduler
from deepfleet.engine.sequence import Sequence, Status
from deepfleet.models.config import load_config, resolve_dtype
from deepfleet.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int | None = None  # None: 32 on CPU, sized from KV memory on GPU
    max_num_batched_tokens: int = defaults.MAX_NUM_BATCHED_TOKENS
    block_size: int = defaults.KV_BLOCK_SIZE
    num_kv_blocks: int | None = None  # None: from memory
    gpu_memory_utilization: float = defaults.GPU_MEMORY_UTILIZATION
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: config.json max_position_embeddings
    enforce_eager: bool = False  # True: no CUDA graphs
    load_format: str = "auto"  # "dummy": random weights, for benchmarks of real shapes
    quantization: str | None = None  # "fp8": block-FP8 weights quantized on load; None: as the checkpoint is
    tensor_parallel_size: int = 1  # devices (ranks) one engine spans; deepfleet/distributed/
    expert_parallel: bool = False  # MoE layers: whole experts split over the ranks instead of each expert's slices
    collective_timeout_s: float = defaults.COLLECTIVE_TIMEOUT_S  # a rank silent this long ends the engine


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")


class LLMEngine:
    def __init__(self, config: EngineConfig):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks", "max_model_len",
                     "tensor_parallel_size"):
            _check_positive(name, getattr(config, name))
        self.config = config
        model_cfg = load_config(config.model)
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        )
        dtype = resolve_dtype(config.dtype, model_cfg, device)
        self.model_name = Path(config.model).resolve().name
        self.max_model_len = min(config.max_model_len or model_cfg.max_position_embeddings,
                                 model_cfg.max_position_embeddings)
        self.tokenizer = Tokenizer(config.model, generation_eos_ids=model_cfg.eos_token_ids)
        self.device = device
        self.runner = make_runner(config.model, model_cfg, dtype, device, self.max_model_len, config.block_size,
                                  config.enforce_eager, config.load_format, config.quantization,
                                  config.tensor_parallel_size, config.expert_parallel, config.collective_timeout_s)
        num_blocks, max_num_seqs = self._size_cache(config)
        self.runner.allocate_kv_cache(num_blocks)
        if device.type == "cuda":
            self.runner.init_graphs(max_num_seqs)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler()
        self.requests: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []  # reported (finish_reason "abort") by the next step
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        log.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_num_seqs %d", self.model_name,
                 device, dtype, num_blocks, config.block_size, max_num_seqs)

    def _size_cache(self, config: EngineConfig) -> tuple[int, int]:
        per_seq = math.ceil(self.max_model_len / config.block_size)
        if self.device.type == "cuda":
            blocks = config.num_kv_blocks or self.runner.profile_num_blocks(
                config.max_num_batched_tokens, config.gpu_memory_utilization)
            seqs = config.max_num_seqs or memory.default_max_num_seqs(blocks, config.block_size)
            return blocks, seqs
        seqs = config.max_num_seqs or defaults.MAX_NUM_SEQS_CPU
        cap = max(per_seq, defaults.CPU_KV_CACHE_BYTES // self.runner.block_bytes())
        return config.num_kv_blocks or min(seqs * per_seq, cap), seqs

    # ---- requests -------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0,
                    deadline: float | None = None) -> None:
        """`deadline`: a time.monotonic() value; past it the request ends with finish_reason "timeout"."""
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise ValueError(f"n: the engine serves n=1 per request (got {params.n}); fan out one request each")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            vocab = self.runner.cfg.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt: token ids must be integers in [0, {vocab}), got {bad[:3]}")
        if not ids:
            raise ValueError("prompt: empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens, but the model's context (max_model_len) is "
                             f"{self.max_model_len} and at least one token must be generated")
        need = math.ceil(min(len(ids) + params.max_tokens, self.max_model_len) / self.block_manager.block_size)
        if need > self.block_manager.num_blocks:  # it could never run, even alone: refuse rather than wait forever
            raise ValueError(f"prompt: {len(ids)} tokens + max_tokens {params.max_tokens} need {need} KV blocks, "
                             f"but the cache holds {self.block_manager.num_blocks}")
        seq = Sequence(request_id, text, ids, params, priority=priority, deadline=deadline)
        if params.seed is not None:
            seq.sampling.generator = make_generator(params.seed, self.device)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        seq.stop_checker = StopChecker(params.stop)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        self.prompt_tokens_total += len(ids)

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.get(request_id)
        if seq is not None and not seq.is_finished:
            self._finish(seq, "abort")
            self._aborted.append(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage,
            prefix_cache_queries=self.block_manager.prefix_queries,
            prefix_cache_hits=self.block_manager.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
        )

    # ---- stepping -------------------------------------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        self.requests.pop(seq.request_id, None)

    def step(self) -> list[RequestOutput]:
        ended = self._aborted
        self._aborted = []
        now = time.monotonic()
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.deadline is not None and now >= seq.deadline:
                self._finish(seq, "timeout")
                ended.append(seq)
        advanced: list[Sequence] = []
        out = self.scheduler.schedule()
        if out.scheduled:
            logits = self.runner.execute(out)
            self.scheduler.update_after_step(out)
            to_sample = [s for s, _ in out.scheduled if s.num_computed_tokens == s.num_tokens]
            if logits is not None:
                sampled = self.sampler(logits, [s.sampling for s in to_sample])
                for seq, tok in zip(to_sample, sampled, strict=True):
                    self._append(seq, tok)
                    advanced.append(seq)
        return [self._output(s) for s in (*ended, *advanced)]

    def _append(self, seq: Sequence, tok) -> None:
        seq.append_token(tok.token_id)
        self.generation_tokens_total += 1
        if seq.logprobs is not None:
            seq.logprobs.append({"token_id": tok.token_id, "logprob": tok.logprob, "top_logprobs": tok.top_logprobs})
        params = seq.params
        delta = seq.detokenizer.append(tok.token_id)
        if tok.token_id in (params.stop_token_ids or ()):
            return self._finish_text(seq, "stop", tok.token_id)
        if not params.ignore_eos and tok.token_id in self.tokenizer.eos_token_ids:
            return self._finish_text(seq, "stop", None)
        if params.stop:
            stopped, seq.text = seq.stop_checker.check(seq.detokenizer.text)
            if stopped:
                matched = next(s for s in params.stop if seq.detokenizer.text.startswith(seq.text + s))
                return self._finish(seq, "stop", matched)
        else:  # no stop strings: extend the text instead of re-joining it every step
            seq.text += delta
        if len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish_text(seq, "length", None)

    def _finish_text(self, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        tail = seq.detokenizer.flush()
        if not seq.params.stop:
            seq.text += tail
            return self._finish(seq, reason, stop_reason)
        stopped, seq.text = seq.stop_checker.check(seq.detokenizer.text, finished=True)
        if stopped:  # the flushed tail completed a stop string
            reason, stop_reason = "stop", next(s for s in seq.params.stop
                                               if seq.detokenizer.text.startswith(seq.text + s))
        self._finish(seq, reason, stop_reason)

    def _output(self, seq: Sequence) -> RequestOutput:
        completion = CompletionOutput(
            index=0, text=seq.text, token_ids=list(seq.output_token_ids), finish_reason=seq.finish_reason,
            logprobs=None if seq.logprobs is None else list(seq.logprobs), stop_reason=seq.stop_reason,
        )
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], seq.is_finished,
                             seq.num_cached_tokens)
