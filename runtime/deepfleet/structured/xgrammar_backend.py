"""Grammar masks with xgrammar: compiled grammars (cached, compiled off the engine loop with a deadline) and one
matcher per request that yields its allowed-token bitmask and follows each sampled token.

Why xgrammar rather than llguidance: it is the default of vLLM and SGLang (the behaviour users compare against),
compiles JSON Schema, regex and EBNF to one grammar form with a token-mask cache computed once per grammar, ships
CPU and CUDA/Triton bitmask kernels that apply a whole batch's masks in place with one call, and installs as a
plain wheel on CPU hosts (checked on the build machines). llguidance computes masks lazily per step with no
compile step (better for one-off huge schemas) but its mask application and serving integration would be ours to
write."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import xgrammar as xgr

from deepfleet.structured.spec import StructuredOutput

_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+: ")  # "[22:56:02] /project/cpp/grammar_parser.cc:820: "
MAX_CACHED_GRAMMARS = 256  # compiled grammars kept (LRU); failures are remembered too, so a hostile one is cheap


def tokenizer_info(model_dir: str | Path, vocab_size: int, eos_token_ids: set[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of a model's vocabulary, from its tokenizer.json (as TokenizerInfo.from_huggingface reads a
    fast tokenizer, without transformers). `vocab_size` is the model's (logits width), often padded past the
    tokenizer's."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    vocab = backend.get_vocab(with_added_tokens=True)
    encoded = [""] * max(vocab_size, max(vocab.values()) + 1)
    for token, idx in vocab.items():
        encoded[idx] = token
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgr.TokenizerInfo(encoded[:vocab_size], vocab_type=metadata["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=sorted(eos_token_ids), add_prefix_space=metadata["add_prefix_space"])


class GrammarCompiler:
    """Compiles StructuredOutput specs in worker threads; `submit` never blocks the engine loop."""

    def __init__(self, info: xgr.TokenizerInfo, timeout_s: float, workers: int = 2) -> None:
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deepfleet-grammar")
        self.timeout_s = timeout_s
        self.vocab_size = info.vocab_size
        self._cache: OrderedDict[tuple[str, str], cf.Future] = OrderedDict()

    def submit(self, spec: StructuredOutput) -> cf.Future:
        """A future of the compiled grammar (shared by every request with the same spec)."""
        future = self._cache.get(spec.key)
        if future is None:
            future = self._cache[spec.key] = self._pool.submit(self._compile, spec)
            future.started_at = time.monotonic()
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(spec.key)
        return future

    def result(self, spec: StructuredOutput, future: cf.Future) -> Any:
        """The compiled grammar, or ValueError naming the field (invalid, or not compiled within timeout_s)."""
        if not future.done():
            left = future.started_at + self.timeout_s - time.monotonic()
            try:
                return future.result(timeout=max(left, 0))
            except cf.TimeoutError:
                # the compile runs on (xgrammar cannot be interrupted) but this and later requests are refused
                failed: cf.Future = cf.Future()
                failed.set_exception(ValueError(f"{spec.field}: grammar compilation took longer than "
                                                f"{self.timeout_s:g} s (too complex)"))
                self._cache[spec.key] = failed
                raise failed.exception() from None
        return future.result()

    def expired(self, future: cf.Future) -> bool:
        return not future.done() and time.monotonic() >= future.started_at + self.timeout_s

    def _compile(self, spec: StructuredOutput) -> Any:
        try:
            if spec.kind == "json_object":
                return self._compiler.compile_builtin_json_grammar()
            if spec.kind == "json_schema":
                # compact JSON: a free-whitespace grammar lets a weak model pad forever inside max_tokens
                return self._compiler.compile_json_schema(spec.spec, any_whitespace=False, strict_mode=True)
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.spec)
            if spec.kind == "choice":
                options = json.loads(spec.spec)
                return self._compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options))
            return self._compiler.compile_grammar(spec.spec)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError/InvalidJSONError with its parser's message
            why = _LOG_PREFIX.sub("", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise ValueError(f"{spec.field}: cannot be compiled: {why[:300]}") from None


class GrammarMask:
    """One request's matcher, a mask processor of the sampler's hook: it first follows the tokens sampled since its
    last fill, then writes what the grammar allows next (only end tokens once the grammar is complete) into its row
    of the step's bitmask. The sampler applies every constrained row of the batch at once (apply_masks)."""

    def __init__(self, compiled: Any) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._seen = 0  # output tokens the matcher has accepted
        self.vocab_size = compiled.tokenizer_info.vocab_size

    def fill_mask(self, output_ids: list[int], bitmask: torch.Tensor, row: int) -> None:
        for token_id in output_ids[self._seen:]:
            if not self._matcher.is_terminated():
                self._matcher.accept_token(token_id)
        self._seen = len(output_ids)
        self._matcher.fill_next_token_bitmask(bitmask, row)


def apply_masks(logits: torch.Tensor, masks: list[tuple[int, GrammarMask, list[int]]]) -> None:
    """In place on the batch's logits [rows, vocab]: each (row, mask, output ids so far) fills its row of one host
    bitmask (pinned where the logits are on a GPU, so the copy is asynchronous), which goes to the device in one
    copy, and one call applies the constrained rows; the other rows are left as they are. Per step: one copy and
    one launch, not one pageable copy and one launch per constrained request."""
    words = (masks[0][1].vocab_size + 31) // 32
    bitmask = torch.empty((logits.shape[0], words), dtype=torch.int32, pin_memory=logits.is_cuda)
    for row, mask, output_ids in masks:
        mask.fill_mask(output_ids, bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    indices=[row for row, _, _ in masks])
