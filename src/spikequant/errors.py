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


def check_keys(data: dict, allowed, where: str) -> None:
    """The one unknown-key check of every validated mapping (recipes, quantizers, modifiers)."""
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
