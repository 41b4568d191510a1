"""Errors a user can act on. The CLI prints their message as one `error:` line (exit code 2)."""


class StoreError(RuntimeError):
    """A store operation that cannot proceed; the message names the file, shard or id."""
