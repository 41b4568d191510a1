"""How the transformers backend holds its weights under `bf16-autocast` (the CUDA policy emulated
with CPU bf16 autocast):

- loaded for that policy, its body's linear layers in bf16 (precision.bf16_body): exactly what
  autocast casts them to in every matmul, so it samples the same tokens with the same log A, bit for
  bit, as fp32 weights, per family and decoding path, while embeddings, norms and the head stay fp32;
- with fp32 weights, autocast casts each one once per batch, not at every decoding step."""

from __future__ import annotations

import pytest
import torch

from bond_data import precision as precision_policy
from bond_data import stages
from bond_data.backends.base import PromptJob, Sampling
from bond_data.backends.hf import TransformersBackend
from bond_data.tasks.families import save_family_model

PROMPTS = ["sort: dcba =", "zyx", "a much longer prompt than the others, to force left padding"]
BF16 = Sampling(max_new_tokens=10, precision="bf16-autocast")


def jobs(k=4):
    return [PromptJob(str(j), p, None, list(range(k)), [31 * j + s for s in range(k)]) for j, p in enumerate(PROMPTS)]


def load(folder, precision=None, decoding="dynamic"):
    return TransformersBackend.from_pretrained(str(folder), batch_size=5, device="cpu", decoding=decoding,
                                               precision=precision)


def perturbed(folder, out):
    """The model with every 1-D parameter (norm weights, biases) moved off its initial value: an
    untrained norm's weight is all ones (Gemma's zeros), exact in bf16, so a bf16 norm would go unseen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(out)
    return out


def body_linears(model):
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


@pytest.mark.parametrize("family", ["tiny-llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                    pytest.param("gemma2", marks=pytest.mark.slow),
                                    pytest.param("phi3", marks=pytest.mark.slow),
                                    pytest.param("qwen3", marks=pytest.mark.slow),
                                    pytest.param("gemma3", marks=pytest.mark.slow)])
def test_bf16_body_samples_the_same_tokens_and_log_a_bit_for_bit(family, untrained_model, tmp_path):
    folder = untrained_model if family == "tiny-llama" else save_family_model(family, tmp_path / family)
    folder = perturbed(folder, tmp_path / "perturbed")
    fp32 = load(folder)
    held = load(folder, "bf16-autocast")
    assert fp32.policy is None and held.policy == "bf16-autocast"
    assert all(p.dtype == torch.float32 for p in fp32.model.parameters())
    linears = body_linears(held.model)
    assert linears and all(p.dtype == torch.bfloat16 for m in linears for p in m.parameters())
    in_linears = {id(p) for m in linears for p in m.parameters()}
    others = [p for p in held.model.parameters() if id(p) not in in_linears]
    assert others and all(p.dtype == torch.float32 for p in others)  # embeddings, norms, the head
    assert held.model.get_output_embeddings().weight.dtype == torch.float32
    assert held.model.dtype == torch.float32  # what transformers builds its masks in: unchanged
    assert held.generate(jobs(), BF16) == fp32.generate(jobs(), BF16)  # Completion dataclasses: every field


def test_bf16_body_with_a_static_cache_and_the_bytes_it_frees(untrained_model):
    fp32 = load(untrained_model, "fp32")
    assert fp32.policy == "fp32" and all(p.dtype == torch.float32 for p in fp32.model.parameters())  # fp32: no cast
    model = load(untrained_model).model
    linear_params = sum(p.numel() for m in body_linears(model) for p in m.parameters())
    assert precision_policy.bf16_body(model) == 2 * linear_params  # 4 bytes -> 2 each
    assert precision_policy.bf16_body(model) == 0  # idempotent
    static = load(untrained_model, "bf16-autocast", decoding="static")
    assert static.generate(jobs(), BF16) == load(untrained_model).generate(jobs(), BF16)


def test_a_linear_layer_run_outside_autocast_stays_fp32(untrained_model, tmp_path):
    """As an architecture running a layer in fp32 with autocast off (a router, say): its weight in
    bf16 would change what it computes. bf16_body's probe finds it and leaves it, and only it, fp32;
    the logits stay those of fp32 weights, bit for bit."""
    from transformers import AutoModelForCausalLM

    folder = perturbed(untrained_model, tmp_path / "perturbed")

    def load_with_fp32_down_projections():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        for layer in model.model.layers:
            mlp = layer.mlp

            def forward(x, mlp=mlp):  # the MLP, its down projection in fp32 with autocast off
                h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
                with torch.autocast("cpu", enabled=False):
                    return mlp.down_proj(h.to(mlp.down_proj.weight.dtype))

            mlp.forward = forward
        return model

    fp32, held = load_with_fp32_down_projections(), load_with_fp32_down_projections()
    held.model.unused = torch.nn.Linear(4, 4)  # the probe never reaches it: its class ran outside, so it stays
    precision_policy.bf16_body(held)
    downs = [layer.mlp.down_proj for layer in held.model.layers]
    assert all(d.weight.dtype == torch.float32 for d in downs) and held.model.unused.weight.dtype == torch.float32
    assert all(m.weight.dtype == torch.bfloat16 for m in body_linears(held) if m not in [*downs, held.model.unused])
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 40, 3]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(held(input_ids=ids).logits, fp32(input_ids=ids).logits)


def test_a_bf16_body_refuses_another_policy(untrained_model):
    held = load(untrained_model, "bf16-autocast")
    with pytest.raises(ValueError, match="holds its weights for precision 'bf16-autocast', not 'fp32'"):
        held.generate(jobs(), Sampling(max_new_tokens=4, precision="fp32"))
    with pytest.raises(ValueError, match="not 'fp32'"):  # auto is fp32 on this CPU
        held.generate(jobs(), Sampling(max_new_tokens=4))


def test_the_generate_stage_writes_the_same_pool_with_a_bf16_body(untrained_model, prompt_file, tmp_path):
    """Through the stage the flows run, with the engine arguments generate_flow passes: the shards'
    candidates (tokens, log A, lineage) equal those of fp32 weights."""
    from bond_data.backends import release
    from bond_data.files import folder_sha256
    from bond_data.prompts import add_prompts
    from bond_data.store import Store

    def pool(name, engine_args):
        store = Store(tmp_path / name)
        store.register_anchor(0, str(untrained_model), folder_sha256(untrained_model))
        add_prompts(store, prompt_file)
        stages.generate_round(store, 0, 3, BF16, shard_prompts=4, batch_size=8, device="cpu", engine_args=engine_args)
        release()
        return store.query("SELECT * FROM candidates ORDER BY candidate_id").to_pylist()

    base = {"decoding": "dynamic", "attn_implementation": None}
    fp32, held = pool("fp32", base), pool("held", {**base, "precision": "bf16-autocast"})
    assert len(fp32) == 30 and held == fp32


def weight_casts(backend, new_tokens: int) -> int:
    """How many times generating one batch casts a linear layer's weight (a 2-D fp32 -> bf16 copy of
    a weight's shape; activations are 3-D)."""
    from torch.profiler import profile

    shapes = {tuple(m.weight.shape) for m in body_linears(backend.model)}
    with profile(record_shapes=True) as prof:
        backend.generate(jobs(k=2), Sampling(max_new_tokens=new_tokens, precision="bf16-autocast"))
    return sum(e.count for e in prof.key_averages(group_by_input_shape=True)
               if e.key == "aten::_to_copy" and e.input_shapes and tuple(e.input_shapes[0]) in shapes)


