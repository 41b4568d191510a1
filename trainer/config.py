"""The trainer's configs: offline BOND (`bond train`), online J-BOND (`bond train-online`), and the
evaluation of each new anchor in `bond rounds` (its `evaluate` section).

Same rules as the data stages' configs (bond_data/config.py): defaults here, a YAML file overrides
them, flags override the file, and every description shows in `--help`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from bond_data.config import DEVICE_PATTERN, Attention, Config
from trainer.lora import parse_lora

# the TrainConfig flags that shrink what a training step holds on its device (said when it runs out of memory)
MEMORY_HINT = ("lower --micro-batch-size or --pack-length, or set --activation-checkpointing true or --anchor-dtype "
               "bfloat16, or shard with --fsdp true under torchrun (`python -m trainer.memory` gives the GiB per GPU)")


class TrainConfig(Config):
    round: int = Field(0, ge=0, description="train on this round's dataset; writes the anchor of round + 1")
    dataset_id: str | None = Field(None, description="which of the round's datasets; none takes the newest")
    beta: float = Field(0.5, ge=0, le=1, description="Jeffreys mix: 0 forward KL (mode covering) .. 1 backward KL (mode seeking)")
    gamma: float = Field(0.0, ge=0, description="weight of KL(pi || anchor), estimated on the anchor's pool")
    self_normalize: bool = Field(False, description="backward term: importance weights rho / mean(rho) over each micro-batch, "
                                 "so moving mass off the pool no longer lowers it (trainer/losses.py); needs micro-batches of several rows")
    eta: float = Field(0.0, ge=0, le=1, description="EMA anchor step per optimizer step; 0 = hard refresh at the end")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate (linear warm-up, then constant)")
    warmup_steps: int = Field(10, ge=0, description="optimizer steps of linear warm-up")
    epochs: int = Field(2, ge=1, description="passes over the dataset")
    micro_batch_size: int = Field(64, ge=1, description="sequences per forward pass (grouped by length)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_grad_norm: float = Field(1.0, gt=0, description="global gradient-norm clip")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")
    seed: int = Field(0, description="seed of the batch order (and of the LoRA adapters' init)")
    lora: str | None = Field(None, description="train LoRA adapters on a frozen base (peft), e.g. "
                             "r=16,alpha=32,targets=q_proj,v_proj[,dropout=0.05]; the EMA averages the adapters, "
                             "the next anchor is the merged model; none trains every weight")
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description="cpu, cuda, cuda:N or mps; none picks cuda when available (bf16 autocast on cuda)")
    precision: Literal["auto", "fp32", "bf16-autocast"] = Field(
        "auto", description="auto follows the pool's recorded policy (else bf16-autocast on cuda, fp32 elsewhere); "
                            "another policy than the pool's is refused (bond_data/precision.py)")
    # efficiency (issue 12): none of these changes the math, only speed and memory
    packing: bool = Field(True, description="pack each micro-batch's rows into shared rows (position ids restart per row, no cross-row attention) instead of padding each")
    pack_length: int | None = Field(None, ge=1, description="widest a packed row may be, in tokens; none: twice the micro-batch's longest row (with attn_implementation varlen: the whole micro-batch in one row, no padding); the rows are balanced over bins for the least padding (wider rows waste less on padding but cost more attention with SDPA's dense mask)")
    logprob_chunk: int = Field(512, ge=1, description="completion tokens per LM-head chunk: the [chunk, vocab] logits are the only vocab-sized tensor, recomputed in the backward")
    head_backward: Literal["fp32", "bf16"] = Field("fp32", description="the LM head's backward matmuls under bf16-autocast precision: fp32 (TF32 on a GPU, as its forward) or bf16, as autocast runs every other layer's backward (about twice the tensor-core rate; the recomputed logits rounded to bf16); the forward's log-probs, which enter rho and the loss, and the gradients' sums over chunks stay fp32; no effect under precision fp32")
    attn_implementation: Attention | None = Field(None, description="transformers attention kernel; none: transformers' default (SDPA where the architecture has it; Gemma-2 has not); flex_attention skips the masked blocks of packed rows (GPU; compiles), flash_attention_2 needs the flash-attn package; varlen: each packed row attends only within itself through torch's own variable-length flash kernel (CUDA, bf16; elsewhere the same math row by row), no mask (bond_data/attention.py)")
    compile: bool = Field(False, description="torch.compile each decoder layer, the LM head's logsumexp and its backward's softmax (dynamic shapes; first steps are slow; 1.28x on a 0.5B Qwen2 step on an H200)")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer in the backward: less memory, about a third more compute")
    fsdp: bool = Field(False, description="shard policy, anchor, gradients and optimizer state over the processes with FSDP2 (under torchrun); sharded checkpoints")
    anchor_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the EMA anchor copy (eta > 0); bfloat16 halves it, but an EMA step below bf16's resolution (eta under ~1/256 of a weight's change) is lost")


    @field_validator("lora")
    @classmethod
    def _valid_lora(cls, v: str | None) -> str | None:
        if v is not None:
            parse_lora(v)  # ValueError -> a one-line ConfigError naming the field
        return v

    @model_validator(mode="after")
    def _normalizable(self) -> TrainConfig:
        if self.self_normalize and self.micro_batch_size < 2:  # one row: rho / mean(rho) = 1, no signal
            raise ValueError("field 'self_normalize': needs micro_batch_size >= 2 (it normalizes over a micro-batch's rows)")
        return self


class OnlineConfig(Config):
    algorithm: Literal["jbond", "reinforce"] = Field("jbond", description="jbond (paper Algorithm 2) or reinforce: REINFORCE + KL penalty to the starting policy, the baseline, 3 policy samples per prompt")
    beta: float = Field(0.5, ge=0, le=1, description="Jeffreys mix: 0 forward only (mode covering) .. 1 backward only (seeking)")
    eta: float = Field(0.02, ge=0, le=1, description="EMA anchor step per optimizer step; 0 keeps the starting anchor")
    gamma: float = Field(0.0, ge=0, description="weight of the extra KL(pi || anchor) regulariser")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate, constant")
    steps: int = Field(100, ge=1, description="optimizer steps")
    prompts_per_step: int = Field(32, ge=1, description="prompts per step; each gets 1 policy + 2 anchor samples")
    max_new_tokens: int = Field(16, ge=1, description="completion length cap for all samples")
    max_grad_norm: float = Field(1.0, gt=0, description="global gradient-norm clip")
    gen_batch_size: int = Field(64, ge=1, description="sequences per generate() call and per reward-model call")
    seed: int = Field(0, description="sampling seeds and the prompt order derive from it")
    kl_coef: float = Field(0.1, ge=0, description="reinforce only: weight of KL(pi || starting policy) subtracted from the reward")
    checkpoint_every: int = Field(50, ge=1, description="steps between resumable checkpoints in <out>-steps/step-N (and at the last step)")
    keep_checkpoints: int = Field(2, ge=0, description="newest step-N checkpoints kept; 0 keeps all (a training curve)")
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description="cpu, cuda, cuda:N or mps; none picks cuda when available (bf16 autocast on cuda)")


class EvalConfig(Config):
    """`bond rounds`' evaluation of each new anchor against pi_0 (round 0's anchor), see trainer/evaluate.py."""

    enabled: bool = Field(True, description="false skips evaluation: the round reports hold data and training only")
    prompts: str | None = Field(None, description="held-out prompts (JSONL, one {\"prompt\": ...} per line); none "
                                "takes the built-in task's held-out file when the reward is a built-in task's, "
                                "else evaluation is skipped")
    rm: str | None = Field(None, description="reward model spec to evaluate with; none takes the score stage's")
    pool_k: int = Field(64, ge=1, description="samples per held-out prompt from pi_0, drawn once: the quantiles' reference")
    samples_per_prompt: int = Field(8, ge=1, description="samples per held-out prompt from each anchor")
    max_new_tokens: int = Field(16, ge=1, description="completion length cap of the pool's and the anchors' samples")


TINY_TRAIN = Path(__file__).resolve().parent / "configs" / "tiny.yaml"  # the demo's and the benchmark's settings
# ... with this learning rate for rounds of iterative BOND at small n (`bond demo`, bench/fidelity.py's
# iterative rows). A Best-of-2 round moves its anchor by ~0.18 nats; at tiny.yaml's lr 1e-3 a round's
# 128 Adam steps drift ~0.2-0.3 nats from the anchor even when the target *is* the anchor (weights
# 1), most of it within reward levels, which no quantile sees; at 3e-4 that drift is ~0.07. Direct
# Best-of-8 (1.07 nats) keeps 1e-3. bench/RESULTS.md, "Tracing the tiny iterative gap".
TINY_ITERATIVE_LR = 3e-4
