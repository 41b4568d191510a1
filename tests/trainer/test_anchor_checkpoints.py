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