def test_fp32_weights_are_cast_once_per_batch_and_a_bf16_body_never(untrained_model):
    """Decoding and the log A pass run in one autocast region under no_grad, where autocast keeps
    each weight's cast for the region: one cast per weight per batch. Under inference_mode it kept
    none: every forward cast every weight again (42 and 126 casts of these 14 weights at 2 and 8
    new tokens: the prefill, each later step and the log A pass)."""
    fp32 = load(untrained_model)
    fp32.batch_size = 16  # one batch
    n_linear = len(body_linears(fp32.model))
    assert weight_casts(fp32, 2) == weight_casts(fp32, 8) == n_linear
    assert weight_casts(load(untrained_model, "bf16-autocast"), 8) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_body_samples_the_same_tokens_and_log_a_on_a_gpu(untrained_model, tmp_path):
    """CUDA's autocast casts as `.to(bfloat16)` does: the bf16 body there too (auto = bf16-autocast)."""
    folder = perturbed(untrained_model, tmp_path / "perturbed")
    fp32 = TransformersBackend.from_pretrained(str(folder), batch_size=5, device="cuda")
    held = TransformersBackend.from_pretrained(str(folder), batch_size=5, device="cuda", precision="auto")
    assert held.policy == "bf16-autocast" and body_linears(held.model)[0].weight.dtype == torch.bfloat16
    auto = Sampling(max_new_tokens=10)
    assert held.generate(jobs(), auto) == fp32.generate(jobs(), auto)
