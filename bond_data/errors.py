"""Errors a user can act on. The CLI prints their message as one `error:` line (exit code 2)."""


class LogAMismatch(UserWarning):
    """The trainer will compute log pi otherwise than the generator computed the pool's log A, within
    a precision policy (e.g. another attention kernel): rho at initialisation is off by rounding. The
    CLI prints it as one `warning:` line."""


class StoreError(RuntimeError):
    """A store operation that cannot proceed; the message names the file, shard or id."""


def error_line(e: BaseException) -> str | None:
    """The one `error:` line of an error a user can act on: a store that cannot proceed, a value
    (config, prompt, reward) that cannot be used, a file that cannot be read; None for anything else
    (a bug keeps its traceback)."""
    if isinstance(e, (StoreError, ValueError)):
        return f"error: {' '.join(str(e).split())}"  # one line, always
    if isinstance(e, OSError):  # a file the user named: missing, unreadable, not a directory...
        return f"error: {e.filename or ''}: {e.strerror or e}"
    return None
