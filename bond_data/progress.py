"""Progress of a stage: a bar on a terminal, periodic plain lines anywhere else.

One helper for every stage: generate and score count rows (candidates, rewards) and shards beside
them, build counts its one dataset, train counts optimizer steps. On a terminal (stderr is a TTY)
it is a rich bar with counts, elapsed time and ETA that vanishes when the stage ends (the stage's
one summary line replaces it). Anywhere else (a pipe, a log file, a scheduler's log) a bar would
print nothing or flood, so it prints one plain line at most every `BOND_PROGRESS_SECONDS` (10 by
default), from the stage's updates or, while an update is slow to come (a long shard, one big
SQL query), from a timer:

    generate round 1: 256/512 candidates (50%), 1/2 shards, 12 s elapsed, ETA 12 s

The driver calls `advance` (on the plain path and under Prefect alike, as it registers each shard),
so workers in other processes need no channel back.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

INTERVAL_ENV = "BOND_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 10.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Progress:
    """`with Progress("train round 0", total=40, unit="steps") as p: ... p.advance(1, note="loss 0.41")`.

    `tty` None asks the stream; `interval` None reads BOND_PROGRESS_SECONDS; `clock` is for tests."""

    def __init__(self, label: str, total: int, unit: str, stream: TextIO | None = None, tty: bool | None = None,
                 interval: float | None = None, clock=time.monotonic, start: int = 0):
        self.label, self.total, self.unit, self.done = label, max(0, int(total)), unit, start
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = _interval() if interval is None else interval
        self.clock, self.note, self.start_done = clock, "", start
        self.t0 = self.last = clock()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.bar = self.ticker = None
        if self.tty:
            self._start_bar()
        elif self.interval > 0:
            self.ticker = threading.Thread(target=self._tick, name=f"progress {label}", daemon=True)
            self.ticker.start()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                                TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=Console(file=self.stream), transient=True)
        self.bar.start()
        self.task = self.bar.add_task("", total=self.total or None, completed=self.done)

    def advance(self, n: int = 1, note: str = "") -> None:
        """n more done; `note` (say "1/2 shards" or "loss 0.41") is shown beside the counts."""
        with self.lock:
            self.done += n
            self.note = note or self.note
            if self.bar is not None:
                self.bar.update(self.task, advance=n, description=self.note)
            elif self.interval == 0 or self.clock() - self.last >= self.interval:
                self._print()

    def line(self) -> str:
        """The plain line: counts, share, the note, time elapsed and the ETA from the rate so far."""
        elapsed = self.clock() - self.t0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate_done = self.done - self.start_done
        if self.total and rate_done > 0:
            eta = _duration(elapsed / rate_done * max(0, self.total - self.done))
        else:
            eta = "?"
        note = f", {self.note}" if self.note else ""
        return (f"{self.label}: {self.done}/{self.total} {self.unit}{pct}{note}, "
                f"{_duration(elapsed)} elapsed, ETA {eta}")

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last = self.clock()

    def _tick(self) -> None:
        while not self.stop.wait(max(self.interval, 0.5) / 2):
            with self.lock:
                if self.clock() - self.last >= self.interval:
                    self._print()

    def close(self) -> None:
        self.stop.set()
        if self.ticker is not None:
            self.ticker.join()
        if self.bar is not None:
            self.bar.stop()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
