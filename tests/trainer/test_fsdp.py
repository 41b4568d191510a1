"""FSDP2 (`--fsdp`) on CPU with gloo: two processes train to the same parameters as the plain
one-process trainer (twice the accumulation), with an EMA anchor; a crashed two-process run resumes from its
sharded checkpoint to the same parameters. The anchor in bf16 stays within bf16 rounding."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from trainer import train as train_mod
from trainer.anchor import ema_update
from trainer.config import TrainConfig
from trainer.fsdp import anchor_copy

import testutil

HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")
FLAGS = ["--micro-batch-size", "8", "--epochs", "2", "--lr", "1e-3", "--warmup-steps", "2",
         "--checkpoint-every", "2", "--eta", "0.1", "--fsdp", "true"]


def torchrun(nproc: int, store_root, *extra: str, script: list[str] | None = None, port: int = 29541, check=True):
    return testutil.torchrun(nproc, store_root, [*FLAGS, *extra], script, port, check)


def anchor1(root):
    return load_file(str(root / "anchors" / "round=1" / "model.safetensors"))


def assert_same(got, want, atol=2e-5):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_resume_from_sharded_checkpoints(round0, tmp_path):
    two, crashed = tmp_path / "two", tmp_path / "crashed"
    for copy in (two, crashed):
        shutil.copytree(round0.root, copy)
    train_mod.train(str(round0.root), TrainConfig(micro_batch_size=8, grad_accum=2, epochs=2, lr=1e-3,
                                                  warmup_steps=2, checkpoint_every=2, eta=0.1))  # one process, no FSDP
    torchrun(2, two, "--grad-accum", "1", port=29542)
    plain = anchor1(round0.root)
    assert_same(anchor1(two), plain)

    run = torchrun(2, crashed, "--grad-accum", "1", script=[os.path.join(HELPERS, "crash_train.py"), "5"],
                   port=29543, check=False)
    assert run.returncode != 0
    run_dir = next((crashed / "train").glob("round=0/*"))
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-2", "step-4"]
    assert any(p.suffix == ".distcp" for p in (run_dir / "step-4").iterdir())  # one shard file per process
    torchrun(2, crashed, "--grad-accum", "1", port=29544)
    assert_same(anchor1(crashed), plain)


def test_fsdp_anchor_in_bf16_is_the_fp32_anchor_rounded():
    torch.manual_seed(0)
    policy = torch.nn.Linear(16, 16)
    a32, a16 = anchor_copy(policy, torch.float32), anchor_copy(policy, torch.bfloat16)
    start = {k: v.clone() for k, v in a32.items()}
    assert {v.dtype for v in a16.values()} == {torch.bfloat16}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    ema_update(a32, policy.state_dict(), 0.1)
    ema_update(a16, policy.state_dict(), 0.1)
    moved = policy.state_dict()
    for k in a32:  # bf16: 8 significant bits, unit roundoff 2^-8; the start, the policy and the result each rounded
        error = (a16[k].float() - a32[k]).abs()
        bound = 2 ** -8 * (0.9 * start[k].abs() + 0.1 * moved[k].abs() + a32[k].abs()) * 1.01 + 1e-7
        assert (error <= bound).all() and error.max() > 0


def test_fsdp_without_a_process_group_says_how_to_run(tmp_path):
    with pytest.raises(ValueError, match="field 'fsdp'.*torchrun"):
        train_mod.train(str(tmp_path / "store"), TrainConfig(micro_batch_size=8, fsdp=True))
    assert not (tmp_path / "store").exists()
