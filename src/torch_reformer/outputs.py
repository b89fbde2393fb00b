"""What the models return: dataclasses of tensors with Hugging Face-style access.

``output.logits`` reads a field; ``output[i]`` indexes the fields that are not None, in
declaration order; ``output["logits"]`` reads a field by name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


class _IndexedOutput:
    """HF-style access to a dataclass of tensors: ``output[i]`` indexes the fields that are not
    None, in declaration order, and ``output["name"]`` reads a field by name."""

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """The fields that are not None, in declaration order."""
        values = (getattr(self, field.name) for field in fields(self))
        return tuple(value for value in values if value is not None)

    def __getitem__(self, index):
        if isinstance(index, str):
            names = [field.name for field in fields(self)]
            if index not in names:
                raise KeyError(f"{index!r}: {type(self).__name__} has the fields {names}")
            return getattr(self, index)
        return self.to_tuple()[index]


@dataclass
class ReformerOutput(_IndexedOutput):
    """What the heads return. ``loss`` is None without labels; ``logits`` None when not requested.

    ``hidden_states`` is the trunk's final (B, L, 2H) output (after the last LayerNorm). As with
    HF's outputs, ``output[i]`` indexes the fields that are not None (``output[0]`` is the loss when
    labels were given, the logits otherwise) and ``output["logits"]`` reads a field by name.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


@dataclass
class ReformerModelOutput(_IndexedOutput):
    """What ``ReformerModel`` returns, as HF's trunk does: ``last_hidden_state`` (B, L, 2H), the
    final LayerNorm's output (``output[0]`` is the same tensor)."""

    last_hidden_state: torch.Tensor
