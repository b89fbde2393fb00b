"""torch-reformer: long-sequence transformers for PyTorch.

LSH self-attention, local and full attention, a reversible engine whose training memory does
not grow with depth, chunked feed-forward and LM loss, axial positional embeddings, and Reformer
models with Hugging Face compatible configs and weights.
"""

from . import combinators
from .attention.full import FullSelfAttention
from .attention.local import LocalSelfAttention
from .attention.lsh import LSHSelfAttention
from .config import ReformerConfig
from .data import DuplicationTask, byte_text_dataset
from .generation import generate
from .layers import AxialPositionalEmbedding, ChunkedFeedForward, LearnedPositionalEmbedding
from .model import (
    ReformerForMaskedLM,
    ReformerForSequenceClassification,
    ReformerLM,
    ReformerModel,
)
from .outputs import ReformerModelOutput, ReformerOutput
from .reversible import (
    MEMORY_MODES,
    ReversibleSequential,
    additive_coupling_forward,
    additive_coupling_inverse,
    is_recomputing,
    next_call_index,
    reversible_forward,
    saved_state,
)
from .serialization import CheckpointError
from .training import Trainer, TrainingArguments

__version__ = "0.1.0"

__all__ = [
    "MEMORY_MODES",
    "AxialPositionalEmbedding",
    "CheckpointError",
    "DuplicationTask",
    "ChunkedFeedForward",
    "FullSelfAttention",
    "LSHSelfAttention",
    "LearnedPositionalEmbedding",
    "LocalSelfAttention",
    "ReformerConfig",
    "ReformerForMaskedLM",
    "ReformerForSequenceClassification",
    "ReformerLM",
    "ReformerModel",
    "ReformerModelOutput",
    "ReformerOutput",
    "ReversibleSequential",
    "Trainer",
    "TrainingArguments",
    "additive_coupling_forward",
    "additive_coupling_inverse",
    "byte_text_dataset",
    "combinators",
    "generate",
    "is_recomputing",
    "next_call_index",
    "reversible_forward",
    "saved_state",
]
