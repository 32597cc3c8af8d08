"""Speculative decoding: a cheap proposer drafts k tokens per decoding sequence, one target forward over the k + 1
tokens (the last real token and the drafts) scores them all, and an acceptance rule keeps a prefix of the drafts
plus one token of the target's own. Greedy acceptance reproduces non-speculative greedy decoding token for token;
for temperature > 0 rejection sampling keeps the target's distribution (verify.py).

Modules: config.py (the `engine.speculative` setting), ngram.py (prompt-lookup drafts, any model), mtp.py
(DeepSeek-V3/R1's multi-token-prediction layer as the draft, run on the target's hidden states), verify.py
(acceptance), speculator.py (what the engine calls each step), metrics.py (acceptance counters)."""
