"""Exceptions of the mixtures package."""


class MixtureError(ValueError):
    """A mixture spec or its data is wrong.

    The message always names where (mixture file, source, data file, line or field) and
    what to do about it, so that it can be shown to the user as is.
    """


class MixtureExhausted(MixtureError):
    """Every source with a positive weight in the current stage has ``on_exhausted: stop``
    and has run out of training documents."""
