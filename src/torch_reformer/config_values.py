"""Type checks and coercions of config field values; a wrong type raises ``TypeError`` naming the field.

Used by ``ReformerConfig`` validation: ints are never bools (a flag where a size belongs is a
mistake), sequences come back as tuples, numpy scalars as Python numbers, and label maps with the
int keys that JSON turned into strings get them back.
"""

from __future__ import annotations

import numbers
from typing import Any


def require_int(name: str, value: Any) -> None:
    # bool is an int subclass in Python; a flag where a size belongs is a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


def int_or_int_tuple(name: str, value: Any) -> int | tuple[int, ...] | None:
    """None, an int, or a list/tuple of ints (returned as a tuple)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return require_sequence(name, value, int)
    require_int(name, value)
    return value


def label_map(name: str, value: Any, key_type: type, value_type: type) -> dict | None:
    """None, or a dict with ``key_type`` keys (ints also from the strings JSON writes) and ``value_type`` values."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict or None, got {value!r}")
    checked = {}
    for key, item in value.items():
        if key_type is int and isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, key_type) or isinstance(item, bool) or not isinstance(
                item, value_type):
            raise TypeError(f"{name} must map {key_type.__name__} keys to {value_type.__name__} values, got "
                            f"{key!r}: {item!r}")
        checked[key] = item
    return checked


def require_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def require_sequence(name: str, value: Any, item_type: type) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of {item_type.__name__}, got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, item_type):
            raise TypeError(f"{name} must hold only {item_type.__name__} values, got {item!r} in {value!r}")
    return tuple(value)


def plain_numbers(value: Any) -> Any:
    """Integral and real scalars of other types (numpy's) as Python int and float, also inside lists."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return type(value)(plain_numbers(item) for item in value)
    if isinstance(value, dict):
        return {plain_numbers(key): plain_numbers(item) for key, item in value.items()}
    return value
