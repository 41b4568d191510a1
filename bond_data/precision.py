"""One precision policy for every log-probability BOND divides by: the generator's log A(y) and the
trainer's log pi(y) must be the same function of the weights, or rho = pi / A is not 1 when
pi = A (at initialisation) and the backward term chases rounding, not Best-of-N.

Two policies, one meaning each, for the generator and the trainer alike:

- `fp32`: fp32 weights, fp32 arithmetic. Log-probs agree to about 1e-6 nats per completion whatever
  the batch, padding or KV cache. The default off CUDA.
- `bf16-autocast`: fp32 weights (the trainer's master copy: AdamW steps of lr 3e-4 vanish below
  a bf16 weight's 2^-8 relative spacing), the transformer body under `torch.autocast(bfloat16)`
  (tensor-core matmuls: what makes a GPU fast), and the LM head and log-softmax in fp32 (bf16
  logits round by up to |logit| * 2^-9, which alone moves a token's log-prob by ~0.01; raising the
  head's precision is the fix MiniMax-M1 reports for its trainer/generator mismatch). The default
  on CUDA. The generator samples under the same autocast, then computes log A by one teacher-forced
  pass through the trainer's own function (bond_data/logprobs.py: packed rows, chunked fp32 head),
  not from its KV-cache steps:
  in bf16 an incremental decode and a full forward round differently (up to 0.04 nats on 8 tokens
  of the tiny model).

Not offered: `bf16` weights. Training bf16 weights loses small updates, and a generator in bf16
weights (what the transformers backend did on CUDA) computes another function than the trainer's
fp32 weights under autocast: a spurious |log pi/A| up to 0.09 nats on 8-token completions of the
tiny model at initialisation. What the generator may hold in bf16 is exactly what autocast casts
to bf16 anyway: the weights and biases of the body's linear layers (`bf16_body`). Each of their
matmuls then gets the very bf16 tensor autocast would have made of the fp32 one, so the function is
the same bit for bit, with 1.5x-1.9x less weight memory than fp32 weights for 0.5B-70B models
(bench/generate_memory.py); embeddings, norms and the LM head, which run in fp32 under the policy,
stay fp32.

The policy a pool was generated under is recorded in its candidates' `sampling` JSON
(`"precision"`); the trainer follows it, and refuses an explicit different one (`check_training`).
bf16 arithmetic is reproducible only for the same kernels: batch shapes that change which kernel
runs (on CPU, SDPA with and without a padding mask) still differ at bf16 rounding level; fp32 is the
policy for bit-for-bit-minded comparisons.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from bond_data.errors import StoreError

if TYPE_CHECKING:  # torch is imported lazily: `bond --help` should not pay for it
    import torch

POLICIES = ("fp32", "bf16-autocast")
CHOICES = ("auto", *POLICIES)  # auto: bf16-autocast on CUDA, fp32 elsewhere


def resolve(name: str | None, device: torch.device) -> str:
    """A policy name (or auto / None) as the concrete policy for `device`."""
    if name in (None, "auto"):
        return "bf16-autocast" if device.type == "cuda" else "fp32"
    if name not in POLICIES:
        raise ValueError(f"precision must be one of {list(CHOICES)}, got {name!r}")
    return name


def autocast(precision: str, device: torch.device):
    """The context every forward pass of the policy runs in: bf16 autocast on the device's own type
    (CPU included, which emulates the CUDA policy), or nothing for fp32."""
    import torch

    if precision == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fp32_head(model):
    """Make the model's LM head always run in fp32, outside autocast: the policy's rule for logits
    (a no-op under `fp32`). Weights must already be fp32 (load with `dtype=torch.float32`; a bf16
    model keeps a bf16 head). Patches the head module's forward only: parameters, state dict and `save_pretrained` are unchanged."""
    import torch

    head = model.get_output_embeddings()
    if head is None or getattr(head, "_bond_fp32_head", False):
        return model
    inner = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return inner(hidden.to(head.weight.dtype))  # fp32 with fp32 weights

    head.forward = forward
    head._bond_fp32_head = True
    return model


