"""The one base of every error stagewise raises for bad input or a refused request: the CLI
catches `StagewiseError` once and prints its message, with no traceback. Each module keeps
its own error class (a recipe's `RecipeError`, a manifest's `CohortError`, ...) deriving
from it, so a caller can catch one kind or all."""


class StagewiseError(Exception):
    """A problem the user can act on; the message names the file, row or field and what to do."""


class RunError(StagewiseError, RuntimeError):
    """A run directory that cannot be used for this recipe."""
