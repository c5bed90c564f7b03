"""Errors of the checkpoint tools: each message says what is wrong and what to do."""


class AdapterError(ValueError):
    """A checkpoint or config that the tool refuses, with the reason."""
