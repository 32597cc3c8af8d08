"""The synchronous engine the server and the offline API drive: add requests, call `step()` until done.

One step = schedule (token budget, priorities, preemption) -> run the model -> sample -> append tokens, detokenize,
check stops -> report every request that advanced or ended. A bad request is refused in `add_request` with a
ValueError naming the problem and never reaches the batch, so other requests keep being served."""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from deepfleet import defaults
from deepfleet.distributed.executor import make_runner
from deepfleet.engine import memory
from deepfleet.engine.block_manager import BlockManager
from deepfleet.engine.detokenizer import IncrementalDetokenizer, StopChecker, decode_outputs
from deepfleet.engine.errors import StartupError
from deepfleet.engine.logits_processors import LogitsProcessors
from deepfleet.engine.outputs import CompletionOutput, EngineStats, LoRAStats, RequestOutput
from deepfleet.engine.sampled_rows import SampledRows
from deepfleet.engine.sampler import SampledToken, Sampler, SampleResult, argmax_only, make_generator, reads_output
from deepfleet.engine.sampling_params import SamplingParams
from deepfleet.engine.scheduler import Scheduler
from deepfleet.engine.sequence import FINISHED, Sequence, Status
from deepfleet.engine.spec_decode import config as spec_config
from deepfleet.engine.spec_decode.config import SpeculativeConfig
from deepfleet.engine.spec_decode.speculator import Speculator
from deepfleet.models.config import load_config, resolve_dtype
from deepfleet.models.tokenizer import Tokenizer
from deepfleet.watermark.config import WatermarkConfig

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int | None = None  # None: 32 on CPU; on GPU from KV memory, up to max_num_seqs_cap
    max_num_seqs_cap: int = defaults.MAX_NUM_SEQS_GPU_CAP
    max_num_batched_tokens: int | None = None  # None: by the device (engine/memory.default_max_num_batched_tokens)
    block_size: int = defaults.KV_BLOCK_SIZE
    num_kv_blocks: int | None = None  # None: from memory
    gpu_memory_utilization: float = defaults.GPU_MEMORY_UTILIZATION
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None: config.json max_position_embeddings
    enforce_eager: bool = False  # True: no CUDA graphs
    load_format: str = "auto"  # "dummy": random weights, for benchmarks of real shapes
    watermark_key: str | None = None  # per-deployment green-list watermark of every request without its own
    quantization: str | None = None  # "fp8": block-FP8 weights quantized on load; None: as the checkpoint is
    kv_cache_dtype: str = defaults.KV_CACHE_DTYPE  # "fp8": keys/values stored in e4m3 (deepfleet/quant/kv_cache.py)
    tensor_parallel_size: int = 1  # devices (ranks) one engine spans; deepfleet/distributed/
    expert_parallel: bool = False  # MoE layers: whole experts split over the ranks instead of each expert's slices
    collective_timeout_s: float = defaults.COLLECTIVE_TIMEOUT_S  # a rank silent this long ends the engine
    grammar_compile_timeout_s: float = defaults.GRAMMAR_COMPILE_TIMEOUT_S  # structured output: longer = refused
    async_scheduling: bool = True  # prepare step N+1 while the GPU runs step N (see LLMEngine.step)
    enable_lora: bool = False  # adapter slots beside the projections (deepfleet/lora/); requests pick one by name
    max_loras: int = defaults.MAX_LORAS  # adapter slots: adapters resident at once (each may be in every batch)
    max_lora_rank: int = defaults.MAX_LORA_RANK  # largest adapter rank accepted
    lora_modules: dict[str, str] | None = None  # adapters loaded at start-up: name -> PEFT adapter directory
    # speculative decoding, e.g. {"method": "ngram", "num_speculative_tokens": 2}; spec_decode/config.py
    speculative: SpeculativeConfig | dict | None = None


def _grammar_compiler(config: EngineConfig, vocab_size: int, tokenizer: Tokenizer):
    """Structured output's compiler factory (called at the first such request: importing xgrammar and reading the
    vocabulary take a while), or None where xgrammar is not installed (such requests are then refused)."""
    if importlib.util.find_spec("xgrammar") is None:
        return None

    def build():
        from deepfleet.structured.xgrammar_backend import GrammarCompiler, tokenizer_info

        return GrammarCompiler(tokenizer_info(config.model, vocab_size, tokenizer.eos_token_ids),
                               config.grammar_compile_timeout_s)

    return build


