"""Errors the CLI reports as one line and a non-zero exit (the root lives in the bottom layer)."""

from quant.errors import SmallfourError

__all__ = ["SmallfourError"]
