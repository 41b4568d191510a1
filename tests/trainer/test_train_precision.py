"""One precision policy for the generator's log A and the trainer's log pi (bond_data/precision.py):
at initialisation (pi = A) rho = pi/A is 1 to 1e-3 per completion under each policy, the CUDA
policy emulated with CPU bf16 autocast; the old pairing (bf16 weights sampling and scoring their
own decode, fp32 weights under autocast training) misses that bound; the trainer follows the pool's
recorded policy and refuses another one, writing nothing."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from testutil import run_generation, run_scoring, tree_digest
from tiny_lms import tiny_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

from bond_data import attention, build, stages
from bond_data import precision as precision_policy
from bond_data.backends.base import PromptJob, Sampling
from bond_data.backends.hf import TransformersBackend, prompt_token_ids
from bond_data.errors import LogAMismatch, StoreError
from trainer import checkpoints
from trainer import train as train_mod
from trainer.config import TrainConfig
from bond_data.logprobs import completion_logprobs

CPU = torch.device("cpu")
WORDS = ["dbca", "zyx", "hello", "qwerty", "mno", "edcba"]
TOL = 1e-3  # nats per completion
# bf16 rounds a row a little differently in another batch (the trainer's bins hold other rows than
# the generator's): on this CPU, over 4 x 36 completions of 8 and 32 tokens, the largest |log rho|
# was 1.4e-3 and the mean 0.5e-4 to 1.7e-4, for packed and right-padded log A passes alike.
BF16_MAX = 2e-3


def _jobs() -> list[PromptJob]:
    return [PromptJob(str(i), f"sort: {w} =", None, list(range(6)), [1000 * i + s for s in range(6)])
            for i, w in enumerate(WORDS)]


def _rows(tokenizer, completions) -> list[dict]:
    """Dataset rows as the trainer loads them (train._load_rows), forward and backward weights 1."""
    return [{"prompt": prompt_token_ids(tokenizer, job.prompt, None), "completion": c.token_ids, "weight": 1.0,
             "weight_pool": 1.0, "logp_anchor": c.anchor_logprob}
            for job, outs in zip(_jobs(), completions) for c in outs]


def _log_rho(folder, rows: list[dict], precision: str, fp32_head: bool = True, attn: str | None = None) -> torch.Tensor:
    """[rows] log pi - log A at initialisation, pi the trainer's policy loaded as `train` loads it and
    scored in the trainer's own micro-batches (its batch plan: shuffled, grouped by length)."""
    policy, _ = checkpoints.load_policy(folder, CPU, attn)
    if fp32_head:
        precision_policy.fp32_head(policy)
    plan = train_mod._batch_plan(rows, micro_batch_size=12, grad_accum=1, epochs=1, seed=0, world=1)
    log_rho = torch.full((len(rows),), float("nan"))
    with torch.no_grad():
        for (micro_batches,) in plan:
            for micro in micro_batches:
                batch = [rows[i] for i in micro]
                logp = completion_logprobs(policy, batch, CPU, precision).double()
                log_rho[micro] = (logp - torch.tensor([r["logp_anchor"] for r in batch], dtype=torch.float64)).float()
    return log_rho[~log_rho.isnan()]


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_rho_is_one_at_initialisation(untrained_model, precision):
    backend = TransformersBackend.from_pretrained(str(untrained_model), batch_size=16, device="cpu")
    sampling = Sampling(max_new_tokens=8, precision=precision)
    assert backend.precision(sampling) == precision
    rows = _rows(backend.tokenizer, backend.generate(_jobs(), sampling))
    log_rho = _log_rho(untrained_model, rows, precision)
    assert len(log_rho) == 36  # every completion, in the trainer's three micro-batches
    assert log_rho.abs().mean() < TOL / 4, log_rho.abs().mean()
    assert log_rho.abs().max() < (TOL if precision == "fp32" else BF16_MAX), log_rho.abs().max()
    # the training step itself, on one micro-batch at step 0: its mean log pi/A is that too
    policy, _ = checkpoints.load_policy(untrained_model, CPU)
    precision_policy.fp32_head(policy)
    terms = train_mod.train_step(policy, [rows[:12]], 0.5, 0.0, 12, 1, CPU, precision)
    assert abs(terms["log_ratio"]) < TOL


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_rho_is_one_at_initialisation_with_varlen_attention_on_both_sides(untrained_model, precision):
    """attn_implementation varlen for the generator (its teacher-forced log A pass) and the trainer:
    the same bound (here log rho is exactly 0: a row's attention no longer depends on what shares its
    bin). Under bf16 with varlen on the trainer's side only, log A and log pi come from different
    attention kernels and miss it (max 2.3e-3 here): why the generator takes the setting too."""
    sampling = Sampling(max_new_tokens=8, precision=precision)
    both = TransformersBackend.from_pretrained(str(untrained_model), batch_size=16, device="cpu",
                                               attn_implementation="varlen")
    rows = _rows(both.tokenizer, both.generate(_jobs(), sampling))
    log_rho = _log_rho(untrained_model, rows, precision, attn="varlen")
    assert len(log_rho) == 36 and log_rho.abs().mean() < TOL / 4, log_rho.abs().mean()
    assert log_rho.abs().max() < (TOL if precision == "fp32" else BF16_MAX), log_rho.abs().max()
    if precision == "bf16-autocast":  # the generator on SDPA, the trainer on varlen
        sdpa = TransformersBackend.from_pretrained(str(untrained_model), batch_size=16, device="cpu")
        mixed = _log_rho(untrained_model, _rows(sdpa.tokenizer, sdpa.generate(_jobs(), sampling)), precision,
                         attn="varlen")
        assert mixed.abs().max() > TOL, mixed.abs().max()


