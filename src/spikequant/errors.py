"""Exceptions that the CLI turns into one-line messages (and a non-zero exit)."""


class SpikequantError(Exception):
    """Base class: a problem with the user's input, reported as one line without a traceback."""


class UnsupportedArchitectureError(SpikequantError):
    pass


class RecipeError(SpikequantError):
    pass


class DataError(SpikequantError):
    pass


class ModelLoadError(SpikequantError):
    pass
