"""Model FLOPs utilisation in the training metrics: the GPU's bf16 peak looked up by its name, and
each metrics line's `mfu` = flops per token x tokens/s over that peak (left out where either is
unknown: on the CPU, under fp32, for LoRA)."""

from __future__ import annotations

import json

import pytest
import torch

from bond_data.device import peak_bf16_flops
from trainer.metrics import MetricsLog


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H200 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA L40S", 362e12),
                                       ("NVIDIA L4", 121e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)])
def test_the_peak_is_the_longest_matching_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_bf16_flops(torch.device("cuda")) == peak


def test_no_peak_off_a_gpu():
    assert peak_bf16_flops(torch.device("cpu")) is None


def test_each_metrics_line_has_the_mfu_when_flops_and_peak_are_known(tmp_path):
    step = {"loss": 1.0, "tokens": 1000, "padding": 0.0}
    with MetricsLog(tmp_path / "a.jsonl", 0, total=2, start=0, flops_per_token=6e9, peak_flops=1e15) as log:
        log.write(1, step, 0.5, 1e-4)  # 2,000 tokens/s x 6e9 FLOPs = 1.2e13 FLOP/s of 1e15
    with MetricsLog(tmp_path / "b.jsonl", 0, total=2, start=0, flops_per_token=6e9, peak_flops=None) as log:
        log.write(1, step, 0.5, 1e-4)
    with_mfu, without = (json.loads((tmp_path / f).read_text()) for f in ("a.jsonl", "b.jsonl"))
    assert with_mfu["mfu"] == pytest.approx(0.012) and with_mfu["tokens_per_s"] == 2000
    assert "mfu" not in without

