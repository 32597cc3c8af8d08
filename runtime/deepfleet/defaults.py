"""Runtime defaults, defined once. Pulumi (infra/), the Ansible role defaults and the server config
read these values; tests guard that the copies Ansible needs in YAML stay equal to them."""

API_PORT = 8000  # OpenAI API, /healthz, /readyz and /metrics share this port
# The runtime's container image (runtime/Dockerfile): <registry>/IMAGE_REPOSITORY:<deepfleet.__version__>.
# scripts/build-image.sh tags its build so, infra's workload runs it from workload.image_registry.
IMAGE_REPOSITORY = "deepfleet/runtime"

# Engine (source documents: token-budget batcher max_tokens 4096, max_batch 32). The step's token budget defaults
# to 4096 on the CPU and smaller GPUs; on GPUs with LARGE_GPU_BYTES or more (H100, H200, MI300X) to 16384, as vLLM's
# offline default there: a prefill-carrying step's kernels cost 20.7 us per token against 24.5 at 4096 (H200, 7B,
# bench/RESULTS.md), at the cost of a longer step (~350 ms at 7B) while a burst of prompts is taken in.
MAX_NUM_BATCHED_TOKENS = 4096
MAX_NUM_BATCHED_TOKENS_LARGE_GPU = 16384
LARGE_GPU_BYTES = 70 << 30
MAX_NUM_SEQS_CPU = 32
KV_BLOCK_SIZE = 16
KV_CACHE_DTYPE = "auto"  # "auto": the compute dtype; "fp8": e4m3 (deepfleet/quant/kv_cache.py)
MAX_NUM_SEQS_GPU_CAP = 1024  # GPU default max_num_seqs: KV tokens / GPU_TOKENS_PER_SEQ, capped here
GPU_TOKENS_PER_SEQ = 1024
# CUDA graphs for prefill passes (a TTFT of one short prompt is otherwise ~25 ms of eager kernel launches): token
# buckets up to this many tokens, for steps with at most PREFILL_GRAPH_MAX_SEQS prefill chunks
PREFILL_GRAPH_MAX_TOKENS = 4096
PREFILL_GRAPH_MAX_SEQS = 64
# A prefill pass whose every chunk is at least this long runs eagerly with torch SDPA (cuDNN / flash attention),
# which is ~2.5x the Triton paged kernel's rate on long fresh prompts; shorter chunks keep the paged kernel
LONG_PREFILL_TOKENS = 2048
GPU_MEMORY_UTILIZATION = 0.9
GPU_MEMORY_RESERVE_BYTES = 1 << 30  # CUDA graphs' activations, allocator slack
SAMPLER_VOCAB_TEMPORARIES = 4  # [max_num_seqs, vocab] float32 tensors a non-greedy draw holds at once (+ the logits)
CPU_KV_CACHE_BYTES = 4 << 30  # upper bound of the KV cache on CPU hosts
# Tensor parallelism: a collective (or a worker's heartbeat) silent this long ends the engine, naming the rank.
# Generous: the ranks compile and capture CUDA graphs at start-up at slightly different speeds.
COLLECTIVE_TIMEOUT_S = 300.0
# Structured output: a grammar not compiled within this is refused (400); the engine keeps serving meanwhile
GRAMMAR_COMPILE_TIMEOUT_S = 10.0
# LoRA (as vLLM's --max-loras / --max-lora-rank): adapter slots held on the device beside the base model (adapters
# resident at once, each may be in every batch; more may be loaded, lora/manager.py evicts the least recently used
# idle one) and the largest adapter rank they hold (smaller ranks are zero-padded to it)
MAX_LORAS = 4
MAX_LORA_RANK = 16
# Speculative decoding (engine.speculative): drafts per step (DeepSeek's MTP is trained for 1; vLLM's default for
# prompt lookup is also small), the n-gram lengths prompt lookup tries (vLLM's prompt_lookup_min/max)
NUM_SPECULATIVE_TOKENS = 2
MAX_SPECULATIVE_TOKENS = 8
PROMPT_LOOKUP_MIN = 1
PROMPT_LOOKUP_MAX = 3

# Server overload control: admission slots default to the engine's max_num_seqs (a smaller default would cap the
# batch); the source documents' async priority scheduler uses max_concurrent 16, a setting away
SOURCE_DOCS_MAX_CONCURRENT = 16
# On SIGTERM the server finishes in-flight requests for this long; k8s terminationGracePeriodSeconds must exceed it.
SHUTDOWN_GRACE_S = 30
RATE_LIMIT_PER_MINUTE = 100
# Rotated audit files kept when the runtime rotates its audit log itself (audit.max_bytes, e.g. in a pod).
AUDIT_BACKUPS = 4

# Generic dynamic batcher (source documents: max_batch 32, max wait 5 ms; grow x1.5 < 30 %, shrink x0.7 > 80 %)
BATCHER_MAX_BATCH_SIZE = 32
BATCHER_MAX_QUEUE_DELAY_MS = 5.0
# API server processes in front of the one engine process (server.api_processes, as vLLM's --api-server-count): one
# Python process emits ~32k SSE tokens/s (H200, 1.5B at 256 streams: 58 % of the offline engine, bench/RESULTS.md).
# On a GPU host the default is one per CPUS_PER_API_PROCESS cores, at most API_PROCESSES_MAX: the rest of the cores
# stay with the engine process, its tensor-parallel workers and tokenization; 1 on CPU hosts (no gain there).
API_PROCESSES_MAX = 4
CPUS_PER_API_PROCESS = 4