def test_the_old_pairing_fails_the_same_bound(untrained_model):
    """What ran on CUDA before: the generator in bf16 weights summing its own KV-cache decode steps,
    the trainer in fp32 weights under bf16 autocast with bf16 logits (emulated on the CPU)."""
    model = AutoModelForCausalLM.from_pretrained(untrained_model, dtype=torch.bfloat16).eval()
    old = TransformersBackend(model, AutoTokenizer.from_pretrained(untrained_model), CPU, batch_size=16)
    rows = _rows(old.tokenizer, old.generate(_jobs(), Sampling(max_new_tokens=8, precision="fp32")))  # no recompute
    assert _log_rho(untrained_model, rows, "bf16-autocast", fp32_head=False).abs().max() > 3 * TOL


def test_a_bf16_decode_needs_the_teacher_forced_log_a(untrained_model):
    """Even under one policy, bf16 rounds a KV-cache decode differently from a full forward pass:
    the log-probs summed while sampling miss rho = 1, the recomputed ones (above) do not."""
    backend = TransformersBackend.from_pretrained(str(untrained_model), batch_size=16, device="cpu")
    sampling = Sampling(max_new_tokens=8, precision="bf16-autocast")
    backend._teacher_forced = lambda batch, completions, sampling: completions  # keep the decode's sums
    rows = _rows(backend.tokenizer, backend.generate(_jobs(), sampling))
    assert _log_rho(untrained_model, rows, "bf16-autocast").abs().max() > TOL


# ---- lineage: the pool records its policy, the trainer follows it or refuses --------------------
@pytest.fixture
def round0(store):
    run_generation(store, k=4, max_new_tokens=6)  # precision auto: fp32 on this CPU
    run_scoring(store)
    build.build_dataset(store, 0, n=2)
    return store


@pytest.mark.slow  # generate, score, build and train a round
def test_the_trainer_follows_the_pools_policy_and_refuses_another(round0):
    assert [s["precision"] for s in round0.sampling_settings(0)] == ["fp32"]  # the lineage
    before = tree_digest(round0.root)
    with pytest.raises(StoreError, match="computed under precision 'fp32', but training asks for 'bf16-autocast'"):
        train_mod.train(str(round0.root), TrainConfig(precision="bf16-autocast"))
    assert tree_digest(round0.root) == before  # refused before anything is written

    result = train_mod.train(str(round0.root), TrainConfig(micro_batch_size=8, epochs=1, warmup_steps=1))
    assert result["precision"] == "fp32" and result["pool_precision"] == "fp32"
    config = json.loads(round0.query("SELECT config FROM rounds WHERE round = 1").column(0)[0].as_py())
    assert config["precision"] == "fp32"  # the anchor registration records what trained it


# ---- lineage: the pool records the attention of its log A pass; the trainer says when it differs ----
@pytest.mark.slow  # generate (bf16), score, build and train
def test_the_trainer_warns_when_the_pools_log_a_attended_otherwise(store):
    stages.generate_round(store, 0, 4, Sampling(max_new_tokens=6, precision="bf16-autocast"), 4, batch_size=16)
    run_scoring(store)
    build.build_dataset(store, 0, n=2)
    assert [(s["precision"], s["attention"]) for s in store.sampling_settings(0)] == [("bf16-autocast", "sdpa")]
    cfg = TrainConfig(micro_batch_size=8, epochs=1, warmup_steps=1, precision="bf16-autocast", attn_implementation="varlen")
    with pytest.warns(LogAMismatch, match="round 0: its candidates' log A was computed with sdpa attention, the "
                      "trainer runs varlen"):
        assert train_mod.train(str(store.root), cfg)["precision"] == "bf16-autocast"


def test_the_attention_check_speaks_only_under_bf16_and_of_recorded_pools():
    sdpa, varlen = tiny_lm(), tiny_lm()
    varlen.set_attn_implementation(attention.register())
    with warnings.catch_warnings():
        warnings.simplefilter("error", LogAMismatch)
        for settings, lm, precision in [([{"attention": "sdpa"}], sdpa, "bf16-autocast"),  # the same
                                        ([{"attention": "sdpa"}], varlen, "fp32"),  # kernels agree to ~1e-6
                                        ([{"precision": "bf16-autocast"}], varlen, "bf16-autocast"),  # not recorded
                                        ([{"attention": "varlen"}], varlen, "bf16-autocast")]:
            attention.check_pool(settings, lm, precision, 0)
    with pytest.warns(LogAMismatch, match="round 3: .* computed with sdpa and varlen attention, the trainer runs varlen"):
        attention.check_pool([{"attention": "varlen"}, {"attention": "sdpa"}], varlen, "bf16-autocast", 3)
