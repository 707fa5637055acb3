"""Conversion errors: a `SmallfourError` (root in `quant.errors`), named for the checkpoint → GGUF work."""

from quant.errors import SmallfourError


class ConversionError(SmallfourError):
    """A problem with the checkpoint, the recipe or the output file, explained in one line."""
