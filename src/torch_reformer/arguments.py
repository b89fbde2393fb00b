"""Command-line argument parsing shared by ``reformer`` and ``reformer bench``.

Bad flags end as one line on stderr with exit status 2 (no usage block), and numeric flags are
checked against their range when they are parsed, so the commands never start work on a value they
would refuse later.
"""

from __future__ import annotations

import argparse
import math


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) with exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def number_type(kind, minimum, inclusive=True, allow_none_word=False, maximum=None):
    """An argparse type: ``kind`` (int/float) no smaller than ``minimum`` and, if given, no larger than
    ``maximum`` ("none" allowed when asked)."""
    def parse(text: str):
        if allow_none_word and text.lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if (kind is float and not math.isfinite(value)) or value < minimum or (not inclusive and value == minimum):
            bound = f">= {minimum}" if inclusive else f"> {minimum}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{text!r} must be <= {maximum}")
        return value
    return parse


POSITIVE_INT = number_type(int, 1)
NON_NEGATIVE_INT = number_type(int, 0)
POSITIVE_FLOAT = number_type(float, 0.0, inclusive=False)
