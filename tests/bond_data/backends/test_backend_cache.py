"""bond_data.backends: one generator per process, released when the anchor changes; vLLM engine
arguments travel from GenerateConfig to the engine (a stand-in: vLLM needs CUDA)."""

from __future__ import annotations

import gc
import weakref

from bond_data import backends
from bond_data.config import GenerateConfig
from bond_data.tasks.common import save_untrained_model


def test_a_new_anchor_releases_the_previous_model(untrained_model, tmp_path):
    other = save_untrained_model(tmp_path / "next-anchor", seed=1)
    first = backends.load_backend("transformers", str(untrained_model), "h0", 8, "cpu")
    assert backends.load_backend("transformers", str(untrained_model), "h0", 8, "cpu") is first  # reused
    model = weakref.ref(first.model)
    del first
    second = backends.load_backend("transformers", str(other), "h1", 8, "cpu")
    gc.collect()
    assert len(backends._LOADED) == 1 and model() is None  # round t's model is gone
    backends.release()
    assert backends._LOADED == {} and second.model is not None


def test_vllm_engine_arguments_come_from_the_config(monkeypatch):
    from bond_data.backends import vllm

    seen = {}

    class StandIn:
        name = "vllm"

        def __init__(self, model_dir, **engine_args):
            seen.update(model_dir=model_dir, **engine_args)

    monkeypatch.setattr(vllm, "VLLMBackend", StandIn)
    cfg = GenerateConfig(backend="vllm", gpu_memory_utilization=0.5, tensor_parallel_size=2, dtype="bfloat16",
                         max_model_len=4096)
    backends.load_backend("vllm", "/models/m", "h", 64, None, cfg.engine_args())
    assert seen == {"model_dir": "/models/m", "gpu_memory_utilization": 0.5, "tensor_parallel_size": 2,
                    "dtype": "bfloat16", "max_model_len": 4096}
    backends.release()
    assert "max_model_len" not in GenerateConfig().engine_args()  # none: the model's own
