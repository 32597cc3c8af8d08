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


def is_green(seed: int, prev: torch.Tensor, token: torch.Tensor, gamma: float) -> torch.Tensor:
    """Element-wise (broadcasting) over int64 tensors: is `token` green after `prev`?"""
    row = _mix((prev.to(torch.int64) & _MASK) ^ seed)
    col = _mix((token.to(torch.int64) * 2 + 1) & _MASK)
    return _mix(row ^ col) < int(gamma * (1 << 31))


class GreenListProcessor:
    """The per-request logits processor: (output token ids so far, logits row [V]) -> logits row, in place.
    The first output token's predecessor is the prompt's last token."""

    def __init__(self, config: WatermarkConfig, prompt_last_token: int):
        self.config, self.prompt_last_token = config, prompt_last_token
        self.seed = key_seed(config.key)
        self._vocab: torch.Tensor | None = None

    def __call__(self, output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self._vocab is None or self._vocab.numel() != logits.shape[-1] or self._vocab.device != logits.device:
            self._vocab = torch.arange(logits.shape[-1], device=logits.device)
        prev = output_token_ids[-1] if output_token_ids else self.prompt_last_token
        mask = is_green(self.seed, torch.tensor(prev, device=logits.device), self._vocab, self.config.gamma)
        return logits.add_(mask.to(logits.dtype) * self.config.delta)


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
