"""Per-step training metrics: a JSONL file and a progress bar, on rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, rank: int, total: int, start: int):
        self.rank = rank
        if rank:
            return
        from rich.progress import Progress

        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")
        self.progress = Progress(transient=True)
        self.progress.start()
        self.task = self.progress.add_task("training", total=total, completed=start)

    def write(self, step: int, metrics: dict, seconds: float, lr: float) -> None:
        if self.rank:
            return
        record = {"step": step, "lr": lr, **metrics, "tokens_per_s": metrics["tokens"] / seconds}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.progress.update(self.task, advance=1, description=f"loss {metrics['loss']:.4f}")

    def close(self) -> None:
        if not self.rank:
            self.progress.stop()
            self.file.close()
