"""The trainer's efficiency options change speed and memory, not the result: packed rows (padding
under 10%, printed) train to the same anchor as padded rows, as do activation checkpointing,
variable-length attention (one row per micro-batch, no padding) and torch.compile (per decoder
layer, checked on log-probs and gradients)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lms import grads, random_rows, tiny_lm

from trainer import train as train_mod
from trainer.config import TrainConfig
from bond_data.logprobs import batch_logprobs
from bond_data.packing import collate_packed


def trained(root, **kw) -> tuple[dict, dict]:
    cfg = TrainConfig(**{"micro_batch_size": 16, "grad_accum": 1, "epochs": 1, "lr": 1e-3, "warmup_steps": 2,
                         "checkpoint_every": 100, **kw})
    out = train_mod.train(str(root), cfg)
    return out, load_file(str(root / "anchors" / "round=1" / "model.safetensors"))


def assert_same(got, want, atol):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol)


@pytest.mark.slow
def test_packing_and_activation_checkpointing_train_to_the_same_anchor(round0, tmp_path):
    padded_root = tmp_path / "padded"
    shutil.copytree(round0.root, padded_root)
    packed, packed_w = trained(round0.root, activation_checkpointing=True, pack_length=1000)  # a micro-batch in one packed row
    padded, padded_w = trained(padded_root, packing=False)
    assert packed["padding"] == 0 < padded["padding"]
    assert packed["last_step"]["tokens"] == padded["last_step"]["tokens"]
    assert_same(packed_w, padded_w, atol=2e-5)


@pytest.mark.slow
def test_varlen_attention_trains_to_the_same_anchor_in_one_row_per_micro_batch(round0, tmp_path):
    """attn_implementation varlen (bond_data/attention.py; on this CPU its row-by-row path): no padding, the
    anchor of packed SDPA, and a registered anchor that loads as a plain transformers model."""
    from transformers import AutoModelForCausalLM

    sdpa_root = tmp_path / "sdpa"
    shutil.copytree(round0.root, sdpa_root)
    one_row, one_row_w = trained(round0.root, attn_implementation="varlen")
    packed, packed_w = trained(sdpa_root)
    assert one_row["padding"] == 0 < packed["padding"]
    assert one_row["last_step"]["tokens"] == packed["last_step"]["tokens"]
    start = load_file(str(Path(round0.anchor(0)["anchor_path"]) / "model.safetensors"))
    update = lambda w: torch.cat([(w[k] - start[k]).flatten() for k in sorted(start)])
    # the same update up to float order (Adam magnifies it in near-zero gradients: 4e-5 at most, here)
    assert float((update(one_row_w) - update(packed_w)).norm() / update(packed_w).norm()) < 1e-3  # 5e-5 here
    assert_same(one_row_w, packed_w, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(round0.root / "anchors" / "round=1")
    assert plain.config._attn_implementation in ("sdpa", "eager")


@pytest.mark.slow
def test_compiled_layers_give_the_same_logprobs_and_gradients():
    """The trainer's wrapping with compile=True (torch.compile per decoder layer) against eager."""
    rows, out = random_rows(n=6), []
    for compile_layers in (False, True):
        model = tiny_lm()
        wrapped = train_mod._wrap(model, TrainConfig(compile=compile_layers), torch.device("cpu"), world=1)
        logp = batch_logprobs(wrapped, collate_packed(rows), torch.device("cpu"))
        logp.sum().backward()
        out.append((logp.detach(), grads(model)))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-4)
    for k in out[0][1]:
        torch.testing.assert_close(out[1][1][k], out[0][1][k], rtol=1e-4, atol=1e-5)


def test_boolean_flags_parse_true_and_false_and_refuse_anything_else(capsys):
    import argparse

    from bond_data.config import add_config_flags

    ap = argparse.ArgumentParser()
    add_config_flags(ap, TrainConfig)
    args = ap.parse_args(["--packing", "false", "--fsdp", "TRUE", "--anchor-dtype", "bfloat16"])
    cfg = TrainConfig.from_flags(args)
    assert (cfg.packing, cfg.fsdp, cfg.compile, cfg.anchor_dtype) == (False, True, False, "bfloat16")
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--packing", "maybe"])
    assert e.value.code == 2 and "expected true or false, got 'maybe'" in capsys.readouterr().err


def test_head_backward_bf16_reaches_the_chunked_head():
    for choice, want in (("fp32", False), ("bf16", True)):
        wrapped = train_mod._wrap(tiny_lm(), TrainConfig(head_backward=choice), torch.device("cpu"), world=1)
        assert wrapped.bf16_backward is want
