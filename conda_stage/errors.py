"""Exceptions.  Every failure a user can cause or fix is a :class:`StageError`
with a one-line message that says what went wrong and what to do about it."""


class StageError(Exception):
    """A failure with a clear, user-facing one-line message."""

    exit_code = 1


class UsageError(StageError):
    """Bad command-line usage."""

    exit_code = 2


class EnvNotFound(StageError):
    pass


class NotEnabled(StageError):
    """The environment is not configured for automatic staging."""


class PackError(StageError):
    pass


class UnsafeArchive(StageError):
    """The archive holds a member that must never be extracted."""


class PrefixTooLong(StageError):
    pass


class LockTimeout(StageError):
    pass
