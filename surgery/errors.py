"""The exception types users see, and the "did you mean" hint their messages share.

A SurgeryError is a user error: the CLI prints its message on one line and exits 1,
without a traceback unless ``--debug`` is given.
"""


class SurgeryError(Exception):
    """A problem with the user's input: a recipe, a checkpoint, an option."""


class RecipeError(SurgeryError):
    """A recipe that fails validation. ``where`` is 'file:line: path' when known; ``path`` is the key path
    in the recipe (('operations', 0, 'layer_swap', 'top')) and ``message`` the text without the place."""

    def __init__(self, message: str, where: str | None = None, path: tuple = ()):
        self.where, self.path, self.message = where, tuple(path), message
        super().__init__(f"{where}: {message}" if where else message)


def did_you_mean(word, choices, *, what: str = "") -> str:
    """``"; did you mean 'x'?"`` for the choice closest to ``word`` (``what`` names its kind), else ``""``."""
    import difflib

    hint = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean {what + ' ' if what else ''}{hint[0]!r}?" if hint else ""
