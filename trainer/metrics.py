"""Per-step training metrics: a JSONL file and a progress bar (bond_data.progress: a bar on a
terminal, a plain line every few seconds elsewhere), on rank 0 only.

A run resumed from the checkpoint of step S keeps the file's lines up to step S and drops the
later ones (written after that checkpoint, before the crash): the file holds each step once."""

from __future__ import annotations

import json
from pathlib import Path


def mfu(flops_per_token: float | None, peak_flops: float | None, tokens_per_s: float | None) -> float | None:
    """Model FLOPs utilisation: flops_per_token x tokens/s over the device's peak (None unless all are known)."""
    return flops_per_token * tokens_per_s / peak_flops if flops_per_token and peak_flops and tokens_per_s else None


class MetricsLog:
    def __init__(self, path: Path, rank: int, total: int, start: int, label: str = "train",
                 flops_per_token: float | None = None, peak_flops: float | None = None):
        """`flops_per_token` and `peak_flops` (this process's GPU): each line also gets `mfu`, the model
        FLOPs utilisation, flops_per_token x tokens/s over the peak (both known, else left out)."""
        self.rank = rank
        self.flops, self.peak = flops_per_token, peak_flops
        if rank:
            return
        from bond_data.progress import Progress

        path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(path, start)
        self.file = open(path, "a")
        self.progress = Progress(label, total, "steps", start=start)

    def write(self, step: int, metrics: dict, seconds: float, lr: float) -> None:
        if self.rank:
            return
        record = {"step": step, "lr": lr, **metrics, "tokens_per_s": metrics["tokens"] / seconds}
        utilisation = mfu(self.flops, self.peak, record["tokens_per_s"])
        if utilisation is not None:
            record["mfu"] = utilisation
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        padding = f", padding {metrics['padding']:.1%}" if "padding" in metrics else ""
        utilised = f", MFU {utilisation:.1%}" if utilisation is not None else ""
        self.progress.advance(1, note=f"loss {metrics['loss']:.4f}{padding}{utilised}")

    def close(self) -> None:
        if not self.rank:
            self.progress.close()
            self.file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        """Closed on the way out, a failed step included: the bar's timer thread stops (in a
        long-lived process, a Prefect worker or a notebook, it would otherwise print forever)."""
        self.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (a torn last line is dropped too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    from bond_data.files import write_text_atomic

    write_text_atomic("".join(k + "\n" for k in kept), path)
