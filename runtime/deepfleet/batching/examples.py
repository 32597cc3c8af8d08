"""Small example models exported from PyTorch, for trying the server (`deepfleet example-models DIR`),
the tests and bench/batcher.py: an MLP classifier (fixed feature dim) and a tiny embedder whose sequence
dim is dynamic and bucketed (masked mean pooling, so padding must not change its output)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from deepfleet.batching.repository import DynamicDim, ModelConfig, TensorSpec, write_config


class MLPClassifier(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 4, layers: int = 2):
        super().__init__()
        dims = [features] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(dims, dims[1:], strict=False):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(dims[-1], classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyEmbedder(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = torch.tanh(self.proj(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return pooled, states


def _export(model: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: tuple) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter is chatty about unrelated deprecations
        torch.onnx.export(model, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)


def classifier_config(name: str = "classifier", features: int = 16, classes: int = 4, **settings) -> ModelConfig:
    settings.setdefault("backend", "onnxruntime")
    return ModelConfig(name=name,
                       inputs=[TensorSpec(name="x", datatype="FP32", dims=[features])],
                       outputs=[TensorSpec(name="logits", datatype="FP32", dims=[classes])], **settings)


def embedder_config(name: str = "embedder", dim: int = 8, buckets=(8, 16, 32, 64), **settings) -> ModelConfig:
    seq = ["seq"]
    return ModelConfig(
        name=name, backend="onnxruntime",
        inputs=[TensorSpec(name="input_ids", datatype="INT64", dims=seq),
                TensorSpec(name="attention_mask", datatype="INT64", dims=seq)],
        outputs=[TensorSpec(name="pooled_embedding", datatype="FP32", dims=[dim]),
                 TensorSpec(name="token_states", datatype="FP32", dims=["seq", dim])],
        dynamic_dims={"seq": DynamicDim(buckets=list(buckets))}, **settings)


def export_classifier(path: Path, features: int = 16, hidden: int = 64, classes: int = 4, layers: int = 2) -> None:
    torch.manual_seed(0)
    model = MLPClassifier(features, hidden, classes, layers)
    batch = torch.export.Dim("batch", min=1, max=4096)
    _export(model, (torch.randn(2, features),), path, ["x"], ["logits"], ({0: batch},))


def export_embedder(path: Path, vocab: int = 100, dim: int = 8) -> None:
    torch.manual_seed(0)
    model = TinyEmbedder(vocab, dim)
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=1, max=4096)
    ids = torch.randint(0, vocab, (2, 5))
    _export(model, (ids, torch.ones_like(ids)), path, ["input_ids", "attention_mask"],
            ["pooled_embedding", "token_states"], ({0: batch, 1: seq}, {0: batch, 1: seq}))


def write_example_repository(root: Path, **settings) -> Path:
    """A repository with `classifier` and `embedder`; `settings` (e.g. max_batch_size) apply to both."""
    root = Path(root)
    for config, export in ((classifier_config(**settings), export_classifier),
                           (embedder_config(**settings), export_embedder)):
        directory = root / config.name
        write_config(directory, config)
        export(directory / config.file_name)
    return root
