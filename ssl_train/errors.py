"""What the user got wrong, as opposed to what the code got wrong.

The CLI prints a ``UserError`` (or the ``shards`` package's ``ShardsError``) as one line
naming the flag, file or URL and what to do, and exits with status 2; any other exception
is a bug and keeps its traceback. A ``ValueError`` raised deep inside a library call is
therefore never mistaken for a typo on the command line.
"""

from __future__ import annotations

from shards.errors import ShardsError


class UserError(ValueError):
    """A flag, file, URL or run dir that cannot work; the message says which and what to do.

    A ``ValueError`` so that callers of the Python API that catch bad arguments keep
    doing so.

    Example:
        >>> raise UserError("--global-batch-size 1: a contrastive batch needs at least 2")
        Traceback (most recent call last):
        ...
        ssl_train.errors.UserError: --global-batch-size 1: a contrastive batch needs at least 2
    """


# Errors that are the user's to fix, whichever package raised them: one line each.
USER_ERRORS: tuple[type[Exception], ...] = (UserError, ShardsError)
