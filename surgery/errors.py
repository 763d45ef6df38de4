"""The one exception type users see.

A SurgeryError is a user error: the CLI prints its message on one line and exits 1,
without a traceback unless ``--debug`` is given.
"""


class SurgeryError(Exception):
    """A problem with the user's input: a recipe, a checkpoint, an option."""


class RecipeError(SurgeryError):
    """A recipe that fails validation. ``where`` is 'file:line: path' when known."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)
