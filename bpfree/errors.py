"""The one exception type users see: a message the CLI prints as a single line (exit code 2)."""


class BpfreeError(Exception):
    """A user-facing problem (bad name, bad file, impossible setting) with a one-line message."""
