"""Exceptions of the moe package (no torch import: the CLI imports this to recognize user errors)."""


class UnknownBackendError(ValueError):
    """An experts backend name that is not registered (or whose dependency, e.g. Triton, is missing)."""
