"""The one exception type the pruning library raises for bad input; the CLI prints it as one line."""


class PruningError(ValueError):
    """A user-facing problem with a fix: the message names both."""
