"""Every GPU kernel of one batch-1 decode step of a full-width DeepSeek-V3 (1 dense + 1 MoE layer, block FP8,
random weights made on the GPU), in launch order with its duration, and the step's CUDA-graph time: where the
per-layer time goes beyond the bytes the layer reads (issue 14).

    python bench/v3_decode_profile.py --out OUT [--commit SHA] [--batch 1] [--start-up-choices]

Writes OUT/v3_kernels.txt (the timeline), OUT/v3_profile.jsonl (bench/results.jsonl format: graph time, kernel
sum, launch count) and OUT/v3_trace.json (chrome trace)."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from fp8_kernels import _v3_decode, _v3_model, choose_start_up_paths, graph_time_ms
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--start-up-choices", action="store_true",
                    help="first make the engine's start-up choices (choose_gemv), as its batch-1 graph runs them")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    model = _v3_model(2)
    if a.start_up_choices:
        choose_start_up_paths(model)
    step = _v3_decode(model, 2, a.batch)
    with torch.inference_mode():
        graph_ms = graph_time_ms(step)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(a.out / "v3_trace.json"))
    trace = json.loads((a.out / "v3_trace.json").read_text())
    kernels = sorted((e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    lines = [f"graph step {graph_ms * 1e3:.1f} us; {len(kernels)} kernels, sum "
             f"{sum(e['dur'] for e in kernels):.1f} us (eager)", "start_us dur_us gap_us name"]
    t0, prev_end = kernels[0]["ts"], kernels[0]["ts"]
    for e in kernels:
        lines.append(f"{e['ts'] - t0:9.1f} {e['dur']:7.1f} {e['ts'] - prev_end:7.1f} {e['name'][:150]}")
        prev_end = e["ts"] + e["dur"]
    (a.out / "v3_kernels.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:2]), flush=True)
    shape = f"V3 2-layer (1 dense + 1 MoE) batch {a.batch}{', start-up choices' if a.start_up_choices else ''}"
    date, dev = datetime.date.today().isoformat(), torch.cuda.get_device_name()
    with (a.out / "v3_profile.jsonl").open("w") as f:
        for workload, metric, value, unit in (
                ("decode step, CUDA graph replay", "ms", graph_ms, "ms"),
                ("eager step, sum of GPU kernel time", "ms", sum(e["dur"] for e in kernels) / 1e3, "ms"),
                ("eager step, kernel launches", "count", len(kernels), "count")):
            f.write(json.dumps({"date": date, "device": dev, "commit": a.commit, "shape": shape,
                                "workload": workload, "metric": metric, "value": round(value, 4), "unit": unit})
                    + "\n")


if __name__ == "__main__":
    main()
