"""Collating a micro-batch on the CPU (bond_data/packing.py): this commit against an earlier one
(default 8303407, which built its tensors with torch.tensor on Python lists), same rows, in one
process, interleaved, best of `--repeats`; the batches must be equal.

The rows are bench/train_step.py's GPU micro-batch (16 rows, prompts 64-128 and completions
256-1024 tokens), collated as the trainer does: packed into balanced bins, packed into one row
(`attn_implementation: varlen`), and right-padded. A step's collation runs on the CPU between the
GPU's kernels; when the step is bound by the CPU (the compiled 0.5B step on an H200 was), it adds to
the step's time.

    python bench/collate.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from at_commit import module_at  # bench/, beside this script
from train_step import SIZES, build_rows  # bench/, beside this script

import bond_data.packing as now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="8303407", help="a commit, or a file holding that packing.py")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    before = module_at(args.before, "bond_data/packing.py")
    size = SIZES["cuda"]
    rows = build_rows(size)[: size["rows"]]
    layouts = {"balanced bins": lambda m: m.collate_packed(rows),
               "one row (varlen)": lambda m: m.collate_packed(rows, one_row=True),
               "right-padded": lambda m: m.collate_padded(rows)}
    print(f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}: one micro-batch of {len(rows)} rows, "
          f"{sum(len(r['prompt']) + len(r['completion']) for r in rows):,} tokens; best of {args.repeats}")
    for name, collate in layouts.items():
        a, b = collate(before), collate(now)
        same = all(torch.equal(x, y) for x, y in zip((a.input_ids, a.index, a.targets, a.row),
                                                      (b.input_ids, b.index, b.targets, b.row)))
        times = {"before": [], "now": []}
        for _ in range(args.repeats):
            for label, module in (("before", before), ("now", now)):
                t = time.perf_counter()
                collate(module)
                times[label].append(time.perf_counter() - t)
        t0, t1 = min(times["before"]), min(times["now"])
        print(f"{name:>18}: before {t0 * 1e3:6.2f} ms, now {t1 * 1e3:6.2f} ms: {t0 / t1:.1f}x; same batch: {same}")


if __name__ == "__main__":
    main()
