"""Elementwise activations by the names Hugging Face's configs use (``hidden_act``).

Every name ``transformers`` accepts for an activation without learned parameters is here, each
computing what HF's does (its exact formula where HF writes one out, e.g. "gelu_python" with
``erf`` and "gelu_accurate" with ``tanh``). HF's "prelu" and "xielu" hold learned weights that a
Reformer feed-forward does not have, so they are not offered.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ACTIVATION_NAMES

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# The Laplace activation (MEGA, Ma et al. 2022): a normal CDF centred on mu = sqrt(1/2) with
# sigma = sqrt(1 / (4 pi)), the values HF fixes.
_LAPLACE_MU, _LAPLACE_SIGMA = 0.707107, 0.282095


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: Tensor) -> Tensor:
    # HF's "gelu_new", "gelu_fast" and "gelu_pytorch_tanh" are all this tanh approximation.
    return F.gelu(x, approximate="tanh")


def _gelu_erf_formula(x: Tensor) -> Tensor:
    """x * Phi(x) written out with erf ("gelu_python"), equal to ``F.gelu`` up to rounding."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh_formula(x: Tensor) -> Tensor:
    """The tanh approximation of GELU written out ("gelu_accurate", "gelu_python_tanh")."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def _gelu_clipped_10(x: Tensor) -> Tensor:
    """GELU clipped to [-10, 10] ("gelu_10", for quantisation-friendly ranges)."""
    return torch.clamp(F.gelu(x), -10.0, 10.0)


def _relu_squared(x: Tensor) -> Tensor:
    return torch.square(F.relu(x))


def _laplace(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf((x - _LAPLACE_MU) / (_LAPLACE_SIGMA * math.sqrt(2.0))))


def _sqrt_softplus(x: Tensor) -> Tensor:
    return torch.sqrt(F.softplus(x))


def _identity(x: Tensor) -> Tensor:
    return x


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_python": _gelu_erf_formula,
    "gelu_accurate": _gelu_tanh_formula,
    "gelu_python_tanh": _gelu_tanh_formula,
    "gelu_10": _gelu_clipped_10,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "mish": F.mish,
    "leaky_relu": F.leaky_relu,
    "relu6": F.relu6,
    "relu2": _relu_squared,
    "hardswish": F.hardswish,
    "laplace": _laplace,
    "sqrtsoftplus": _sqrt_softplus,
    "linear": _identity,
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise activation HF calls ``name`` (see ``config.ACTIVATION_NAMES``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {ACTIVATION_NAMES}")
    return _ACTIVATIONS[name]
