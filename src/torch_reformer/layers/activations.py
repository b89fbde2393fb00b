"""Elementwise activations by the names Hugging Face's configs use (``hidden_act``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ACTIVATION_NAMES


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: Tensor) -> Tensor:
    # HF's "gelu_new", "gelu_fast" and "gelu_pytorch_tanh" are all this tanh approximation.
    return F.gelu(x, approximate="tanh")


def _identity(x: Tensor) -> Tensor:
    return x


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "mish": F.mish,
    "leaky_relu": F.leaky_relu,
    "linear": _identity,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise activation HF calls ``name`` (see ``config.ACTIVATION_NAMES``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {ACTIVATION_NAMES}")
    return _ACTIVATIONS[name]
