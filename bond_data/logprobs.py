"""Sequence log-probabilities of completions under a causal LM: the one place the generator (its
log A), the trainer, online J-BOND and the evaluation turn (prompt ids, completion ids) rows into
log pi(y | x). It lives in bond_data because the transformers backend computes log A with it: one
function on both sides of rho = pi / A.

    log pi(y | x) = sum_t [ z_t[y_t] - logsumexp(z_t) ],   z_t = W h_t   (W: the LM head, [V, H])

computed without the [tokens, vocab] logits or their fp32 log-softmax: the decoder's last hidden
states are taken only at the M positions that predict completion tokens, and the head runs over
them in chunks of `chunk` tokens (a custom autograd Function, as Liger's fused linear
cross-entropy), so the forward keeps nothing of size V but each token's logsumexp, and the backward
recomputes the logits one slice of the vocabulary at a time, [M, slice], and turns them into their
gradient in place (as Cut Cross-Entropy does: each slice's rows of d W are then written once). At a 150k
vocabulary that is the difference between gigabytes and a few hundred megabytes per micro-batch.
Models whose head is not a plain linear layer (other than Gemma-2's final logit soft-capping,
handled here) would need their own head function.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from bond_data import attention
from bond_data import precision as precision_policy
from bond_data.packing import Batch, collate_packed, collate_padded


def collate(rows: list[dict], device: torch.device):
    """Rows {"prompt": ids, "completion": ids} -> right-padded [B, T] input ids and attention mask,
    [B, T-1] labels (the next tokens) and mask (1 on completion positions): the layout of the
    full-logits path (`sequence_logprobs`), kept as the reference."""
    input_ids, attention, mask = precision_policy.right_padded([r["prompt"] for r in rows],
                                                               [r["completion"] for r in rows], device)
    return input_ids, attention, input_ids[:, 1:], mask


HEAD_TF32 = True  # under CUDA autocast, the head's matmuls in TF32 (see _ChunkedLogprobs); benchmarks turn it off


@contextlib.contextmanager
def _head_matmuls(tf32: bool):
    """The head's fp32 matmuls on TF32 tensor cores (`tf32`) or in IEEE fp32; restored after."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


_FUSED_LOGSUMEXP = None


def _logsumexp(fused: bool):
    """torch.logsumexp over the last dimension; `fused`: compiled into one reduction kernel (eager
    logsumexp makes about four passes over each [chunk, V] fp32 chunk). On an H200 the head's
    forward + backward went 61.6 -> 54.6 ms for 10,240 tokens at a 151,936 vocabulary
    (bench/head.py); the trainer uses it with `compile: true`."""
    global _FUSED_LOGSUMEXP
    if not fused:
        return lambda x: torch.logsumexp(x, -1)
    if _FUSED_LOGSUMEXP is None:
        _FUSED_LOGSUMEXP = torch.compile(lambda x: torch.logsumexp(x, -1), dynamic=True)
    return _FUSED_LOGSUMEXP


_FUSED_SOFTMAX = None


def _softmax(fused: bool):
    """(logits [c, V], lse [c]) -> exp(logits - lse), computed in fp32 and returned in the logits'
    dtype (fp32, or bf16 when the backward's matmuls are: `bf16_backward`): the backward's softmax
    from the forward's logsumexp. Eager: two in-place passes over the fp32 chunk (for bf16 logits,
    after a copy to fp32 and before a cast back); `fused`: compiled into one kernel that reads the
    logits and writes the softmax over them, in place. At [512, 151936] per chunk that is about 0.3 GB
    of memory traffic instead of 2.2 GB in bf16, 0.6 GB instead of 1.2 GB in fp32. (On this CPU the
    compiled in-place kernel took 14-38 ms against eager's 45 ms in fp32; an out-of-place one, 86-105
    ms, paid for a fresh 311 MB buffer each time.)"""
    global _FUSED_SOFTMAX
    if not fused:
        return lambda logits, lse: logits.float().sub_(lse[:, None]).exp_().to(logits.dtype)  # fp32: in place
    if _FUSED_SOFTMAX is None:
        _FUSED_SOFTMAX = torch.compile(lambda logits, lse: logits.copy_(torch.exp(logits.float() - lse[:, None])),
                                       dynamic=True)
    return _FUSED_SOFTMAX


