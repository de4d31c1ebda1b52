"""The one exception type for problems the user has to fix (bad data, flags, folders, a diverging run).

Recipes catch it at the top and print its message without a traceback: the message names what is wrong,
where (file, line, row, flag) and what to do.
"""


class RecipeError(Exception):
    pass


class SharedError(RecipeError):
    """A problem every rank finds at once, from a decision they share: the main process alone reports it."""
