"""`deepfleet plan` against the engine's own KV sizing on this GPU: the R1-Distill-Qwen-7B preset (bf16, random
weights) loaded by the real engine, which profiles its peak and sizes its KV cache; the planner's estimate for the
same card (its total memory as measured here, and the hardware table's entry) printed beside it. One JSON line.

    PYTHONPATH=runtime python3 bench/plan_check.py [--preset 7b]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from deepfleet.engine import memory
from deepfleet.engine.llm_engine import EngineConfig, LLMEngine
from deepfleet.models.tiny import build_tokenizer
from deepfleet.plan import capacity, hardware
from deepfleet.plan.footprint import footprint, model_config
from deepfleet.plan.presets import preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="7b")
    args = ap.parse_args()
    raw = preset(args.preset)
    seen: dict[str, float] = {}
    engine_budget = memory.kv_budget_bytes

    def recording_budget(total, memory_utilization, used_elsewhere, peak):
        seen.update(total=total, used_elsewhere=used_elsewhere, peak=peak)
        return engine_budget(total, memory_utilization, used_elsewhere, peak)

    memory.kv_budget_bytes = recording_budget  # the model runner calls memory.kv_budget_bytes
    with tempfile.TemporaryDirectory() as d:
        model_dir = Path(d)
        (model_dir / "config.json").write_text(json.dumps({**raw, "eos_token_id": None, "bos_token_id": None}))
        build_tokenizer(544).save(str(model_dir / "tokenizer.json"))
        t = time.perf_counter()
        engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="bfloat16", load_format="dummy",
                                        enforce_eager=True))
        load_s = time.perf_counter() - t
        weights_allocated = torch.cuda.memory_allocated() - sum(
            k.numel() * k.element_size() + (v.numel() * v.element_size() if v is not None else 0)
            for k, v, *_ in engine.runner.kv_caches)
        engine_blocks = engine.block_manager.num_blocks
        context = engine.max_model_len
        cfg, _ = model_config(raw, model_dir)
    memory.kv_budget_bytes = engine_budget  # the planner below calls it too: keep `seen` the engine's
    fp = footprint(args.preset, cfg, "bfloat16")
    measured_gpu = hardware.GPU("measured", torch.cuda.get_device_name(), int(seen["total"]), 8, "")
    rows = {}
    for label, g in (("measured_total", measured_gpu), ("table_h200", hardware.gpu("h200"))):
        p = capacity.place(fp, g, 1, context)
        rows[label] = {"plan_blocks": p.num_kv_blocks, "ratio": p.num_kv_blocks / engine_blocks,
                       "plan_weights": p.weights_per_gpu, "plan_activation": p.activation_per_gpu,
                       "plan_peak": p.profile_peak_per_gpu}
    print(json.dumps({
        "device": torch.cuda.get_device_name(), "preset": args.preset, "load_s": round(load_s, 1),
        "total_bytes": seen["total"], "used_elsewhere_bytes": seen["used_elsewhere"], "peak_bytes": seen["peak"],
        "weights_allocated_bytes": weights_allocated, "engine_blocks": engine_blocks,
        "plan_cuda_context_bytes": capacity.CUDA_CONTEXT_BYTES, "plan_weight_bytes": fp.weight_bytes, **rows,
    }))


if __name__ == "__main__":
    main()
