"""Errors a user can act on. The CLI prints their message as one `error:` line (exit code 2)."""

import sys


class LogAMismatch(UserWarning):
    """The trainer will compute log pi otherwise than the generator computed the pool's log A, within
    a precision policy (e.g. another attention kernel): rho at initialisation is off by rounding. The
    CLI prints it as one `warning:` line."""


class StoreError(RuntimeError):
    """A store operation that cannot proceed; the message names the file, shard or id."""


def out_of_memory(e: BaseException) -> bool:
    """A device ran out of memory (torch's OutOfMemoryError). torch is not imported for this: an
    error raised where torch was never imported is not torch's."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.OutOfMemoryError)


def error_line(e: BaseException, memory_hint: str = "use smaller batches") -> str | None:
    """The one `error:` line of an error a user can act on: a store that cannot proceed, a value
    (config, prompt, reward) that cannot be used, a file that cannot be read, a device out of
    memory (with `memory_hint`: the settings that shrink what the command holds); None for anything
    else (a bug keeps its traceback)."""
    if out_of_memory(e):  # torch's message, up to its allocator statistics
        said = " ".join(str(e).split()).split(" Of the allocated memory")[0].split(" Including non-PyTorch")[0]
        return (f"error: out of memory: {said.rstrip('.')}; {memory_hint}. What was registered stays registered; "
                f"a re-run resumes")
    if isinstance(e, (StoreError, ValueError)):
        return f"error: {' '.join(str(e).split())}"  # one line, always
    if isinstance(e, OSError):  # a file the user named: missing, unreadable, not a directory...
        return f"error: {e.filename or ''}: {e.strerror or e}"
    return None
