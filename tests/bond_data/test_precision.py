"""The precision policy's pure rules (bond_data/precision.py): auto by device, one policy per pool,
the trainer follows the pool or refuses another; the LM head runs in fp32 under autocast."""

from __future__ import annotations

import pytest
import torch

from bond_data import precision
from bond_data.errors import StoreError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def test_auto_is_bf16_autocast_on_cuda_and_fp32_elsewhere():
    assert precision.resolve("auto", CUDA) == precision.resolve(None, CUDA) == "bf16-autocast"
    assert precision.resolve("auto", CPU) == "fp32" and precision.resolve(None, torch.device("mps")) == "fp32"
    assert precision.resolve("bf16-autocast", CPU) == "bf16-autocast" and precision.resolve("fp32", CUDA) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve("bf16", CPU)


def test_a_pool_has_one_policy_or_none_recorded():
    assert precision.pool_precision([]) is None
    assert precision.pool_precision([{"temperature": 1.0}]) is None  # written before the setting existed
    settings = [{"temperature": 1.0, "precision": "fp32"}, {"temperature": 1.0, "max_new_tokens": 8, "precision": "fp32"}]
    assert precision.pool_precision(settings) == "fp32"
    with pytest.raises(StoreError, match=r"several precision policies \['bf16-autocast', 'fp32'\]"):
        precision.pool_precision([{"precision": "fp32"}, {"precision": "bf16-autocast"}])


@pytest.mark.parametrize("requested, pool, device, expected", [
    ("auto", "fp32", CUDA, "fp32"),                      # follows the pool, whatever the device
    ("auto", "bf16-autocast", CPU, "bf16-autocast"),
    ("bf16-autocast", "bf16-autocast", CUDA, "bf16-autocast"),
    ("auto", None, CUDA, "bf16-autocast"),               # nothing recorded: the device's default
    ("fp32", None, CUDA, "fp32"),
    ("auto", "vllm-bfloat16", CUDA, "bf16-autocast"),    # another engine's numerics: none of ours reproduces them
])
def test_the_trainer_follows_the_pool(requested, pool, device, expected):
    assert precision.check_training(requested, pool, device, round_=0) == expected


def test_the_trainer_refuses_another_policy_than_the_pools():
    with pytest.raises(StoreError, match=r"round 3: .* under precision 'bf16-autocast', but training asks for 'fp32'"):
        precision.check_training("fp32", "bf16-autocast", CUDA, round_=3)


def test_the_lm_head_runs_in_fp32_under_autocast():
    model = torch.nn.Module()
    model.head = torch.nn.Linear(16, 50, bias=False)
    model.get_output_embeddings = lambda: model.head
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.head(x).dtype == torch.bfloat16  # autocast's default for a matmul
    precision.fp32_head(precision.fp32_head(model))  # idempotent
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.head(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.bfloat16().float() @ model.head.weight.T)  # fp32 math on its input
    assert set(model.state_dict()) == {"head.weight"}  # parameters untouched
