"""The one exception type users see: a message the CLI prints as a single line, and its exit code."""


class BpfreeError(Exception):
    """A user-facing problem (bad name, bad file, impossible setting) with a one-line message."""

    exit_code: int = 2


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
