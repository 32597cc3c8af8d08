"""Paged KV-cache blocks with prefix caching.

A full block is identified by the hash of its tokens chained with the hash of the block before it, so equal hashes
mean equal whole prefixes. Freed blocks keep their hash and stay findable until they are reused (least recently
freed first), so a later request with the same prefix (a system prompt, a chat history) skips recomputing it.
Blocks are reference counted: several running sequences may share a cached prefix block. A request served with a
LoRA adapter roots its chain in the adapter's salt, so its KV is never found by another adapter or the base model."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from deepfleet.engine.sequence import Sequence


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # reuse order: oldest first
        self.cached: dict[bytes, int] = {}  # hash of a full block -> block id
        self.seq_hashes: dict[str, list[bytes]] = {}  # request id -> hashes of its full blocks so far
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found
        # sequences whose block table changed since the last take_changed(): the model runner's persistent rows
        # (engine/input_batch.py) copy only these (an ordered set: a table may change several times in between)
        self.changed: dict[Sequence, None] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def take_changed(self) -> list[Sequence]:
        changed, self.changed = list(self.changed), {}
        return changed

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hashes[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.block_hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def allocate_prefix(self, seq: Sequence) -> tuple[int, int]:
        """On admission with no blocks: attach cached blocks of the prompt's leading full blocks. Returns (tokens
        looked up, tokens found). At least one token is always left to compute so the step yields logits."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        self.seq_hashes[seq.request_id] = []
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:  # prompt logprobs need every position
            return 0, 0
        bs = self.block_size
        n_full = (seq.num_tokens - 1) // bs
        parent = seq.cache_salt
        for i in range(n_full):
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            self.seq_hashes[seq.request_id].append(h)
            parent = h
        hit = len(seq.block_table) * bs
        seq.num_computed_tokens = hit
        if hit:
            self.changed[seq] = None
        return n_full * bs, hit

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens of `seq`; False (and nothing changed) if blocks run out."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free):
            return False
        if need:
            seq.block_table.extend(self._take() for _ in range(need))
            self.changed[seq] = None
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: hash blocks that became full of computed tokens so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        hashes = self.seq_hashes.setdefault(seq.request_id, [])
        bs = self.block_size
        while (len(hashes) + 1) * bs <= seq.num_computed_tokens:
            i = len(hashes)
            h = block_hash(hashes[-1] if hashes else seq.cache_salt, seq.token_ids[i * bs : (i + 1) * bs])
            hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached:
                self.cached[h] = block
                self.block_hashes[block] = h

    def free_seq(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # tail blocks are least likely shared: reuse them first
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        self.changed[seq] = None
        self.seq_hashes.pop(seq.request_id, None)
