"""The generation backend contract: what the planner asks for and what a backend returns.

The planner (`bond_data.generate`) and every backend import this module; no backend imports the
planner. A backend is anything with a `name` and a `generate(jobs, sampling)` method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    # bond_data.precision: the policy log A is computed under (transformers backend; auto = by device).
    # A shard records the resolved one, so the trainer can follow it.
    precision: str = "auto"
    # the attention the transformers backend's teacher-forced log A pass ran (`varlen` or the model's
    # own, e.g. `sdpa`); recorded by the shard, for the trainer to compare with its own (None: not recorded)
    attention: str | None = None


@dataclass
class PromptJob:
    """One prompt's missing samples: what a backend is asked to produce."""

    prompt_id: str
    prompt: str
    messages: list[dict] | None
    sample_indices: list[int]
    seeds: list[int]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    anchor_logprob: float  # log A(y) under the raw model (temperature 1)
    sample_logprob: float  # log q(y) under the sampler that drew it


def prompt_token_ids(tokenizer, prompt: str, messages: list[dict] | None) -> list[int]:
    """Token ids of a prompt: the chat template for messages, the plain text otherwise. Every backend
    and the trainer call this, so the trainer scores completions after exactly the context they were
    sampled in. Special tokens are added once: by the chat template (its text is tokenized without
    adding any), or by the tokenizer for plain text."""
    if messages is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


class Backend(Protocol):
    name: str

    def precision(self, sampling: Sampling) -> str:
        """The precision policy this backend computes log A under for `sampling` (recorded in the lineage)."""
        ...

    def generate(self, jobs: list[PromptJob], sampling: Sampling) -> list[list[Completion]]:
        """One list of completions per job, in the order of its sample_indices."""
        ...
