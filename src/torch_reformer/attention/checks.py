"""Argument checks shared by the attention modules, with errors that say what to pass instead.

Shapes: B batch, L sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_attention_inputs(hidden_states: Tensor, attention_mask: Tensor | None, hidden_size: int) -> Tensor | None:
    """Validate (B, L, hidden) inputs and a (B, L) mask; returns the mask as bool (True = real token)."""
    if not isinstance(hidden_states, Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden_states has shape {tuple(hidden_states.shape)}; expected (batch, length, {hidden_size}) "
            f"for this layer's hidden_size={hidden_size}"
        )
    if hidden_states.shape[1] == 0:
        raise ValueError("hidden_states has length 0; attention needs at least one position")
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor of shape (batch, length), got {type(attention_mask)}")
    if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, length) = "
            f"{tuple(hidden_states.shape[:2])} with 1/True for real tokens and 0/False for padding"
        )
    require_binary_mask(attention_mask)
    return attention_mask.to(device=hidden_states.device, dtype=torch.bool)


def require_binary_mask(attention_mask: Tensor) -> None:
    """Raise unless a non-bool mask holds only 0 and 1 (the check reads values: skipped under torch.compile)."""
    if attention_mask.dtype != torch.bool and not torch.compiler.is_compiling():
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold 1/True for real tokens and 0/False for padding; it holds "
                             "other values")


def check_layer_sizes(hidden_size: int, num_heads: int, head_size: int, dropout: float) -> None:
    """Constructor checks common to the attention modules."""
    for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_size", head_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def check_chunking(chunk_length: int, num_chunks_before: int, num_chunks_after: int) -> None:
    """Constructor checks for chunked (LSH and local) attention."""
    if isinstance(chunk_length, bool) or not isinstance(chunk_length, int) or chunk_length < 1:
        raise ValueError(f"chunk_length must be a positive int, got {chunk_length!r}")
    for name, value in (("num_chunks_before", num_chunks_before), ("num_chunks_after", num_chunks_after)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def check_decode_inputs(hidden_new: Tensor, attention_mask_new: Tensor | None, hidden_size: int) -> Tensor:
    """Validate a (B, 1, hidden) step and return its (B, 1) bool mask (True = real token)."""
    key_mask = check_attention_inputs(hidden_new, attention_mask_new, hidden_size)
    if hidden_new.shape[1] != 1:
        raise ValueError(f"decode_step takes one new position, shape (batch, 1, {hidden_size}); got {tuple(hidden_new.shape)}")
    if key_mask is None:
        return torch.ones(hidden_new.shape[0], 1, dtype=torch.bool, device=hidden_new.device)
    return key_mask


def check_decode_padding(padded_length: int, chunk_length: int, decoded: int) -> None:
    """A decode step's ``padded_length`` must cover the ``decoded`` positions and be a length the
    forward pass computes on: at most one chunk, or a multiple of ``chunk_length``."""
    if padded_length < decoded:
        raise ValueError(f"padded_length={padded_length} is shorter than the {decoded} positions decoded")
    if padded_length > chunk_length and padded_length % chunk_length:
        raise ValueError(
            f"padded_length={padded_length} is not a multiple of chunk_length={chunk_length}: pass the length the "
            f"forward pass pads the sequence to (a multiple of every chunk length in the model, such as "
            f"{-(-padded_length // chunk_length) * chunk_length}), or None for this layer's own padding"
        )


def check_causal_for_decoding(causal: bool) -> None:
    if not causal:
        raise ValueError("incremental decoding needs a causal layer (causal=True): later tokens would change earlier outputs")
