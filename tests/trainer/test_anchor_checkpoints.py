import json

import torch

from trainer.anchor import ema_update
from trainer.checkpoints import is_complete, latest_checkpoint, model_hash, save_checkpoint


def test_ema_update_matches_the_formula():
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    p = {"w": torch.tensor([3.0, -2.0]), "steps": torch.tensor(7)}
    ema_update(a, p, 0.25)
    assert a["w"].tolist() == [1.5, 1.0] and a["steps"].item() == 7
    ema_update(a, p, 0.0)
    assert a["w"].tolist() == [1.5, 1.0]
    ema_update(a, p, 1.0)
    assert a["w"].tolist() == [3.0, -2.0]


def test_checkpoints_are_atomic_and_verified(tmp_path, untrained_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(untrained_model)
    tok = AutoTokenizer.from_pretrained(untrained_model)
    h = save_checkpoint(tmp_path / "run" / "step-10", model, tok, state={"step": 10}, meta={"step": 10})
    h20 = save_checkpoint(tmp_path / "run" / "step-20", model, tok, state={"step": 20})
    assert h == h20 == model_hash(tmp_path / "run" / "step-10")  # the training state is not the identity
    assert latest_checkpoint(tmp_path / "run").name == "step-20"
    (tmp_path / "run" / "step-20" / "model.safetensors").write_bytes(b"torn")  # a damaged checkpoint is skipped
    assert not is_complete(tmp_path / "run" / "step-20")
    assert latest_checkpoint(tmp_path / "run").name == "step-10"
    assert json.loads((tmp_path / "run" / "step-10" / "manifest.json").read_text())["step"] == 10
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_checkpoint_files_are_readable_by_the_team(tmp_path, untrained_model):
    """safetensors writes 0600 files; a shared store needs them readable (0644 with umask 022)."""
    import os
    import stat

    from transformers import AutoModelForCausalLM, AutoTokenizer

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ckpt", AutoModelForCausalLM.from_pretrained(untrained_model),
                        AutoTokenizer.from_pretrained(untrained_model))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}


def test_metrics_of_a_resumed_run_keep_each_step_once(tmp_path):
    from trainer.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    log = MetricsLog(path, rank=0, total=10, start=4)  # resumed from the step-4 checkpoint
    log.write(5, {"loss": 0.5, "tokens": 10}, 1.0, 1e-3)
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_training_progress_off_a_terminal_is_plain_lines_with_steps_and_loss(tmp_path, capsys, monkeypatch):
    from trainer.metrics import MetricsLog

    monkeypatch.setenv("BOND_PROGRESS_SECONDS", "0")
    log = MetricsLog(tmp_path / "metrics.jsonl", rank=0, total=4, start=2, label="train round 1")
    for step, loss in ((3, 0.75), (4, 0.5)):
        log.write(step, {"loss": loss, "tokens": 10}, 1.0, 1e-3)
    log.close()
    lines = [line.split(", ")[:2] for line in capsys.readouterr().err.splitlines()]
    assert lines == [["train round 1: 3/4 steps (75%)", "loss 0.7500"], ["train round 1: 4/4 steps (100%)", "loss 0.5000"]]


def test_a_failed_training_step_stops_the_progress_and_closes_the_metrics(tmp_path):
    """Off a terminal the bar runs a timer thread; a step that raises must not leave it printing
    (in a Prefect worker or a notebook it would print every few seconds for the process's life)."""
    import threading

    import pytest

    from trainer.metrics import MetricsLog

    with pytest.raises(RuntimeError, match="step failed"):
        with MetricsLog(tmp_path / "metrics.jsonl", 0, total=10, start=0, label="train round 9") as log:
            assert log.progress.ticker is not None and log.progress.ticker.is_alive()
            raise RuntimeError("step failed")
    assert log.file.closed and not log.progress.ticker.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "progress train round 9"]
