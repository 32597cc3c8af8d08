"""Building blocks shared by the models: the linear-layer factory, embeddings, RMSNorm, SiLU-gated MLP activation and
rotary position embeddings with the scaling variants the supported configs use (llama3, yarn, linear).

Parameters are created with `torch.empty` (the loader overwrites every one) and each carries a `weight_loader`, so
a quantized (FP8) or tensor-parallel linear can replace `Linear` by changing only `linear()` and its loaders."""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepfleet import quant
from deepfleet.quant.linear import Fp8Linear

log = logging.getLogger(__name__)

# On CUDA the small element-wise steps are one kernel each: RMSNorm with its residual add and SiLU·mul are Triton
# kernels (deepfleet/kernels/rms_norm.py, silu_mul.py) on every CUDA tensor; the interleaved RoPE (DeepSeek) is
# compiled with torch.compile when the model runner turns that on (CUDA unless enforce_eager). The Qwen2/Llama
# attention rotates and writes the KV cache in one kernel (models/attention.py). CPU (and the parity tests) run the
# plain code.
_FUSE = False


def use_fused_kernels(enabled: bool) -> None:
    global _FUSE
    _FUSE = enabled


def _fusable(fn):
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if _FUSE and args[0].is_cuda:
            if compiled is None:
                # one compile per feature width (norm widths are static): DeepSeek-V3 alone has several, and a
                # process that loads several models (tests, benchmarks) more than dynamo's default limit of 8
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                compiled = torch.compile(fn, dynamic=True, fullgraph=True)
            return compiled(*args)
        return fn(*args)

    return run


@functools.cache
def _gemv_kernel():
    from deepfleet.kernels import gemv  # imports triton: only where there is a GPU

    return gemv


def _one_row(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.shape[0] == 1 and x.is_cuda and x.stride(1) == 1


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gemv_tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x Wᵀ (+ b): for one row with `gemv_tiles` (the layer's, set by choose_gemv where the Triton GEMV was faster
    for its shape), that GEMV; else cuBLAS."""
    if gemv_tiles is not None and _one_row(x):
        return _gemv_kernel().gemv(x, weight, bias, tiles=gemv_tiles)
    return F.linear(x, weight, bias)


def project_add_norm(proj: nn.Module, x: torch.Tensor, residual: torch.Tensor,
                     norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(proj(x) + residual), proj(x) + residual): for one row where choose_gemv set `proj.gemv_norm_tiles`,
    one GEMV launch with the add and the norm in its epilogue (`proj.gemv_add_norm`: kernels/gemv.py's or, for an
    Fp8Linear, kernels/fp8_gemm.py's); else the projection, then the norm with its residual add."""
    tiles = getattr(proj, "gemv_norm_tiles", None)  # (a LoRA wrapper has none)
    if tiles is not None and _one_row(x):
        return proj.gemv_add_norm(x, residual, norm, tiles)
    return norm(proj(x), residual)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor, shard: Any = None) -> None:
    if shard is not None:
        raise ValueError(f"parameter has no shard {shard!r}")
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"shape {tuple(tensor.shape)} does not match the expected {tuple(param.shape)}")
    param.data.copy_(tensor)


