"""Conversion between Hugging Face ``transformers`` Reformer models and ours (see ``interop.hf``).

``convert_checkpoint`` converts saved folders and needs only the files; ``from_hf`` and
``to_hf`` convert model objects and need ``transformers`` (imported only when called).
"""

from .hf import (
    Conversion,
    config_from_hf,
    convert_checkpoint,
    from_hf,
    hf_config_dict,
    hf_parameter_name,
    hf_state_to_ours,
    load_hf_weights,
    our_state_to_hf,
    to_hf,
)

__all__ = [
    "Conversion",
    "config_from_hf",
    "convert_checkpoint",
    "from_hf",
    "hf_config_dict",
    "hf_parameter_name",
    "hf_state_to_ours",
    "load_hf_weights",
    "our_state_to_hf",
    "to_hf",
]