def _chunk_logits(hidden, weight, bias, softcap):
    """[c, V] fp32 logits of one chunk (soft-capped as Gemma-2 does when `softcap` is set), called
    with autocast off: the head runs in fp32 under every precision policy (bond_data/precision.py)."""
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    return torch.tanh(logits / softcap) * softcap if softcap else logits


class _ChunkedLogprobs(torch.autograd.Function):
    """log softmax(W h)[target] per row, chunk by chunk. The forward keeps each row's logsumexp
    (lse, [M]); the backward recomputes the logits of one slice of the vocabulary for every row,
    turns them in place into softmax = exp(logits - lse) (no max / sum / divide passes), and takes
    the one-hot part of d logp / d logits = onehot - softmax as a gather / index_add of rows of W and
    h, so one [M, slice] fp32 buffer, as large as a forward chunk's [chunk, V], is the peak (two
    with soft-capping); d h sums over the slices, [M, H], and each slice's rows of d W are written
    once (`_backward_slices`). Per token t with upstream gradient g_t:
        d h_t = g_t (W[y_t] - softmax_t W),   d W = sum_t g_t (onehot_t - softmax_t)^T h_t.

    Called under CUDA autocast (the bf16-autocast policy on a GPU), its matmuls, forward and
    backward, run in TF32: fp32 in and out, inputs rounded to 10 mantissa bits (bf16 keeps 7),
    fp32 accumulation. Measured on an H200 (bench/gpu/), a ~0.5B Qwen2 training step ran 1.70x
    faster than with IEEE fp32 matmuls (the head was most of the step), and the generator's log A,
    computed by this same function, still matched the trainer's log pi to 1.1e-3 nats per
    128-token completion. The fp32 policy, and every CPU, keep IEEE fp32."""

    @staticmethod
    def forward(ctx, hidden, targets, weight, bias, chunk, softcap, fused_lse, bf16_backward):
        out = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(out)
        ctx.tf32 = HEAD_TF32 and hidden.is_cuda and torch.is_autocast_enabled("cuda")
        kind = hidden.device.type
        ctx.bf16 = bf16_backward and torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16
        with torch.autocast(hidden.device.type, enabled=False), _head_matmuls(ctx.tf32):
            _forward_chunks(out, lse, hidden, targets, weight, bias, chunk, softcap, _logsumexp(fused_lse))
        ctx.save_for_backward(hidden, targets, weight, bias, lse)
        ctx.chunk, ctx.softcap, ctx.fused = chunk, softcap, fused_lse
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False), _head_matmuls(ctx.tf32):
            return _backward_slices(ctx, grad_out)


def _forward_chunks(out, lse, hidden, targets, weight, bias, chunk, softcap, logsumexp):
    for s in range(0, hidden.shape[0], chunk):
        logits = _chunk_logits(hidden[s : s + chunk], weight, bias, softcap)  # [c, V]
        lse[s : s + chunk] = logsumexp(logits)
        out[s : s + chunk] = logits.gather(-1, targets[s : s + chunk, None])[:, 0] - lse[s : s + chunk]


