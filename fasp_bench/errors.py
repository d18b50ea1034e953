"""User-facing harness errors; the CLI prints them as one line and exits non-zero."""


class BenchError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""
