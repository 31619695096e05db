"""Errors that the CLI reports as one line, without a traceback."""


class MinibtError(Exception):
    """A problem a user can fix: the message names the recipe key, file, row or adapter."""


class RecipeError(MinibtError, ValueError):
    """A recipe problem."""


class DataError(MinibtError):
    """A problem with seed or corpus data: names the file and rows."""
