"""The trunk's inputs: validation, and padding to the attention chunk multiple.

Legend: B batch, L sequence length, L_pad the padded length.

``check_inputs`` turns what a user passes to ``ReformerModel.forward`` into (B, L) long token ids,
a (B, L) bool mask or None (None also when nothing is masked, so the faster unmasked paths run)
and (B, L) long position ids, or raises an error that says what to change. Checks that read
tensor values (id ranges, mask contents) are skipped while ``torch.compile`` traces.

``pad_inputs`` pads them to the length the layers run on (``ReformerModel.padded_length``: the next
multiple of the chunk lengths' least common multiple). Padded positions carry ``pad_token_id``, a
False mask and valid position ids; the trunk slices them off its output again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention.checks import require_binary_mask
from .config import ReformerConfig


def check_inputs(
    config: ReformerConfig, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(ids (B, L) long, mask (B, L) bool or None, positions (B, L) long) for ``ReformerModel.forward``."""
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {got}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    batch, length = input_ids.shape
    if batch == 0:
        raise ValueError("input_ids holds no sequences (batch size 0): pass at least one row")
    if length == 0:
        raise ValueError("input_ids is empty along the sequence axis: pass at least one token")
    if input_ids.dtype not in (torch.int32, torch.int64):
        input_ids = input_ids.long()  # the embedding takes int32/int64; smaller ints convert losslessly
    compiling = torch.compiler.is_compiling()
    if not compiling:
        low, high = (value.item() for value in torch.aminmax(input_ids))
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {config.vocab_size}) for vocab_size={config.vocab_size}, "
                f"got values in [{low}, {high}]: check the tokenizer or raise vocab_size"
            )
    if attention_mask is not None:
        attention_mask = _check_attention_mask(attention_mask, (batch, length), input_ids.device, compiling)
    if position_ids is None:
        check_position_capacity(config, length - 1)
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
    else:
        position_ids = _check_position_ids(config, position_ids, (batch, length), input_ids.device, compiling)
    return input_ids, attention_mask, position_ids


def check_position_capacity(config: ReformerConfig, highest: int) -> None:
    """Refuse a position the positional embedding does not cover."""
    capacity = config.max_length
    if capacity is not None and highest >= capacity:
        raise ValueError(
            f"position {highest} is beyond what the positional embedding covers ({capacity} positions): "
            "shorten the input or enlarge "
            + ("axial_pos_shape" if config.position_embedding_type == "axial" else "max_position_embeddings")
        )


def _check_attention_mask(attention_mask, shape: tuple[int, int], device, compiling: bool) -> Tensor | None:
    if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != shape:
        got = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {shape}, got {got}")
    require_binary_mask(attention_mask)
    attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    if not compiling and bool(attention_mask.all()):
        return None  # nothing masked: take the faster unmasked paths
    return attention_mask


def _check_position_ids(config: ReformerConfig, position_ids, shape: tuple[int, int], device, compiling: bool):
    if not torch.is_tensor(position_ids):
        raise TypeError(f"position_ids must be a tensor, got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    batch, length = shape
    position_ids = position_ids.to(device).long()
    if position_ids.dim() == 1:
        position_ids = position_ids.expand(batch, length)
    if tuple(position_ids.shape) != shape:
        raise ValueError(f"position_ids must have shape {shape} or ({length},), got {tuple(position_ids.shape)}")
    if compiling:
        return position_ids
    low, high = (value.item() for value in torch.aminmax(position_ids))
    if low < 0:
        raise ValueError(f"position_ids must be >= 0, got {low}")
    check_position_capacity(config, high)
    return position_ids


def pad_inputs(
    config: ReformerConfig, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor, padded_length: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The checked inputs padded to ``padded_length`` positions (unchanged when they already have it)."""
    batch, length = input_ids.shape
    pad = padded_length - length
    if pad == 0:
        return input_ids, attention_mask, position_ids
    device = input_ids.device
    input_ids = F.pad(input_ids, (0, pad), value=config.pad_token_id)
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    attention_mask = F.pad(attention_mask, (0, pad), value=False)
    # Padded positions are masked everywhere; their position ids only need to be valid.
    extra = position_ids[:, -1:] + torch.arange(1, pad + 1, device=device)
    if config.max_length is not None:
        extra = extra.clamp(max=config.max_length - 1)
    return input_ids, attention_mask, torch.cat([position_ids, extra], dim=1)
