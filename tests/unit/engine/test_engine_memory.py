"""The engine's KV sizing arithmetic against hand-computed figures."""

from deepfleet import defaults
from deepfleet.engine import memory


def test_gqa_kv_bytes_7b_distill():
    # Qwen2-7B shape: 4 kv heads x 128 dims, keys and values, bf16 = 2,048 B per layer; 28 layers = 57,344 B/token
    assert memory.kv_bytes_per_token_per_layer((4, 128, 128), 2) == 2_048
    assert memory.kv_block_bytes((4, 128, 128), 28, 1, 2) == 57_344
    assert memory.kv_block_bytes((4, 128, 128), 28, 16, 2) == 917_504


def test_mla_latent_kv_bytes_v3():
    # DeepSeek-V3: one latent "head" of 512 + 64 rope dims, no separate values; bf16 1,152 B/layer, 61 layers
    assert memory.kv_bytes_per_token_per_layer((1, 576, None), 2) == 1_152
    assert memory.kv_block_bytes((1, 576, None), 61, 1, 2) == 70_272


def test_budget_and_blocks():
    gib = 1 << 30
    budget = memory.kv_budget_bytes(total=80 * gib, memory_utilization=0.9, used_elsewhere=gib, peak=20 * gib)
    assert budget == 72 * gib - gib - 20 * gib - defaults.GPU_MEMORY_RESERVE_BYTES
    assert memory.num_kv_blocks(10_000, 3_000) == 3
    assert memory.num_kv_blocks(-5, 3_000) == 0


def test_default_max_num_seqs():
    assert memory.default_max_num_seqs(1_000, 16) == 16_000 // defaults.GPU_TOKENS_PER_SEQ
    assert memory.default_max_num_seqs(1, 16) == 1
    assert memory.default_max_num_seqs(10**9, 16) == defaults.MAX_NUM_SEQS_GPU_CAP


def test_default_token_budget_by_gpu_memory():
    gib = 1 << 30
    assert memory.default_max_num_batched_tokens(None) == 4096  # CPU
    assert memory.default_max_num_batched_tokens(48 * gib) == 4096  # L40S
    assert memory.default_max_num_batched_tokens(143_771 << 20) == 16384  # H200 (141 GB)
    assert memory.default_max_num_batched_tokens(80 * gib) == 16384  # H100 80 GB
