"""Errors a user can act on. The CLI prints their message as one `error:` line (exit code 2)."""


class LogAMismatch(UserWarning):
    """The trainer will compute log pi otherwise than the generator computed the pool's log A, within
    a precision policy (e.g. another attention kernel): rho at initialisation is off by rounding. The
    CLI prints it as one `warning:` line."""


class StoreError(RuntimeError):
    """A store operation that cannot proceed; the message names the file, shard or id."""