class Linear(nn.Module):
    """y = x Wᵀ (+ b). `out_features` given as a list fuses several checkpoint tensors (q/k/v, gate/up) into one
    matrix: one GEMM instead of several, which matters for small-batch decode. Shards load by index."""

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False):
        super().__init__()
        self.shard_sizes = list(out_features) if isinstance(out_features, list | tuple) else [out_features]
        self.shard_offsets = [sum(self.shard_sizes[:i]) for i in range(len(self.shard_sizes))]
        self.in_features, self.out_features = in_features, sum(self.shard_sizes)
        self.weight = _param(self.out_features, in_features)
        self.bias = _param(self.out_features) if bias else None
        fused = len(self.shard_sizes) > 1
        for p in (self.weight, self.bias):
            if p is not None:
                p.weight_loader = self._load_shard
                p.expected_shards = list(range(len(self.shard_sizes))) if fused else [None]

    def _load_shard(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None = None) -> None:
        if shard is None:
            return default_weight_loader(param, tensor)
        if not 0 <= shard < len(self.shard_sizes):
            raise ValueError(f"shard index {shard} out of range")
        target = param.data.narrow(0, self.shard_offsets[shard], self.shard_sizes[shard])
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"shape {tuple(tensor.shape)} does not match the expected {tuple(target.shape)}")
        target.copy_(tensor)

    # batch-1 GEMV tiles for this layer's shape, or None for cuBLAS: set per model by choose_gemv (so two engines
    # in one process each keep their own choice)
    gemv_tiles: tuple[int, int, int, int] | None = None
    # batch-1 GEMV tiles with the following residual add + RMSNorm in its epilogue (project_add_norm), or None:
    # set by choose_gemv on O and down projections
    gemv_norm_tiles: tuple[int, int, int, int] | None = None

    def gemv_candidates(self) -> list[tuple[int, int, int, int]]:
        return _gemv_kernel().CANDIDATE_TILES

    def gemv(self, x: torch.Tensor, tiles: tuple[int, int, int, int], silu_mul: bool = False) -> torch.Tensor:
        """One row x [1, K]: the Triton GEMV at `tiles`; `silu_mul` (a fused [gate; up] layer): silu(gate)·up."""
        return _gemv_kernel().gemv(x, self.weight, self.bias, silu_mul=silu_mul, tiles=tiles)

    def gemv_add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm,
                      tiles: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One row: (norm(self(x) + residual), self(x) + residual) in one GEMV launch at `tiles`."""
        return _gemv_kernel().gemv_add_norm(x, self.weight, self.bias, residual, norm.weight, norm.eps, tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight, self.bias, self.gemv_tiles)


def linear(in_features: int, out_features: int | list[int], bias: bool = False, quantize: bool = True,
           parallel: str | None = None, unit: int = 1, reduce: bool = True) -> nn.Module:
    """The one place linear layers are made: swap in quantized / parallel variants here. `quantize=False` keeps a
    layer in the compute dtype under a quantized model (lm_head, as the FP8 checkpoints publish it).
    `parallel`: None (replicated), "column" (output features split in whole `unit`s, e.g. heads) or "row" (input
    features split, partial sums all-reduced unless `reduce=False`); see deepfleet/distributed/layers.py."""
    from deepfleet.distributed import parallel_state

    spec = quant.current() if quantize else None
    if spec is not None and (parallel is None or parallel_state.group().size == 1):
        return spec.linear(in_features, out_features, bias)
    if parallel is None:
        return Linear(in_features, out_features, bias)
    from deepfleet.distributed import layers as tp

    if parallel == "row":
        if spec is not None:
            return tp.Fp8RowParallelLinear(in_features, out_features, bias, spec, reduce)
        return tp.RowParallelLinear(in_features, out_features, bias, reduce)
    sizes = list(out_features) if isinstance(out_features, list | tuple) else [out_features]
    shards = [(n // unit, unit) for n in sizes]
    if spec is not None:
        return tp.Fp8ColumnParallelLinear(in_features, shards, bias, spec)
    return tp.ColumnParallelLinear(in_features, shards, bias)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = _param(num_embeddings, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # statistics in float32 whatever the activation dtype, as the reference implementations do
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@functools.cache
def _rms_norm_kernel():
    from deepfleet.kernels.rms_norm import rms_norm  # imports triton: only where there is a GPU

    return rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = _param(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`: (norm(x + residual), x + residual), the residual add fused into the norm."""
        if x.is_cuda:
            rows = x.reshape(-1, x.shape[-1])
            out = _rms_norm_kernel()(rows, self.weight, self.eps,
                                     None if residual is None else residual.reshape(rows.shape))
            if residual is None:
                return out.view(x.shape)
            return out[0].view(x.shape), out[1].view(x.shape)
        if residual is None:
            return _rms_norm_ref(x, self.weight, self.eps)
        residual = x + residual
        return _rms_norm_ref(residual, self.weight, self.eps), residual


