"""User-facing errors: one clear message that names the file/field and says what to do."""


class AnnealError(ValueError):
    """Bad input from a user (recipe, checkpoint, mixture, schedule). Printed without a traceback."""
