"""Errors the CLI reports as one line and a non-zero exit."""


class SmallfourError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 1