def bf16_body(model) -> int:
    """Cast the body's `nn.Linear` layers (weights and biases; not the LM head, nor a layer sharing
    its weight) to bf16 in place, for a model that only ever runs under `bf16-autocast`: autocast
    casts their fp32 parameters to these same bf16 values in every matmul, so outputs do not change
    (tests/bond_data/backends/test_hf_weights.py). That holds for a layer autocast reaches; one the
    architecture runs with autocast off (in fp32, say a router) would then compute in bf16, so a
    short probe forward finds where each layer runs and such layers stay fp32 (and so does every
    layer the probe did not reach, when one of its class ran outside autocast). For the generator's
    anchor only: the trainer's fp32 master weights take AdamW steps. Returns the bytes freed."""
    import torch

    head = model.get_output_embeddings()
    keep = {id(p) for p in head.parameters()} if head is not None else set()
    linears = [m for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head and id(m.weight) not in keep]
    under, outside = _where_linears_run(model, linears)
    doubtful = {type(m) for m in outside}  # a class some layer of which ran outside autocast
    before = _parameter_bytes(model)
    for module in linears:
        if module in under or (module not in outside and type(module) not in doubtful):
            module.to(torch.bfloat16)
    return before - _parameter_bytes(model)


def _where_linears_run(model, linears: list) -> tuple[set, set]:
    """(layers that computed in bf16, layers that computed otherwise) in one forward of a few tokens
    under bf16 autocast on the model's own device. With fp32 weights a bf16 output means autocast
    cast the weight, as `bf16_body` would; an fp32 one means it ran outside autocast."""
    import torch

    device = next(model.parameters()).device
    under, outside = set(), set()

    def record(module, args, output):
        (under if output.dtype == torch.bfloat16 else outside).add(module)

    hooks = [m.register_forward_hook(record) for m in linears]
    try:
        ids = torch.arange(4, device=device)[None] % model.config.get_text_config().vocab_size
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return under - outside, outside  # a layer seen both ways runs outside autocast somewhere


def _parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def pool_precision(settings: list[dict]) -> str | None:
    """The one policy a round's candidates were generated under (None: recorded by none of them,
    a pool from before this setting existed). Refuses a round that mixes policies."""
    found = {s["precision"] for s in settings if s.get("precision") not in (None, "auto")}
    if len(found) > 1:
        raise StoreError(f"the round's candidates were generated under several precision policies {sorted(found)}: "
                         f"their log A values are not one function; regenerate the round under one `--precision`")
    return found.pop() if found else None


def check_training(requested: str | None, pool: str | None, device: torch.device, round_: int) -> str:
    """The policy the trainer runs: the pool's (when it is one of ours), or the requested one. An
    explicit policy other than the pool's is refused: log pi / A would be off by rounding at init."""
    if pool is None or pool not in POLICIES:  # unrecorded (older pools) or another engine's (vLLM)
        return resolve(requested, device)
    if requested not in (None, "auto") and requested != pool:
        raise StoreError(
            f"round {round_}: its candidates' log A was computed under precision {pool!r}, but training asks for "
            f"{requested!r}; log pi/A would not be 1 at initialisation. Train with `--precision {pool}` (or leave it "
            f"unset to follow the pool), or regenerate the round with `--precision {requested}`")
    return pool


def right_padded(prompts: list[list[int]], completions: list[list[int]], device: torch.device):
    """(prompt ids, completion ids) pairs -> right-padded [B, T] input ids and attention mask, and the
    [B, T-1] mask that is 1 where position t predicts a completion token t + 1: the one layout of the
    generator's teacher-forced log A pass and the trainer's full-logits reference, so both run the
    same shapes (and kernels)."""
    import torch

    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, seqs))
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width - 1)
    for b, (p, seq) in enumerate(zip(prompts, seqs)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention[b, : len(seq)] = 1
        mask[b, len(p) - 1 : len(seq) - 1] = 1  # position t predicts token t + 1
    return input_ids.to(device), attention.to(device), mask.to(device)