def _check_lora_supported(config: EngineConfig, arch: str) -> None:
    """LoRA applies to the bf16/fp16/fp32 single-device projections of the Qwen2/Llama models only."""
    if arch not in ("qwen2", "llama"):
        raise StartupError(f"engine.enable_lora: LoRA adapters are served for Qwen2/Llama models, not {arch!r}")
    if config.quantization is not None:
        raise StartupError(f"engine.enable_lora: LoRA with quantization {config.quantization!r} is not supported "
                           "(adapters apply to unquantized projections)")
    if config.tensor_parallel_size > 1:
        raise StartupError("engine.enable_lora: LoRA with tensor_parallel_size > 1 is not supported yet")


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")


class LLMEngine:
    def __init__(self, config: EngineConfig):
        for name in ("max_num_seqs", "max_num_seqs_cap", "max_num_batched_tokens", "block_size", "num_kv_blocks",
                     "max_model_len", "tensor_parallel_size", "max_loras", "max_lora_rank"):
            _check_positive(name, getattr(config, name))
        self.config = config
        model_cfg = load_config(config.model)
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        )
        dtype = resolve_dtype(config.dtype, model_cfg, device)
        self.max_num_batched_tokens = config.max_num_batched_tokens or memory.default_max_num_batched_tokens(
            torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None)
        lora = config.enable_lora or bool(config.lora_modules)
        if lora:
            _check_lora_supported(config, model_cfg.arch)
        self.model_name = Path(config.model).resolve().name
        self.max_model_len = min(config.max_model_len or model_cfg.max_position_embeddings,
                                 model_cfg.max_position_embeddings)
        self.tokenizer = Tokenizer(config.model, generation_eos_ids=model_cfg.eos_token_ids)
        self.device = device
        speculative = spec_config.parse(config.speculative)
        self.runner = make_runner(config.model, model_cfg, dtype, device, self.max_model_len, config.block_size,
                                  config.enforce_eager, config.load_format, config.quantization,
                                  config.tensor_parallel_size, config.expert_parallel, config.collective_timeout_s,
                                  config.max_loras if lora else 0, config.max_lora_rank,
                                  spec_config.check_model(speculative, model_cfg) if speculative else 0,
                                  config.kv_cache_dtype)
        self.speculator = Speculator(speculative, self.max_model_len) if speculative else None
        num_blocks, max_num_seqs = self._size_cache(config)
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.init_graphs(max_num_seqs, self.max_num_batched_tokens)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, self.max_num_batched_tokens)
        self.sampler = Sampler()
        self.logits_processors = LogitsProcessors(self.tokenizer.eos_token_ids, model_cfg.vocab_size,
                                                  _grammar_compiler(config, model_cfg.vocab_size, self.tokenizer))
        self.requests: dict[str, Sequence] = {}
        self._with_deadline: dict[str, Sequence] = {}  # unfinished requests with a deadline (checked every step)
        self._aborted: list[Sequence] = []  # reported (finish_reason "abort") by the next step
        self._to_decode: list[tuple[Sequence, list[int]]] = []  # ended, text decoded once: (request, its tokens)
        self._in_flight: _Launched | None = None  # the launched step whose tokens are not taken in yet
        self._sampled_rows = SampledRows([])  # the last step's sampled sequences (engine/sampled_rows.py)
        self._num_finished = 0  # requests ended so far
        # unfinished requests that are not argmax_only (reads_output ones among them): while there are none, a step
        # checks no row for either
        self._num_not_argmax = 0
        # tensor-parallel workers get the in-flight tokens by a device broadcast (distributed/step.py); drafts
        # depend on the previous step's tokens, so speculation runs serial steps
        self._overlap = config.async_scheduling and not speculative
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        for name, path in (config.lora_modules or {}).items():
            try:
                self.load_lora_adapter(name, path)
            except ValueError as exc:
                raise StartupError(f"engine.lora_modules: {exc}") from None
        log.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_num_seqs %d, max_num_batched_tokens %d",
                 self.model_name, device, dtype, num_blocks, config.block_size, max_num_seqs,
                 self.max_num_batched_tokens)

    def _size_cache(self, config: EngineConfig) -> tuple[int, int]:
        per_seq = math.ceil(self.max_model_len / config.block_size)
        if self.device.type != "cuda":
            seqs = config.max_num_seqs or defaults.MAX_NUM_SEQS_CPU
            cap = max(per_seq, defaults.CPU_KV_CACHE_BYTES // self.runner.block_bytes())
            return config.num_kv_blocks or min(seqs * per_seq, cap), seqs
        bs, cap = config.block_size, config.max_num_seqs_cap
        if config.num_kv_blocks:
            return config.num_kv_blocks, config.max_num_seqs or memory.default_max_num_seqs(config.num_kv_blocks, bs,
                                                                                            cap)
        budget = self.runner.profile_kv_budget(self.max_num_batched_tokens, config.gpu_memory_utilization)
        block_bytes = self.runner.block_bytes()
        seqs = config.max_num_seqs or memory.default_max_num_seqs(memory.num_kv_blocks(budget, block_bytes), bs, cap)
        rows = seqs * (1 + (self.speculator.cfg.num_speculative_tokens if self.speculator else 0))  # verify rows
        blocks = memory.num_kv_blocks(budget - memory.sampler_bytes(rows, self.runner.cfg.vocab_size), block_bytes)
        if blocks < per_seq:
            raise StartupError(f"not enough GPU memory for one {self.max_model_len}-token sequence ({blocks} KV "
                               f"blocks of {bs} tokens fit, {per_seq} needed, with max_num_seqs {seqs}): lower "
                               "max_model_len or max_num_seqs, or raise gpu_memory_utilization")
        return blocks, seqs

    # ---- requests -------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0,
                    deadline: float | None = None, lora: str | None = None, stream: bool = True) -> None:
        """`deadline`: a time.monotonic() value; past it the request ends with finish_reason "timeout".
        `stream`: `step()` reports the request every step it advances; False: only the step it ends in (its text
        is then decoded once, at the end, unless stop strings need it as it grows).
        `lora`: the name of a loaded LoRA adapter to serve the request with (placed in a slot if it holds none);
        None: the base model. Raises ValueError (invalid here) or SlotsBusy (no adapter slot can be had now)."""
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        if self.config.watermark_key and params.watermark is None:
            params = replace(params, watermark=WatermarkConfig(self.config.watermark_key))
        if params.n != 1:
            raise ValueError(f"n: the engine serves n=1 per request (got {params.n}); fan out one request each")
        self.logits_processors.check(params)
        if params.prompt_logprobs is not None and not hasattr(self.runner, "prompt_logprobs"):
            raise ValueError("prompt_logprobs: not served with tensor_parallel_size > 1")
        if lora is not None:
            self._lora(lora).get(lora)  # a request for an unknown adapter is refused before any other check
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
        need = min(len(ids) + params.max_tokens, self.max_model_len)
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if need > capacity:  # it could never run, even alone: refuse rather than wait forever
            raise ValueError(f"prompt: {len(ids)} tokens + max_tokens {params.max_tokens} = {need} tokens, but one "
                             f"sequence's KV cache holds at most {capacity} tokens "
                             f"({self.block_manager.num_blocks} blocks of {self.block_manager.block_size})")
        seq = Sequence(request_id, text, ids, params, priority=priority, deadline=deadline)
        if lora is not None:  # last: a request refused above takes no slot from an idle adapter
            adapter = self.runner_lora.acquire(lora, {s.lora_slot for s in self.requests.values()} - {None})
            seq.lora_slot, seq.cache_salt = adapter.slot, adapter.cache_salt
        if params.seed is not None:
            seq.sampling.generator = make_generator(params.seed, self.device)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        seq.stop_checker = StopChecker(params.stop)
        seq.stream, seq.text_per_token = stream, stream or bool(seq.stop_checker.stop)
        seq.last_index = min(len(ids) + params.max_tokens, self.max_model_len) - 1
        seq.end_ids = frozenset(params.stop_token_ids or ()) | (
            frozenset() if params.ignore_eos else frozenset(self.tokenizer.eos_token_ids))
        seq.sampling.logits_processors.extend(self.logits_processors.for_request(params))
        seq.reads_output, seq.argmax_only = reads_output(seq.sampling), argmax_only(seq.sampling)
        self.requests[request_id] = seq
        if deadline is not None:
            self._with_deadline[request_id] = seq
        self._num_not_argmax += not seq.argmax_only
        self.scheduler.add(seq)
        self.prompt_tokens_total += len(ids)

    # ---- LoRA adapters --------------------------------------------------------------------------------------------
    def _lora(self, name: str):
        if self.runner_lora is None:
            raise ValueError(f"model: {name!r} is a LoRA adapter, but LoRA is off here (engine.enable_lora)")
        return self.runner_lora

    @property
    def runner_lora(self):
        return getattr(self.runner, "lora", None)

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Check and register a PEFT adapter (resident at once if a slot is free). ValueError
        (deepfleet.lora.adapter.AdapterError) naming the reason: LoRA off, a taken name, a bad or mismatched
        adapter."""
        if self.runner_lora is None:
            raise ValueError(f"lora_name: cannot load {name!r}: LoRA is off here (engine.enable_lora)")
        if not name or name == self.model_name:
            raise ValueError(f"lora_name: {name!r} must be non-empty and differ from the base model's name")
        self.runner_lora.load(name, path)
        log.info("LoRA adapter %r loaded from %s", name, path)

    def unload_lora_adapter(self, name: str) -> None:
        """Forget the adapter (and free its slot); refused while requests it serves are unfinished."""
        lora = self._lora(name)
        lora.get(name)
        resident = lora.resident.get(name)
        users = 0 if resident is None else sum(1 for s in self.requests.values() if s.lora_slot == resident.slot)
        if users:
            raise ValueError(f"lora_name: {name!r} serves {users} unfinished request(s): unload it once they end")
        lora.unload(name)
        log.info("LoRA adapter %r unloaded", name)

    def lora_adapters(self) -> dict[str, str]:
        """Loaded adapters (resident or not): name -> the directory it is read from."""
        lora = self.runner_lora
        return {} if lora is None else {name: str(path) for name, path in lora.loaded.items()}

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.get(request_id)
        if seq is not None and not seq.is_finished:
            self._finish(seq, "abort")
            self._aborted.append(seq)

    @property
    def max_num_seqs(self) -> int:
        """The batch capacity: most sequences in one step."""
        return self.scheduler.max_num_seqs

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
            spec_decode=replace(self.speculator.stats, accepted_per_position=list(
                self.speculator.stats.accepted_per_position)) if self.speculator else None,
            lora=self._lora_stats(),
        )

    def _lora_stats(self) -> LoRAStats | None:
        lora = self.runner_lora
        if lora is None:
            return None
        by_slot = {r.slot: name for name, r in lora.resident.items()}  # an unfinished request's adapter is resident

        def names(seqs) -> tuple[str, ...]:
            return tuple(sorted({by_slot[s.lora_slot] for s in seqs if s.lora_slot is not None}))

        return LoRAStats(lora.max_loras, names(self.scheduler.running), names(self.scheduler.waiting))

    # ---- stepping -------------------------------------------------------------------------------------------------
    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        if not seq.text_per_token:  # its whole text, decoded with the step's others (not an end token's own)
            out = seq.output_token_ids
            self._to_decode.append((seq, out[:-1] if reason == "stop" else out))
        self.scheduler.remove(seq)
        self.runner.forget(seq.request_id)
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        self.requests.pop(seq.request_id, None)
        self._with_deadline.pop(seq.request_id, None)
        self._num_not_argmax -= not seq.argmax_only
        self._num_finished += 1

    def step(self) -> list[RequestOutput]:
        """Schedule and launch this step, then (overlapped with the GPU running it) take in the previous step's
        tokens: detokenize, check stops, report. When a row to sample needs its whole output so far (penalties,
        logits processors: grammar masks, watermark), the step's forward is launched first, the previous step's
        tokens are taken in while it runs, and only then is the step sampled, so those rows see every token, as in
        a serial loop. With async scheduling off, a step's tokens are taken in before it returns; greedy tokens
        are the same either way."""
        ended = self._aborted
        self._aborted = []
        if self._with_deadline:
            now = time.monotonic()
            for seq in [s for s in self._with_deadline.values() if now >= s.deadline]:
                self._finish(seq, "timeout")
                ended.append(seq)
        prev, self._in_flight = self._in_flight, None
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        out = self.scheduler.schedule()
        if self.speculator is not None:
            self.speculator.fit(out)
            return self._outputs(ended, self._speculative_step(out) if out.scheduled else [])
        launched, advanced = None, []
        if out.scheduled:
            logits = self.runner.execute(out) if prev is None else self.runner.execute(out, prev.result.token_ids)
            self._take_prompt_logprobs()
            to_sample = self.runner.sampled
            if prev is not None and self._num_not_argmax and _reads_output(to_sample):
                advanced, prev = self._resolve(prev), None  # taken in while the forward runs, before sampling
                live = [row for row, s in enumerate(to_sample) if not s.is_finished]  # not those that just ended
                if logits is not None and len(live) < len(to_sample):
                    logits, to_sample = logits[live], [to_sample[row] for row in live]
            launched = self._sample(logits, to_sample) if logits is not None and to_sample else None
        if prev is not None:
            advanced = self._resolve(prev)
        if out.scheduled:
            self.scheduler.update_after_step(out)  # after prev's tokens are in: full blocks hash real tokens
        if launched is not None:
            if self._overlap:
                self._in_flight = launched
            else:
                advanced += self._resolve(launched)
        return self._outputs(ended, advanced)

    def _outputs(self, ended: list[Sequence], advanced: list[Sequence]) -> list[RequestOutput]:
        """Outputs of the requests that ended, and of `advanced` (streamed ones that advanced, and ones that ended
        as they advanced)."""
        if self._to_decode:
            ended_now, self._to_decode = self._to_decode, []
            texts = decode_outputs([s.detokenizer for s, _ in ended_now], [ids for _, ids in ended_now])
            for (seq, _), text in zip(ended_now, texts, strict=True):
                seq.text.append(text)
        return [self._output(s) for s in (*ended, *advanced)]

    def _sample(self, logits: torch.Tensor, to_sample: list[Sequence]) -> _Launched:
        """Launch the sampler without waiting for the GPU; every sampled sequence gets a placeholder token that
        the next step reads on the device and `_resolve` later replaces."""
        all_argmax = not self._num_not_argmax or all(s.argmax_only for s in to_sample)
        if to_sample != self._sampled_rows.seqs:  # (the same list as the last step's: kept)
            self._sampled_rows = SampledRows(to_sample)
        rows = self._sampled_rows
        result = self.sampler.sample(logits, rows.states, all_argmax)
        result.start_copy()
        return _Launched(rows, rows.add_placeholders(), result, self._num_finished)

    def _speculative_step(self, out) -> list[Sequence]:
        """Serial step with drafts (spec_decode/speculator.py): run, verify, append the emitted tokens, count only
        the kept positions as computed, then (MTP) draft for the next step. Returns the requests to report, as
        `_resolve`."""
        spec = self.speculator
        logits = self.runner.execute(out)
        self._take_prompt_logprobs()
        computed = list(out.scheduled)
        sampled = [s for s, n in computed if s.num_computed_tokens + n == s.num_tokens]
        emitted = spec.sample(logits, sampled, self.sampler) if sampled else []
        kept = {}
        for seq, tokens in zip(sampled, emitted, strict=True):
            drafts = spec.take_drafts_back(seq)
            kept[id(seq)] = len(tokens) - 1 - drafts  # rejected drafts' positions are not computed
            for tok in tokens:
                seq.append_token(tok.token_id)
                self.generation_tokens_total += 1
                self._append(seq, seq.num_tokens - 1, tok.token_id, tok)
                if seq.is_finished:
                    break
        out.scheduled = [(s, n + kept.get(id(s), 0)) for s, n in computed]
        mtp = spec.mtp_requests(computed, [n for _, n in out.scheduled]) if spec.cfg.method == "mtp" else []
        self.scheduler.update_after_step(out)
        if mtp:
            for seq, request in mtp:  # chained drafts write provisional KV one position on per draft
                if request.num_drafts > 1 and not self.block_manager.allocate(seq, request.num_drafts - 1):
                    request.num_drafts = 1
            spec.keep_mtp_drafts(mtp, self.runner.propose_mtp([r for _, r in mtp]))
        return [s for s in sampled if s.stream or s.is_finished]

    def _take_prompt_logprobs(self) -> None:
        """The step's prompt logprobs to the host (a wait for the GPU, only in steps that computed some)."""
        for seq, first, tensors in getattr(self.runner, "prompt_logprobs", ()):
            targets, chosen, ranks, *top = (t.tolist() for t in tensors)
            if first != len(seq.prompt_logprobs):  # recomputed after a preemption: already scored
                continue
            for i, (token, lp, rank) in enumerate(zip(targets, chosen, ranks, strict=True)):
                tops = dict(zip(top[0][i], top[1][i], strict=True)) if top else {}
                seq.prompt_logprobs.append({"token_id": token, "logprob": lp, "rank": rank, "top_logprobs": tops})

    def _resolve(self, launched: _Launched) -> list[Sequence]:
        """The step's tokens reach the host (its one device->host transfer); requests that ended meanwhile
        (stopped by the step before, aborted, timed out) drop theirs. Per token only the lists grow; text, stop
        and logprob work (`_append`) runs for the rows that need it: text built per token, an end token, the
        last token by length, logprobs asked. Returns the requests to report: the streamed ones (their text is built
        per token, so they take that path) and those that ended."""
        token_ids, sampled = launched.result.to_host_ids()
        # no logprobs, none of its rows ended, some row without per-token text: all rows at once
        if sampled is None and launched.num_finished == self._num_finished and not launched.rows.all_per_token:
            return self._resolve_all_rows(launched, token_ids)
        reported, dropped = [], 0
        append = self._append
        for row, (seq, index, token_id) in enumerate(zip(launched.rows.seqs, launched.indices, token_ids,
                                                         strict=True)):
            if seq.status is FINISHED:
                dropped += 1
                continue
            seq.token_ids[index] = token_id
            seq.sampling.output_token_ids.append(token_id)
            if seq.text_per_token or index >= seq.last_index or token_id in seq.end_ids or sampled is not None:
                append(seq, index, token_id, sampled[row] if sampled is not None else None)
                if seq.stream or seq.status is FINISHED:
                    reported.append(seq)
        self.generation_tokens_total += len(token_ids) - dropped
        return reported

    def _resolve_all_rows(self, launched: _Launched, token_ids: list[int]) -> list[Sequence]:
        """`_resolve` for all rows at once (engine/sampled_rows.py), then `_append` for those that need it."""
        reported, seqs, indices = [], launched.rows.seqs, launched.indices
        for row in launched.rows.take_in(indices, token_ids):
            seq = seqs[row]
            self._append(seq, indices[row], token_ids[row])
            if seq.stream or seq.status is FINISHED:
                reported.append(seq)
        self.generation_tokens_total += len(token_ids)
        return reported

    def _append(self, seq: Sequence, index: int, token_id: int, sampled: SampledToken | None = None) -> None:
        """Logprobs (from `sampled`, when the request asked for them), text (built per token) and stop checks for
        the token at `index` of token_ids, already appended (a later placeholder may follow it); per-token work
        is independent of the output length."""
        if seq.logprobs is not None:
            seq.logprobs.append({"token_id": token_id, "logprob": sampled.logprob,
                                 "top_logprobs": sampled.top_logprobs})
        params = seq.params
        generated = len(seq.sampling.output_token_ids)
        finish: tuple[str, int | None] | None = None
        if token_id in seq.end_ids:  # a stop token (its id is the stop reason) or EOS
            finish = ("stop", token_id if params.stop_token_ids and token_id in params.stop_token_ids else None)
        elif index >= seq.last_index:
            finish = ("length", None)
        if seq.text_per_token and self._append_text(seq, token_id, finish, generated >= params.min_tokens):
            finish = ("stop", seq.stop_checker.matched)
        if finish is not None:
            self._finish(seq, *finish)

    @staticmethod
    def _append_text(seq: Sequence, token_id: int, finish: tuple | None, armed: bool) -> bool:
        """The token's text, stop strings held back or found; True: a stop string ended the text."""
        if finish is not None and finish[0] == "stop":  # an end token: its own text is not part of the output
            delta = seq.detokenizer.flush()
        else:
            delta = seq.detokenizer.append(token_id)
            if finish is not None:
                delta += seq.detokenizer.flush()
        checker = seq.stop_checker
        stopped = False
        if checker.stop:
            stopped, delta = checker.feed(delta, finished=finish is not None, armed=armed)
        seq.text.append(delta)
        return stopped

    def _output(self, seq: Sequence) -> RequestOutput:
        """Cumulative output. The token and logprob lists are the request's own (no copy per step, which would
        grow with the output's length): they keep growing while the request runs, so copy one to keep a
        snapshot of an unfinished request."""
        completion = CompletionOutput(
            index=0, text=seq.text, token_ids=seq.output_token_ids, finish_reason=seq.finish_reason,
            logprobs=seq.logprobs, stop_reason=seq.stop_reason,
        )
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], seq.is_finished,
                             seq.num_cached_tokens, seq.prompt_logprobs)


def _reads_output(seqs: list[Sequence]) -> bool:
    """Some row samples from its whole output so far (penalties, logits processors)."""
    return any(s.reads_output for s in seqs)


@dataclass
class _Launched:
    rows: SampledRows  # the sampled sequences in row order
    indices: list[int]  # their placeholders' indices in token_ids
    result: SampleResult
    num_finished: int  # LLMEngine._num_finished at the launch: unchanged, none of its sequences ended since
