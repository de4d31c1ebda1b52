"""The error policy: a problem the user can fix raises ``RecipeError``; every entry point prints it as one
``error: ...`` message, without a traceback, and exits non-zero. Any other exception is a bug and keeps its
traceback.

The message names what is wrong, where (flag, file, line, row) and what to do.
"""

from __future__ import annotations

import errno
import functools
import sys
from collections.abc import Callable


class RecipeError(Exception):
    pass


class SharedError(RecipeError):
    """A problem every rank finds at once, from a decision they share: the main process alone reports it."""


def user_error_message(error: RecipeError) -> str:
    return f"error: {error}"


def command(main: Callable[..., int | None]) -> Callable[..., int]:
    """A ``python -m phi3v.*`` program's ``main``: its exit status, 1 with the message for a RecipeError."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except RecipeError as error:
            print(user_error_message(error), file=sys.stderr)
            return 1

    return run


def no_space_left(error: BaseException) -> bool:
    """The error says the disk is full (safetensors reports it in its own error type, with the OS error in the
    message)."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)
