"""Engine benchmarks (GPU): `python bench/throughput.py --shape 1.5b 7b` (same as `deepfleet bench`).
Random-weight DeepSeek-R1-Distill-Qwen shapes, bf16; workloads and their distributions in
runtime/deepfleet/engine/benchmark.py. Prints a table and appends one JSON record per figure to
bench/results.jsonl (set DEEPFLEET_COMMIT to the commit measured); the dated entry goes to bench/RESULTS.md."""

import argparse
import logging
from pathlib import Path

from deepfleet.engine.benchmark import SHAPES, WORKLOADS, run

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["1.5b", "7b"])
    ap.add_argument("--workload", choices=WORKLOADS, nargs="+", default=list(WORKLOADS))
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("results.jsonl"))
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of each workload's request count")
    ap.add_argument("--quantization", choices=["fp8"], default=None, help="engine.quantization (default: bf16)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # start-up: graphs, GEMV
    run(args.shape, args.workload, args.results, args.scale, args.quantization)
