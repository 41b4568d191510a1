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


class Backend(Protocol):
    name: str

    def generate(self, jobs: list[PromptJob], sampling: Sampling) -> list[list[Completion]]:
        """One list of completions per job, in the order of its sample_indices."""
        ...
