"""The training step queues its micro-batches without waiting for the device: its loss terms are
summed on the device and read once, at the end, and they equal a per-micro-batch reference that
reads each term as it comes (the step before). On a GPU (`-m gpu`), CUDA's sync debug mode finds
no wait in the step's own code other than that one read."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_lms import random_rows, tiny_lm

from bond_data.logprobs import SequenceLogprobs, batch_logprobs
from bond_data.packing import collate_packed, to_device
from trainer.losses import jeffreys_loss
from trainer.step import SUMMED, train_step

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[2]
OURS = ("trainer", "bond_data")  # the step's own code: the model's library may wait as it likes


def rows_for(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{**r, "weight": float(torch.rand(1, generator=g)) * 2, "weight_pool": float(torch.rand(1, generator=g)),
             "logp_anchor": -float(torch.rand(1, generator=g)) * 40} for r in random_rows(n=n, seed=seed)]


def reference_step(model, micro_batches, beta, gamma, global_rows, world):
    """The step as it was: every term read back to the host after each micro-batch."""
    totals = dict.fromkeys((*SUMMED, "log_ratio"), 0.0)
    model = SequenceLogprobs(model)
    for rows in micro_batches:
        col = {k: torch.tensor([r[k] for r in rows]) for k in ("weight", "weight_pool", "logp_anchor")}
        logp = batch_logprobs(model, collate_packed(rows), CPU, "fp32")
        terms = jeffreys_loss(logp, col["logp_anchor"], col["weight"], beta, gamma, col["weight_pool"])
        scale = len(rows) / global_rows * world
        (terms["loss"] * scale).backward()
        for k in SUMMED:
            totals[k] += float(terms[k].detach()) * scale
        totals["log_ratio"] += float((logp - col["logp_anchor"]).detach().sum()) / global_rows * world
    return totals


def host_reads(monkeypatch) -> list[str]:
    """Record `file:line` of every tensor read to the host (item, float, int, bool, tolist, numpy)
    made directly by this project's trainer / bond_data code."""
    seen = []
    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "numpy"):
        inner = getattr(torch.Tensor, name)

        def spy(self, *a, _inner=inner, **kw):
            caller = sys._getframe(1).f_code.co_filename
            rel = Path(caller).resolve()
            if rel.is_relative_to(ROOT) and rel.relative_to(ROOT).parts[0] in OURS:
                seen.append(f"{rel.relative_to(ROOT)}:{sys._getframe(1).f_lineno}")
            return _inner(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return seen


def test_the_step_reads_the_device_once_and_sums_as_the_reference(monkeypatch):
    rows = rows_for(12, seed=3)
    micro = [rows[:5], rows[5:9], rows[9:]]
    args = (0.5, 0.05, 16, 1)  # beta, gamma, global rows (more than these: scales below 1), world
    want_model, got_model = tiny_lm(), tiny_lm()
    want = reference_step(want_model, micro, *args)
    seen = host_reads(monkeypatch)
    got = train_step(got_model, micro, *args, CPU, "fp32")
    monkeypatch.undo()
    # the packing reads its CPU tensors (bond_data/packing.py) before they are moved; nothing else may
    step_reads = [s for s in seen if not s.startswith("bond_data/packing.py")]
    assert len(step_reads) == 1 and step_reads[0].startswith("trainer/step.py"), seen
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k
    for (name, p), q in zip(got_model.named_parameters(), want_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    assert got["tokens"] == sum(len(r["prompt"]) + len(r["completion"]) for r in rows)


def test_to_device_leaves_a_tensor_equal_and_on_the_device():
    t = torch.arange(5)
    assert torch.equal(to_device(t, CPU), t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_step_waits_for_the_gpu_once():
    """CUDA's sync debug mode warns at every operation that makes the CPU wait for the GPU; of those
    raised from the step's own code (trainer/, bond_data/), only the final read of the loss terms may
    remain. Waits inside transformers are printed, not asserted."""
    cuda = torch.device("cuda")
    model = tiny_lm("qwen2").to(cuda)
    rows = rows_for(12, seed=3)
    micro = [rows[:6], rows[6:]]
    train_step(model, micro, 0.5, 0.05, 12, 1, cuda, "bf16-autocast")  # warm-up: lazy inits may wait
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(model, micro, 0.5, 0.05, 12, 1, cuda, "bf16-autocast")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = [f"{Path(w.filename).resolve()}:{w.lineno}" for w in waits]
    ours = [w for w in where if any(f"/{d}/" in w for d in OURS)]
    print(f"waits in the step: {len(where)}; from our code: {ours}; elsewhere: {sorted(set(where) - set(ours))}")
    assert len(ours) <= 1 and all("trainer/step.py" in w for w in ours), ours