@functools.cache
def _silu_mul_kernel():
    from deepfleet.kernels.silu_mul import silu_mul  # imports triton: only where there is a GPU

    return silu_mul


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        return _silu_mul_kernel()(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matrix."""

    # batch-1 GEMV tiles of gate_up (a Linear or an Fp8Linear) with SiLU·mul in its epilogue, or None: set by
    # choose_gemv
    gemv_silu_tiles: tuple[int, int, int, int] | None = None

    def __init__(self, hidden: int, inner: int, bias: bool = False, reduce: bool = True):
        super().__init__()
        self.gate_up_proj = linear(hidden, [inner, inner], bias=bias, parallel="column")
        self.down_proj = linear(inner, hidden, bias=bias, parallel="row", reduce=reduce)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x): the down projection's input."""
        if self.gemv_silu_tiles is not None and _one_row(x):
            return self.gate_up_proj.gemv(x, self.gemv_silu_tiles, silu_mul=True)
        return silu_and_mul(self.gate_up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activate(x))


def _graph_ms(fn, replays: int = 10) -> float:
    """GPU time of `fn` per call, from CUDA-graph replays (launch gaps out of the figure)."""
    fn()  # compiles, settles cuBLAS's choice
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def _gemv_layers() -> tuple[type, ...]:
    """The layers with a batch-1 GEMV of their own (`gemv_candidates`, `gemv`, `gemv_add_norm`): Linear (and its
    column/row-parallel forms) and Fp8Linear (the same)."""
    return Linear, Fp8Linear


@torch.inference_mode()
def choose_gemv(model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
    """For each projection shape of `model`, and then the gate_up + SiLU·mul pair of its gated MLPs, time batch-1
    products the layer's default way (cuBLAS for a Linear, the measured table's kernel for an Fp8Linear; for the
    pair: gate_up's forward as chosen for it + the activation kernel) and through the layer's one-row GEMV at each
    of its candidate tiles (kernels/gemv.py CANDIDATE_TILES, kernels/fp8_gemm.py GEMV_CANDIDATES) over all the
    model's weights of that shape, each way in one CUDA graph (weights streamed from memory as in a decode step, not
    from L2), and set the fastest on the model's layers (`gemv_tiles`, `GatedMLP.gemv_silu_tiles`; None = the
    default way). Then the modules with a batch-1 path of their own (DeepSeek-V3's MoE: `_choose_one_row_paths`), then
    the projections followed by a residual RMSNorm (O, and down before the next layer's norm:
    the backbone's `add_norm_pairs`): that pair as chosen so far (two launches) against the GEMV with the add + norm
    in its epilogue (`gemv_norm_tiles`), logged.
    Returns {(N, K, silu_mul): (default ms, GEMV ms, tiles)} of the fastest tiles, for the log."""
    sites: dict[tuple[type, int, int, bool], list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, GatedMLP) and isinstance(module.gate_up_proj, _gemv_layers()):  # (not a LoRA layer)
            gate_up = module.gate_up_proj
            sites.setdefault((type(gate_up), *gate_up.weight.shape, True), []).append(module)
        if isinstance(module, _gemv_layers()):
            sites.setdefault((type(module), *module.weight.shape, False), []).append(module)
    timings = {}
    # plain projections first: the gate_up + SiLU·mul pair's default way is then gate_up as already chosen (its GEMV
    # where that won) + the SiLU·mul kernel, which can beat the GEMV with SiLU·mul in its epilogue (7B on the H200)
    for (_, n, k, silu), modules in sorted(sites.items(), key=lambda site: site[0][3]):
        x = torch.randn(1, k, device=device, dtype=dtype)
        linears = [m.gate_up_proj if silu else m for m in modules]

        def default(x=x, linears=linears, silu=silu):
            for lin in linears:  # (cuBLAS or the table's kernel; gate_up of the SiLU pair: as chosen for it)
                y = lin(x)
                if silu:
                    silu_and_mul(y)

        def triton(tiles, x=x, linears=linears, silu=silu):
            for lin in linears:
                lin.gemv(x, tiles, silu_mul=silu)

        default_ms = _graph_ms(default)
        candidates = [t for t in linears[0].gemv_candidates() if not (silu and t[3] > 1)]
        gemv_ms, tiles = min((_graph_ms(lambda t=t: triton(t)), t) for t in candidates)
        timings[(n, k, silu)] = (default_ms, gemv_ms, tiles)
        chosen = tiles if gemv_ms < default_ms else None
        for m in modules:
            if silu:
                m.gemv_silu_tiles = chosen
            else:
                m.gemv_tiles = chosen
    _choose_one_row_paths(model, device, dtype)
    _choose_gemv_add_norm(model, device, dtype)
    return timings


def _choose_one_row_paths(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Modules with a batch-1 path of their own (`one_row_candidates()`, `one_row_tiles`, `in_features`:
    DeepSeek-V3's MoE, kernels/moe_decode.py): per module type and input width, the modules' forward over all of
    them with `one_row_tiles` None (their default way, their projections as chosen before) against each candidate,
    each way in one CUDA graph; the fastest is set where its output agrees with the default way's (logged)."""
    for (kind, width), modules in one_row_sites(model).items():
        candidates = modules[0].one_row_candidates()
        x = torch.randn(1, width, device=device, dtype=dtype)

        def run(tiles, x=x, modules=modules):
            for m in modules:
                m.one_row_tiles = tiles
                m(x)

        default_ms = _graph_ms(lambda: run(None))
        timed = sorted((_graph_ms(lambda t=t: run(t)), t) for t in candidates)
        chosen = next(((ms, t) for ms, t in timed if ms < default_ms and _one_row_agrees(modules[0], x, t)), None)
        for m in modules:
            m.one_row_tiles = chosen[1] if chosen else None
        log.info("batch-1 %s (width %d) over %d modules: default %.3f ms, candidates %s: %s", kind.__name__, width,
                 len(modules), default_ms, ", ".join(f"{t} {ms:.3f}" for ms, t in timed),
                 f"{chosen[1]}" if chosen else "default")


def one_row_sites(model: nn.Module) -> dict[tuple[type, int], list[nn.Module]]:
    """The modules with a batch-1 path of their own (all of `one_row_candidates`, `one_row_tiles`, `in_features`),
    by type and input width."""
    sites: dict[tuple[type, int], list[nn.Module]] = {}
    for module in model.modules():
        if all(hasattr(module, a) for a in ("one_row_candidates", "one_row_tiles", "in_features")):
            sites.setdefault((type(module), module.in_features), []).append(module)
    return sites


def _one_row_agrees(module: nn.Module, x: torch.Tensor, tiles: tuple) -> bool:
    """The module's output at `tiles` against its default way's on one input, within 20% of the largest: room
    for FP8 activation rounding (~5%), none for a wrong expert or a lost slot (off by their whole size)."""
    module.one_row_tiles = None
    want = module(x).float()
    module.one_row_tiles = tiles
    got = module(x).float()
    ok = bool(torch.isfinite(got).all()) and (got - want).abs().max().item() <= 0.2 * want.abs().max().item()
    if not ok:
        log.error("batch-1 %s at %s disagrees with its default way on this device; not used", type(module).__name__,
                  tiles)
    return ok


def _choose_gemv_add_norm(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    from deepfleet.distributed import parallel_state
    from deepfleet.distributed.layers import Fp8RowParallelLinear, RowParallelLinear

    norm_sites: dict[tuple[type, int, int], list[tuple[nn.Module, RMSNorm]]] = {}
    for module in model.modules():
        for proj, norm in module.add_norm_pairs() if hasattr(module, "add_norm_pairs") else []:
            # a row-parallel projection is the plain product only on one rank (no all-reduce) without a bias
            # (added to the rounded product, one more rounding than the GEMV's)
            if not isinstance(proj, _gemv_layers()) or (
                    isinstance(proj, RowParallelLinear | Fp8RowParallelLinear) and (
                        parallel_state.group().size > 1 or proj.bias is not None or not proj.reduce)):
                continue
            norm_sites.setdefault((type(proj), *proj.weight.shape), []).append((proj, norm))
    for (_, n, k), pairs in norm_sites.items():
        x = torch.randn(1, k, device=device, dtype=dtype)
        residual = torch.randn(1, n, device=device, dtype=dtype)

        def unfused(x=x, residual=residual, pairs=pairs):
            for proj, norm in pairs:  # (the projection as chosen above: the default way or the plain GEMV)
                norm(proj(x), residual)

        def fused(tiles, x=x, residual=residual, pairs=pairs):
            for proj, norm in pairs:
                proj.gemv_add_norm(x, residual, norm, tiles)

        unfused_ms = _graph_ms(unfused)
        fused_ms, tiles = min((_graph_ms(lambda t=t: fused(t)), t) for t in pairs[0][0].gemv_candidates())
        chosen = tiles if fused_ms < unfused_ms else None
        if chosen and not add_norm_agrees(*pairs[0], x, residual, chosen):
            log.error("batch-1 %dx%d: the GEMV with the add + norm in its epilogue at %s disagrees with the projection "
                      "then norm on this device; keeping the two launches", n, k, chosen)
            chosen = None
        for proj, _ in pairs:
            proj.gemv_norm_tiles = chosen
        log.info("batch-1 %dx%d + residual RMSNorm over all layers: projection then norm %.3f ms, GEMV with the "
                 "add + norm in its epilogue %.3f ms at %s: %s", n, k, unfused_ms, fused_ms, tiles,
                 "fused" if chosen else "unfused")


def add_norm_agrees(proj: nn.Module, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor,
                    tiles: tuple[int, int, int, int]) -> bool:
    """Whether the fused GEMV + add + norm at `tiles` gives what the projection then the norm give, on one input:
    checked once before start-up trusts it, since its last-arriving-block reduction depends on the device's memory
    ordering (a wrong sum is far beyond bf16 rounding, which the tolerance allows)."""
    want = norm(proj(x), residual.clone())
    got = proj.gemv_add_norm(x, residual.clone(), norm, tiles)
    return all(torch.allclose(g.float(), w.float(), rtol=2e-2, atol=2e-2) for g, w in zip(got, want, strict=True))


# ---- rotary embeddings -------------------------------------------------------------------------------------------


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary dims and the factor cos/sin are multiplied by."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return inv, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        old = scaling["original_max_position_embeddings"]
        low_wl, high_wl = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old = scaling["original_max_position_embeddings"]
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def corr_dim(rot: float) -> float:
            return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv = (inv / factor) * ramp + inv * (1 - ramp)
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if scaling.get("attention_factor") is not None:
            attn = float(scaling["attention_factor"])
        elif mscale and mscale_all:
            attn = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attn = _yarn_mscale(factor)
        return inv, attn
    raise ValueError(f"config.json: rope_scaling type {kind!r} is not supported (default, linear, llama3, yarn)")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to the last `dim` features of q and k at the given positions.
    `interleaved`: pairs are (x0, x1), (x2, x3)… (DeepSeek); otherwise the two halves (GPT-NeoX, Qwen, Llama)."""

    def __init__(self, dim: int, max_positions: int, base: float, scaling: dict | None, interleaved: bool = False):
        super().__init__()
        inv, attn = rope_inv_freq(dim, base, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv.to(torch.float32))
        self.register_buffer("cos", (freqs.cos() * attn).float(), persistent=False)
        self.register_buffer("sin", (freqs.sin() * attn).float(), persistent=False)
        self.interleaved = interleaved

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, dim/2] for a step's positions: computed once per forward, shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        # q: [T, H, dim], k: [T, Hk, dim]
        cos, sin = rope
        return _rotate(q, cos, sin, self.interleaved), _rotate(k, cos, sin, self.interleaved)


@_fusable
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    # the interleaved form is returned de-interleaved ([evens | odds]); q and k get the same permutation, so q·k is
    # unchanged
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
