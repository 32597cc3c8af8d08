"""The 'before' tree for issue 15's single-GPU no-regression check: `python bench/tp_size1_baseline.py RUNTIME_DIR`
rewrites a copy of runtime/ so that at tensor_parallel_size 1 the models use the plain layers they used before the
distributed ones existed (models/layers.Linear for every projection, Embedding for the tokens and a plain linear LM
head, as at commit 20de533), everything else unchanged. Benchmarking that copy and the unmodified tree in the same
device call isolates what the distributed code path costs the one-GPU engine (see bench/RESULTS.md)."""

import sys
from pathlib import Path

EDITS = {
    "deepfleet/models/layers.py": [
        ("    if parallel is None:\n        return Linear(in_features, out_features, bias)\n",
         "    if parallel is None or parallel_state.group().size == 1:\n"
         "        return Linear(in_features, out_features, bias)\n"),
    ],
    "deepfleet/models/base.py": [
        ("from deepfleet.models.layers import RMSNorm, RotaryEmbedding",
         "from deepfleet.models.layers import Embedding, RMSNorm, RotaryEmbedding, linear"),
        ("self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)",
         "self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)"),
        ("self.lm_head = None if self.tied else VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)",
         "self.lm_head = None if self.tied else linear(cfg.hidden_size, cfg.vocab_size, quantize=False)"),
        ("        return (self.model.embed_tokens if self.tied else self.lm_head).logits(hidden)",
         "        weight = self.model.embed_tokens.weight if self.tied else self.lm_head.weight\n"
         "        return torch.nn.functional.linear(hidden, weight).float()"),
    ],
}

if __name__ == "__main__":
    root = Path(sys.argv[1])
    for rel, edits in EDITS.items():
        path = root / rel
        text = path.read_text()
        for old, new in edits:
            if old not in text:
                raise SystemExit(f"{path}: expected text not found (the tree changed): {old!r}")
            text = text.replace(old, new)
        path.write_text(text)
    print(f"{root}: single-GPU path on the plain layers")
