"""The transformers generation backend: batched across prompts and samples, one seed per candidate.

Rows are (prompt, sample) pairs sorted by prompt length and cut into micro-batches of
`batch_size`, left-padded, and decoded with `model.generate` (KV cache). Sampling is done by
`SeededGumbelSampler` inside greedy decoding, so each row draws its noise from its own seed.

A completion ends at the first of the tokenizer's EOS and the checkpoint's generation-config EOS
ids (chat models end a turn with their own token: `<end_of_turn>`, `<|eot_id|>`, `<|end|>`).

`decoding` picks transformers' KV-cache path: `dynamic` (the default; grows per step), `static`
(preallocated to prompt + max_new_tokens, fixed shapes) or `static-compiled` (static plus
transformers' automatic `torch.compile` of the decoding step, CUDA only: the fastest path for many
rows on a GPU, `bench/gpu_generate.py`). Every path samples the same tokens: the noise is a function
of (seed, step, token) only.

Precision (`bond_data.precision`): fp32 weights, as the trainer's; under `bf16-autocast` decoding
runs in one autocast region under `no_grad` (its cache casts each weight to bf16 once per batch, not
per step; under `inference_mode` it caches nothing, and every step cast every weight again) and
log A is then recomputed by one teacher-forced pass shaped like the trainer's, so that the trainer's
log pi equals it at initialisation; under `fp32` the decode's own log-probs already agree. A
backend loaded for one policy (`from_pretrained(precision=...)`, as the generate stage loads it)
holds, under `bf16-autocast`, its body's linear layers in bf16 (`precision.bf16_body`): the same
tokens and log A bit for bit, with 1.5x-1.9x less weight memory than fp32 weights, and no casts.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

from bond_data import attention
from bond_data import precision as precision_policy
from bond_data.backends.base import Completion, PromptJob, Sampling, prompt_token_ids  # the trainer imports the last here
from bond_data.device import resolve_device
from bond_data.logprobs import completion_logprobs

DECODINGS = ("dynamic", "static", "static-compiled")
_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """A Python int reduced modulo 2^64 as torch's signed int64 (tensor arithmetic wraps the same way)."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_TOKEN_STRIDE = _signed(0xD1B54A32D192ED03)  # odd, so distinct tokens get distinct counters


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s).bitwise_and_((1 << (64 - s)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser of x + golden, in place on a fresh `x` (it is [B, V] each step: fewer
    temporaries than the textbook form, the same bits)."""
    x.add_(_GOLDEN)
    x.bitwise_xor_(_shr(x, 30)).mul_(_MIX1)
    x.bitwise_xor_(_shr(x, 27)).mul_(_MIX2)
    return x.bitwise_xor_(_shr(x, 31))


def seeded_uniform(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1), a pure function of (seed, step, token): counter-based, batch-free."""
    base = _splitmix64(seeds.to(torch.int64) + _signed(step * _GOLDEN))  # [B]
    tokens = torch.arange(vocab, device=seeds.device, dtype=torch.int64).mul_(_TOKEN_STRIDE)
    bits = _splitmix64(base[:, None] + tokens[None, :])  # [B, V]
    return _shr(bits, 11).to(torch.float64).add_(0.5).div_(float(1 << 53))


def seeded_gumbel(seeds: torch.Tensor, step: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, V] Gumbel noise -log(-log u) of `seeded_uniform`, computed in float64, returned in `dtype`."""
    u = seeded_uniform(seeds, step, vocab)
    return u.log_().neg_().log_().neg_().to(dtype)


class SeededGumbelSampler(LogitsProcessor):
    """Turns greedy decoding into per-row seeded sampling and records per-token log-probs.

    Called once per step with the raw logits; returns log q + Gumbel noise, where q is the
    temperature / top-p distribution, so the greedy argmax is a sample from q. The token chosen
    at step t is read back from `input_ids` at step t + 1 (and by `finish` for the last step).
    """

    def __init__(self, seeds: list[int], sampling: Sampling, prompt_len: int):
        self.seeds = torch.tensor(seeds, dtype=torch.int64)
        self.sampling = sampling
        self.prompt_len = prompt_len
        self.anchor_logp: list[torch.Tensor] = []  # per step, [B]
        self.sample_logp: list[torch.Tensor] = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def _record(self, chosen: torch.Tensor) -> None:
        if self._last is not None:
            logp, logq = self._last
            self.anchor_logp.append(logp.gather(1, chosen[:, None]).squeeze(1))
            self.sample_logp.append(logq.gather(1, chosen[:, None]).squeeze(1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        self._record(input_ids[:, -1])
        logits = scores.float()  # [B, V]
        logp = torch.log_softmax(logits, dim=-1)
        logq = logp  # the anchor itself (temperature 1, top_p 1): one log-softmax, not two
        if self.sampling.temperature != 1.0:
            logq = torch.log_softmax(logits / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1.0:
            logq = _top_p_renormalised(logq, self.sampling.top_p)
        self._last = (logp, logq)
        gumbel = seeded_gumbel(self.seeds.to(scores.device), step, scores.shape[-1], logq.dtype)
        return gumbel.add_(logq)  # -inf outside the nucleus stays -inf

    def finish(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] per-token log-probs under the anchor and the sampler."""
        self._record(last_tokens)
        return torch.stack(self.anchor_logp, 1), torch.stack(self.sample_logp, 1)


def _top_p_renormalised(logq: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches top_p (the top token always), renormalised."""
    sorted_logq, order = logq.sort(dim=-1, descending=True)
    mass_before = sorted_logq.exp().cumsum(-1) - sorted_logq.exp()
    drop_sorted = mass_before >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return torch.log_softmax(logq.masked_fill(drop, float("-inf")), dim=-1)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS, then every EOS id of the checkpoint's generation config, once each."""
    listed = getattr(model.generation_config, "eos_token_id", None)
    listed = listed if isinstance(listed, list) else [listed]
    return list(dict.fromkeys(t for t in [tokenizer.eos_token_id, *listed] if t is not None))


def check_decoding(model, device: torch.device, decoding: str) -> dict:
    """The GenerationConfig keywords of a decoding path, or ValueError (one line) where it cannot run."""
    if decoding not in DECODINGS:
        raise ValueError(f"decoding {decoding!r}: use one of {', '.join(DECODINGS)}")
    if decoding == "dynamic":
        return {}
    if not model._supports_default_dynamic_cache():
        raise ValueError(f"decoding {decoding}: {type(model).__name__} has no transformers KV cache; use dynamic")
    if decoding == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    if device.type != "cuda":
        raise ValueError(f"decoding static-compiled needs a CUDA device (got {device.type}); use static or dynamic")
    if not getattr(model, "_can_compile_fullgraph", False):
        raise ValueError(f"decoding static-compiled: {type(model).__name__} cannot be compiled whole; use static")
    return {"cache_implementation": "static"}  # generate() compiles the decoding step itself on CUDA


class TransformersBackend:
    """Seeded, batched sampling from a causal LM in memory (`from_pretrained` loads a folder)."""

    name = "transformers"
    packed_log_a = True  # the teacher-forced log A pass: rows packed as the trainer packs them (False: right-padded)

    def __init__(self, model, tokenizer, device: torch.device, batch_size: int = 64, decoding: str = "dynamic",
                 policy: str | None = None):
        """`policy`: the one precision policy `model`'s weights are held for (`bf16-autocast` after
        `precision.bf16_body`); None: fp32 weights, any policy."""
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size
        self.policy = policy
        precision_policy.fp32_head(self.model)  # logits in fp32 under any policy (a no-op in fp32)
        self.cache = check_decoding(model, device, decoding)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = stop_token_ids(model, tokenizer)
        # Sampling is ours (SeededGumbelSampler): drop the checkpoint's sampling defaults, which
        # generate() would otherwise merge into our greedy config. A caller that saves the model
        # later restores its own (trainer.online does).
        self.model.generation_config = GenerationConfig(eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)

    @classmethod
    def from_pretrained(cls, model_dir: str, batch_size: int = 64, device: str | None = None,
                        decoding: str = "dynamic", attn_implementation: str | None = None,
                        precision: str | None = None, tokenizer=None) -> TransformersBackend:
        """`attn_implementation` as the trainer's (`varlen`: the teacher-forced log A pass attends as the
        trainer does, one row per batch; decoding stays on SDPA). `precision` (a policy, or auto): the
        one policy this backend will generate under, its weights held for it (bf16 linear layers
        under `bf16-autocast`, cast before they reach the device); None: fp32 weights, any policy.
        `tokenizer`: instead of the folder's AutoTokenizer."""
        dev = resolve_device(device)
        # fp32 weights, as the trainer's (bf16-autocast casts in matmuls), unless cast as autocast would
        attn = attention.transformers_name(attn_implementation, model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
        policy = None if precision is None else precision_policy.resolve(precision, dev)
        if policy == "bf16-autocast":
            precision_policy.bf16_body(model)
        model = model.to(dev).eval()
        return cls(model, tokenizer or AutoTokenizer.from_pretrained(model_dir), dev, batch_size, decoding, policy)

    def precision(self, sampling: Sampling) -> str:
        """The policy `sampling` generates under here; ValueError for another than the weights are held for."""
        policy = precision_policy.resolve(sampling.precision, self.device)
        if self.policy not in (None, policy):
            raise ValueError(f"this generator holds its weights for precision {self.policy!r}, not {policy!r}: "
                             f"load it with precision={policy!r}")
        return policy

    @property
    def attention(self) -> str:
        """The attention of the teacher-forced log A pass: `varlen` or the model's own (e.g. `sdpa`)."""
        return attention.kind(self.model)

    def render(self, job: PromptJob) -> list[int]:
        return prompt_token_ids(self.tokenizer, job.prompt, job.messages)

    def generate(self, jobs: list[PromptJob], sampling: Sampling) -> list[list[Completion]]:
        rows = []  # (job index, position in job, prompt ids, seed)
        for j, job in enumerate(jobs):
            ids = self.render(job)
            rows += [(j, s, ids, seed) for s, seed in enumerate(job.seeds)]
        rows.sort(key=lambda r: len(r[2]))  # similar lengths share a batch: less padding
        out: list[list[Completion | None]] = [[None] * len(job.seeds) for job in jobs]
        policy = self.precision(sampling)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            with precision_policy.autocast(policy, self.device):
                completions = self._generate_batch(batch, sampling)
                if policy != "fp32":
                    completions = self._teacher_forced(batch, completions, sampling)
            for (j, s, _, _), completion in zip(batch, completions):
                out[j][s] = completion
        return out  # type: ignore[return-value]

    @torch.no_grad()  # not inference_mode: under it autocast casts every fp32 weight again at every step
    def _generate_batch(self, batch: list[tuple], sampling: Sampling) -> list[Completion]:
        enc = self.tokenizer.pad({"input_ids": [r[2] for r in batch]}, return_tensors="pt").to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        sampler = SeededGumbelSampler([r[3] for r in batch], sampling, prompt_len)
        config = GenerationConfig(
            do_sample=False, max_new_tokens=sampling.max_new_tokens, num_beams=1,
            eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id, **self.cache,
        )
        if self.cache:  # a static cache sized in steps of 128: later batches reuse it (and its compiled graph)
            config.max_cache_len = -(-(prompt_len + sampling.max_new_tokens) // 128) * 128
        seqs = self.model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList([sampler]))
        new = seqs[:, prompt_len:]  # [B, T]
        anchor_logp, sample_logp = sampler.finish(new[:, -1])
        return [self._completion(new[b], anchor_logp[b], sample_logp[b]) for b in range(len(batch))]

    @torch.no_grad()
    def _teacher_forced(self, batch: list[tuple], completions: list[Completion], sampling: Sampling) -> list[Completion]:
        """log A of each completion from one teacher-forced pass over prompt + completion, by the
        trainer's own function (bond_data/logprobs.py: the LM head in fp32 and in chunks at completion
        positions only, so no [rows, tokens, vocab] logits), instead of summed over KV-cache decode
        steps, which round differently in bf16. Rows packed as the trainer packs a micro-batch (its
        bins hold other rows, so bf16 still rounds a little differently): on an H200, 128-token
        completions of a ~0.5B Qwen2 at initialisation gave max |log pi - log A| 8.5e-4 nats packed
        against 0.11 right-padded (other attention kernels; bench/gpu_precision.py, bench/gpu/).
        `sample_logprob` follows it when the sampler is the anchor (temperature 1, top_p 1); a
        tempered sampler's stays the decode's."""
        rows = [{"prompt": r[2], "completion": c.token_ids} for r, c in zip(batch, completions)]
        logp = completion_logprobs(self.model, rows, self.device, self.precision(sampling), packed=self.packed_log_a)  # [B]
        logp = logp.double().tolist()
        untempered = sampling.temperature == 1.0 and sampling.top_p == 1.0
        return [dataclasses.replace(c, anchor_logprob=lp, sample_logprob=lp if untempered else c.sample_logprob)
                for c, lp in zip(completions, logp)]

    def _completion(self, tokens: torch.Tensor, anchor_logp: torch.Tensor, sample_logp: torch.Tensor) -> Completion:
        """Cut after the first stop token (generate pads finished rows) and sum the kept log-probs."""
        ids = tokens.tolist()
        stop = next((i + 1 for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        kept = ids[:stop]
        finish = "stop" if kept and kept[-1] in self.stop_ids else "length"
        text_ids = kept[:-1] if finish == "stop" else kept
        return Completion(
            text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
            token_ids=kept,
            finish_reason=finish,
            anchor_logprob=float(anchor_logp[:stop].double().sum()),
            sample_logprob=float(sample_logp[:stop].double().sum()),
        )
