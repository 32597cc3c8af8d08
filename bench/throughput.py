"""Engine throughput benchmark (GPU): `python bench/throughput.py --shape 7b` (same as `deepfleet bench`).
Random-weight DeepSeek-R1-Distill-Qwen shapes, bf16, prompt 128 -> 128 new tokens; prints deepfleet beside
Hugging Face transformers eager from the same run and the HBM floor. Results go to bench/RESULTS.md."""

import argparse
import traceback

from deepfleet.engine.benchmark import SHAPES, run

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["1.5b", "7b"])
    ap.add_argument("--num-requests", type=int, default=2000)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers baseline")
    args = ap.parse_args()
    for shape in args.shape:
        try:
            run(shape, args.num_requests, args.prompt_len, args.output_len, hf_baseline=not args.no_hf)
        except Exception:  # one failing shape should not hide the other's figures
            traceback.print_exc()
