"""The green list, its logits processor and its detector.

Green test of token v after token p: mix(seed(key) ^ mix(p) ^ mix'(v)) < gamma * 2^31, with `mix` an
integer hash kept in 31 bits (so int64 products never overflow and torch and plain Python agree). One vectorised
pass over the vocabulary per row, on the logits' device; the detector runs the same function on CPU."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from deepfleet.watermark.config import DEFAULT_Z_THRESHOLD, WatermarkConfig

_MASK = (1 << 31) - 1
_ROUNDS = (0x2C1B3C6D, 0x297A2D39, 0x1B873593)  # odd constants < 2^31: products stay < 2^62


def _mix(x: torch.Tensor) -> torch.Tensor:
    for c in _ROUNDS:
        x = ((x ^ (x >> 15)) * c) & _MASK
    return x ^ (x >> 16)


def key_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") & _MASK


def _mix_int(x: int) -> int:
    """_mix for one Python int (the same arithmetic: 31-bit values, products < 2^62)."""
    for c in _ROUNDS:
        x = ((x ^ (x >> 15)) * c) & _MASK
    return x ^ (x >> 16)


def _row(seed: int, prev: torch.Tensor | int):
    return _mix_int((prev & _MASK) ^ seed) if isinstance(prev, int) else _mix((prev.to(torch.int64) & _MASK) ^ seed)


def _col(token: torch.Tensor) -> torch.Tensor:
    return _mix((token.to(torch.int64) * 2 + 1) & _MASK)


def _threshold(gamma: float) -> int:
    return int(gamma * (1 << 31))


def is_green(seed: int, prev: torch.Tensor, token: torch.Tensor, gamma: float) -> torch.Tensor:
    """Element-wise (broadcasting) over int64 tensors: is `token` green after `prev`?"""
    return _mix(_row(seed, prev) ^ _col(token)) < _threshold(gamma)


class GreenListProcessor:
    """The per-request logits processor: (output token ids so far, logits row [V]) -> logits row, in place.
    The first output token's predecessor is the prompt's last token. The vocabulary's half of the hash is computed
    once per request; each step hashes one previous token and mixes it into that."""

    def __init__(self, config: WatermarkConfig, prompt_last_token: int):
        self.config, self.prompt_last_token = config, prompt_last_token
        self.seed, self.threshold = key_seed(config.key), _threshold(config.gamma)
        self._cols: torch.Tensor | None = None

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self._cols is None or self._cols.numel() != logits.shape[-1] or self._cols.device != logits.device:
            self._cols = _col(torch.arange(logits.shape[-1], device=logits.device))
        prev = output_token_ids[-1] if output_token_ids else self.prompt_last_token
        green = _mix(self._cols ^ _row(self.seed, int(prev))) < self.threshold
        return logits.add_(green, alpha=self.config.delta)


@dataclass
class Detection:
    tokens_scored: int  # distinct (previous, token) pairs: a repeated pair says nothing new
    green: int
    gamma: float
    z: float
    p_value: float
    watermarked: bool

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def detect(token_ids: list[int], key: str, gamma: float, z_threshold: float = DEFAULT_Z_THRESHOLD) -> Detection:
    """z = (green - gamma T) / sqrt(T gamma (1 - gamma)) over the T distinct (previous, token) pairs."""
    WatermarkConfig(key, gamma)  # validates key and gamma
    pairs = sorted(set(zip(token_ids, token_ids[1:], strict=False)))
    if not pairs:
        raise ValueError(f"tokens: need at least 2 tokens to score, got {len(token_ids)}")
    prev, tok = torch.tensor(pairs, dtype=torch.int64).unbind(1)
    green = int(is_green(key_seed(key), prev, tok, gamma).sum())
    t = len(pairs)
    z = (green - gamma * t) / math.sqrt(t * gamma * (1 - gamma))
    return Detection(t, green, gamma, z, 0.5 * math.erfc(z / math.sqrt(2)), z > z_threshold)
