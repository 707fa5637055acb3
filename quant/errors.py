"""The one exception root: every layer raises a subclass, the CLI turns it into a one-line message."""


class SmallfourError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 1
