"""A module of this repository as it was at an earlier commit, for benchmarks that time a change
against its past self in one process (bench/sampler.py, bench/head.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path


def module_at(rev: str, path: str):
    """The file `path` (repository-relative) as it was at `rev`, imported under another name; `rev`
    may also be a file holding that source, where git is not at hand (a lent GPU machine gets the
    working tree without .git)."""
    source = Path(rev).read_text() if Path(rev).is_file() else subprocess.run(
        ["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True,
        cwd=Path(__file__).parent).stdout
    name = Path(path).stem + "_before"
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
