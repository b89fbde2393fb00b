"""torch-reformer: long-sequence transformers for PyTorch (LSH attention, reversible layers)."""

__version__ = "0.1.0"
