"""The vLLM generation backend (CUDA only; `pip install 'bond-pipeline[vllm]'`).

One request per prompt job with `SamplingParams(n=len(sample_indices), seed=seeds[0])`: vLLM
shares the prompt's KV cache across the n samples. Per-candidate seeds are not expressible with
n > 1, so a candidate is reproducible given its (prompt, first missing index, n): re-running the
same plan reproduces the same rows, which is what resuming needs. Log-probs: `logprobs=0` asks
for the sampled token's log-prob; vLLM reports raw model log-probs (before temperature / top-p,
its default `logprobs_mode`), which is `anchor_logprob` exactly; `sample_logprob` gets the same raw
value, so it equals the sampler's log-prob only at temperature 1 and top_p 1 (the default).

Prompts go in as token ids (`{"prompt_token_ids": ids}`, vLLM's `TokensPrompt`), rendered by the
same `prompt_token_ids` the trainer uses: passing text would let vLLM tokenize it again, adding a
second BOS after a chat template's own, and the trainer would score another context. Log-probs come
from vLLM's kernels in its engine dtype, which no trainer precision reproduces: the lineage records
`precision` as `vllm-<dtype>` (bond_data/precision.py).

Only `to_completions` runs without a GPU (it is tested with stand-in output objects).
"""

from __future__ import annotations

import contextlib
import math

from bond_data.backends.base import Completion, PromptJob, Sampling, prompt_token_ids


def sampling_params(job: PromptJob, sampling: Sampling):
    from vllm import SamplingParams

    return SamplingParams(
        n=len(job.sample_indices), seed=job.seeds[0] % (2**31), temperature=sampling.temperature,
        top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, logprobs=0,
    )


def to_completions(request_output) -> list[Completion]:
    """vLLM RequestOutput -> our Completions (in sample order)."""
    out = []
    for o in sorted(request_output.outputs, key=lambda o: o.index):
        token_ids = list(o.token_ids)
        if o.logprobs is not None:  # one {token_id: Logprob} dict per generated token
            logprob = sum(step[t].logprob for step, t in zip(o.logprobs, token_ids))
        elif o.cumulative_logprob is not None:
            logprob = o.cumulative_logprob
        else:
            raise ValueError("vLLM returned no log-probs: sampling params must set logprobs=0")
        if not math.isfinite(logprob):
            raise ValueError(f"vLLM returned a non-finite log-prob for request {request_output.request_id}")
        finish = "stop" if o.finish_reason == "stop" else "length"
        out.append(Completion(text=o.text, token_ids=token_ids, finish_reason=finish,
                              anchor_logprob=float(logprob), sample_logprob=float(logprob)))
    return out


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_dir: str, llm=None, **engine_args):
        """`llm`: an `LLM` already built (tests pass a stand-in); otherwise one from model_dir and engine_args."""
        if llm is None:
            from vllm import LLM

            llm = LLM(model=model_dir, **engine_args)
        self.llm = llm
        self.tokenizer = self.llm.get_tokenizer()
        self.dtype = str(engine_args.get("dtype", "auto"))
        with contextlib.suppress(AttributeError):  # the dtype "auto" resolved to
            self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def precision(self, sampling: Sampling) -> str:
        return f"vllm-{self.dtype}"

    def render(self, job: PromptJob) -> list[int]:
        """The prompt's ids, as the trainer renders them."""
        return prompt_token_ids(self.tokenizer, job.prompt, job.messages)

    def generate(self, jobs: list[PromptJob], sampling: Sampling) -> list[list[Completion]]:
        prompts = [{"prompt_token_ids": self.render(j)} for j in jobs]  # a TokensPrompt each: not re-tokenized
        params = [sampling_params(j, sampling) for j in jobs]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [to_completions(o) for o in outputs]
