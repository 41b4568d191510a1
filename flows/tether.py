"""Run a command as long as a parent process lives: `python -m flows.tether PARENT_PID CMD...`.

Prefect's temporary server (uvicorn) is a child process that outlives a parent killed with
SIGKILL (nothing runs in the parent to stop it). flows/__init__.py starts that server through
this tether, which starts the real command, forwards SIGTERM / SIGINT to it (Prefect's own stop),
and kills it within half a second of the parent's death. It exits with the command's code, so
Prefect still sees uvicorn's "port in use" exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[1:]
    child = subprocess.Popen(command)

    def forward(signum, frame) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while child.poll() is None:
        if os.getppid() != parent:  # the parent died: we were re-parented
            child.kill()
            child.wait()
            return 1
        time.sleep(0.5)
    return child.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


class _TetheredSubprocess:
    """Stands in for the `subprocess` module inside Prefect's server module: its Popen starts the
    command through this tether, everything else is the real module."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args, **kwargs):  # noqa: N802 (subprocess's name)
        return subprocess.Popen([sys.executable, "-m", "flows.tether", str(os.getpid()), *args], **kwargs)


def tie_temporary_server() -> None:
    """Make Prefect's temporary server die with this process (idempotent). With PREFECT_API_URL
    set there is no temporary server, and its module (seconds to import) is left alone."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api import server

    if not isinstance(server.subprocess, _TetheredSubprocess):
        server.subprocess = _TetheredSubprocess()
