"""The one exception type the CLI turns into a single-line message."""


class ShardsError(Exception):
    """A problem the user can act on; the message says what is wrong and what to do.

    Example:
        >>> raise ShardsError("bucket 'b' does not exist: create it or fix DEST")
        Traceback (most recent call last):
        ...
        shards.errors.ShardsError: bucket 'b' does not exist: create it or fix DEST
    """
