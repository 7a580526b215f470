"""The models ``train`` builds (KTRDR's names): ``mlp``, ``lstm``, ``gru``.

Each maps standardized features to logits over the classes (down, flat, up):

- ``mlp`` takes one feature row: ``Linear -> ReLU -> Dropout`` per hidden layer, then a
  linear head;
- ``lstm`` / ``gru`` take a window of ``sequence_length`` feature rows ending at the
  labelled bar: one recurrent layer per hidden size (dropout between them), and a linear
  head on the last time step's output.

Only the training code imports this module (it imports torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from runner.train import MODEL_TYPES, RECURRENT_MODEL_TYPES


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What it takes to rebuild a model: saved in the bundle as a plain dict."""

    model_type: str
    input_size: int
    hidden_layers: tuple[int, ...]
    dropout: float
    sequence_length: int
    num_classes: int

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model {self.model_type!r}; known: {', '.join(MODEL_TYPES)}")
        if self.model_type not in RECURRENT_MODEL_TYPES and self.sequence_length != 1:
            raise ValueError(f"{self.model_type} takes one row (sequence_length 1)")

    def to_dict(self) -> dict[str, Any]:
        """Plain builtins, for the bundle."""
        return {
            "model_type": self.model_type,
            "input_size": self.input_size,
            "hidden_layers": list(self.hidden_layers),
            "dropout": self.dropout,
            "sequence_length": self.sequence_length,
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> ModelConfig:
        """The config of :meth:`to_dict`."""
        return cls(
            model_type=str(saved["model_type"]),
            input_size=int(saved["input_size"]),
            hidden_layers=tuple(int(h) for h in saved["hidden_layers"]),
            dropout=float(saved["dropout"]),
            sequence_length=int(saved["sequence_length"]),
            num_classes=int(saved["num_classes"]),
        )


class MLP(nn.Module):
    """Feed-forward classifier over one feature row: input ``(batch, features)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = config.input_size
        for width in config.hidden_layers:
            layers += [nn.Linear(size, width), nn.ReLU(), nn.Dropout(config.dropout)]
            size = width
        layers.append(nn.Linear(size, config.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, classes)``."""
        out: torch.Tensor = self.net(x)
        return out


class Recurrent(nn.Module):
    """LSTM or GRU classifier over a window: input ``(batch, sequence_length, features)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cell = nn.LSTM if config.model_type == "lstm" else nn.GRU
        self.layers = nn.ModuleList()
        size = config.input_size
        for width in config.hidden_layers:
            self.layers.append(cell(size, width, batch_first=True))
            size = width
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(size, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, classes)`` from the last time step."""
        out = x
        for layer in self.layers:
            out, _ = layer(out)
            out = self.dropout(out)
        logits: torch.Tensor = self.head(out[:, -1, :])
        return logits


def build_model(config: ModelConfig) -> nn.Module:
    """A fresh model of ``config`` (weights from torch's global generator: seed it first)."""
    if config.model_type in RECURRENT_MODEL_TYPES:
        return Recurrent(config)
    return MLP(config)


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(config: ModelConfig) -> str:
    """One line a person reads: the layers from input to classes."""
    if config.model_type in RECURRENT_MODEL_TYPES:
        cell = config.model_type.upper()
        source = f"{config.sequence_length} x {config.input_size} features"
        hidden = [f"{cell}({w})" for w in config.hidden_layers]
    else:
        source = f"{config.input_size} features"
        hidden = [f"Linear({w}) + ReLU" for w in config.hidden_layers]
    layers = " -> ".join([source, *hidden, f"Linear({config.num_classes})"])
    return f"{config.model_type}: {layers}; dropout {config.dropout:g}"