def _backward_slices(ctx, grad_out):
    """The gradients, over slices of the vocabulary: the forward saved each token's logsumexp, so the
    softmax of a slice needs only that slice's logits, [M, slice] for all M tokens at once. Each
    slice's rows of d W (and d bias) are then complete, written once, and what sums over the slices
    is d h, [M, H]: at a 151,936 x 896 head and M = 10,240 tokens, 37 MB read and written per slice
    instead of the 544 MB fp32 d W buffer per chunk of tokens. (Slices as many as the forward's
    chunks, so the [M, slice] buffer is as large as its [chunk, V] one.) With `ctx.bf16`
    (`bf16_backward` under bf16 autocast) the three matmuls per slice run on bf16 inputs, as autocast
    runs every other layer's backward, while the softmax (from the forward's fp32 lse) and the sums
    stay fp32; with `ctx.fused` the softmax is one compiled kernel per slice."""
    hidden, targets, weight, bias, lse = ctx.saved_tensors
    need_h, _, need_w, need_b = ctx.needs_input_grad[:4]  # a frozen head (LoRA) gets no [V, H] buffer
    m, vocab = hidden.shape[0], weight.shape[0]
    low = torch.bfloat16 if ctx.bf16 else torch.float32  # the matmuls' input dtype
    h, w, g, y = hidden.float(), weight.float(), grad_out[:, None], targets
    h_mm, w_mm = h.to(low), w.to(low)
    gh = None if ctx.softcap else (g * h).to(low)  # [M, H]: the softmax part of d W is -softmax^T (g h)
    softmax = _softmax(ctx.fused)
    slices = -(-m // ctx.chunk)
    width = -(-vocab // slices)
    softmax_w = torch.zeros_like(h) if need_h else None  # sum over slices of softmax @ W (soft-capped: of d @ W)
    grad_weight = torch.empty_like(w) if need_w else None
    grad_bias = torch.empty_like(bias, dtype=torch.float32) if need_b else None
    for v0 in range(0, vocab, width):
        v1 = min(vocab, v0 + width)
        raw = h_mm @ w_mm[v0:v1].T  # [M, slice], in `low`
        if bias is not None or ctx.softcap:
            raw = raw.float()
        if bias is not None:
            raw.add_(bias[v0:v1].float())
        if ctx.softcap:  # through cap * tanh(z / cap): d = (softmax - onehot) * g * (1 - tanh^2), minus the gradient
            squash = torch.tanh(raw / ctx.softcap)
            d = (squash * ctx.softcap).sub_(lse[:, None]).exp_().mul_(g)
            inside = (y >= v0) & (y < v1)  # tokens whose target falls in this slice: no host sync
            d.scatter_add_(-1, (y - v0).clamp_(0, v1 - v0 - 1)[:, None], -(g * inside[:, None]))
            d.mul_(squash.square_().neg_().add_(1))
        else:  # the softmax; the one-hot part, through rows of W and h, comes after the slices
            d = softmax(raw, lse)  # in raw's dtype
        d_mm = d.to(low)
        if need_h:
            softmax_w.add_(d_mm @ w_mm[v0:v1])
        if need_w:  # d is the softmax (times g, folded in, when soft-capped): this slice's rows, once
            grad_weight[v0:v1] = (d_mm.T @ (h_mm if ctx.softcap else gh)).float().neg_()
        if need_b:
            grad_bias[v0:v1] = d.float().sum(0).neg_() if ctx.softcap else (d.float().T @ g[:, 0]).neg_()
    if not ctx.softcap:  # d logp / d logits = onehot - softmax: the one-hot part
        if need_w:
            grad_weight.index_add_(0, y, g * h)
        if need_b:
            grad_bias.index_add_(0, y, g[:, 0])
    grad_hidden = None
    if need_h:
        grad_hidden = (-softmax_w if ctx.softcap else (w[y] - softmax_w).mul_(g)).to(hidden.dtype)
    cast = lambda grad, like: None if grad is None else grad.to(like.dtype)
    return grad_hidden, None, cast(grad_weight, weight), cast(grad_bias, bias), None, None, None, None


def chunked_token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None = None, chunk: int = 512,
                           softcap: float | None = None, fused_lse: bool = False,
                           bf16_backward: bool = False) -> torch.Tensor:
    """[M] log p(targets) from hidden states [M, H] through the head (weight [V, H]), `chunk` rows at
    a time; with gradient, each chunk recomputed in the backward (nothing [M, V] is ever stored);
    `fused_lse`: the forward's logsumexp and the backward's softmax each compiled into one kernel;
    `bf16_backward`: under bf16 autocast, the backward's matmuls on bf16 inputs (the values stay fp32)."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return _ChunkedLogprobs.apply(hidden, targets, weight, bias, chunk, softcap, fused_lse, bf16_backward)


class SequenceLogprobs(torch.nn.Module):
    """A causal LM as a module whose forward returns [B] completion log-probs of a `Batch`: what
    DDP / FSDP wrap, so their hooks see one forward per micro-batch."""

    def __init__(self, lm, chunk: int = 512, fused_lse: bool = False, bf16_backward: bool = False):
        super().__init__()
        self.lm = lm
        self.chunk = chunk
        self.fused_lse = fused_lse  # the head's logsumexp and backward softmax compiled (the trainer's `compile: true`)
        self.bf16_backward = bf16_backward  # the head's backward matmuls in bf16 (the trainer's `head_backward: bf16`)

    @property
    def varlen(self) -> bool:
        """The model attends through bond_data/attention.py (`attn_implementation: varlen`): packed rows
        then cost their own length, so a micro-batch is best packed into one row."""
        return attention.is_varlen(self.lm)

    def forward(self, input_ids, attention_mask, position_ids, index, targets, row, n_rows: int,
                cu_seqlens=None, longest: int = 0) -> torch.Tensor:
        rows = {}
        if cu_seqlens is not None and self.varlen:  # each packed row attends within itself, no mask built
            rows = dict(cu_seq_lens_q=cu_seqlens, max_length_q=longest)
        with attention.rows_in_kwargs() if rows else contextlib.nullcontext():
            out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        use_cache=False, **rows)
        hidden = out.last_hidden_state.flatten(0, 1)[index]  # [M, H]: only positions predicting completions
        head = self.lm.get_output_embeddings()
        if type(head) is not torch.nn.Linear:  # e.g. LoRA on lm_head: its delta would be skipped
            raise ValueError(f"the chunked log-probs need a plain Linear LM head, not {type(head).__name__} "
                             "(leave lm_head out of --lora targets)")
        softcap = getattr(self.lm.config, "final_logit_softcapping", None)
        token_logp = chunked_token_logprobs(hidden, targets, head.weight, head.bias, self.chunk, softcap,
                                            self.fused_lse, self.bf16_backward)  # [M]
        return token_logp.new_zeros(n_rows).index_add(0, row, token_logp)  # [B]


def batch_logprobs(model: SequenceLogprobs, batch: Batch, device: torch.device, precision: str = "auto") -> torch.Tensor:
    """[B] completion log-probs of a collated batch (model: a SequenceLogprobs, maybe DDP / FSDP-wrapped),
    the body under a bond_data.precision policy (auto: by device), the head in fp32."""
    b = batch.to(device)
    with precision_policy.autocast(precision_policy.resolve(precision, device), device):
        return model(b.input_ids, b.attention_mask, b.position_ids, b.index, b.targets, b.row, b.n_rows, b.cu_seqlens,
                     b.longest)


def completion_logprobs(model, rows: list[dict], device: torch.device, precision: str = "auto",
                        chunk: int = 512, packed: bool = True) -> torch.Tensor:
    """[B] log model(completion | prompt), summed over the completion's tokens (with gradient
    unless called under no_grad / inference_mode), under a bond_data.precision policy (auto: by
    device); rows packed (or, `packed=False`, one right-padded row each), the head chunked and in fp32."""
    wrapped = model if isinstance(model, SequenceLogprobs) else SequenceLogprobs(model, chunk)
    batch = collate_packed(rows, one_row=wrapped.varlen) if packed else collate_padded(rows)
    return batch_logprobs(wrapped, batch, device, precision)


def full_logits_logprobs(model, rows: list[dict], device: torch.device, precision: str = "auto") -> torch.Tensor:
    """[B] the same through the full [B, T, V] logits and their fp32 log-softmax: the reference the
    chunked path is tested and benchmarked against (the trainer's step before issue 12)."""
    input_ids, attention, labels, mask = collate(rows, device)
    with precision_policy.autocast(precision_policy.resolve(precision, device), device):
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]  # [B, T-1, V]
    return sequence_logprobs(logits, labels, mask)  # [B]


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of token log-probs of the completion: logits [B, T, V] predict labels [B, T]; mask [B, T]."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T]
    return (token_logp * mask).sum(-1)  # [B]
