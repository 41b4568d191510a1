"""Variable-length attention for packed rows: each row attends only within itself, with no mask.

Packed rows (bond_data/packing.py) share a sequence; with SDPA transformers builds a block-diagonal
causal mask from the restarting position ids and the kernel computes the whole [width, width]
square, masked blocks included (the cuDNN kernel was 23% of a compiled 0.5B training step on an
H200). With `attn_implementation: varlen` the model's attention goes through this module instead:

- on CUDA in bf16 / fp16, PyTorch's own flash kernel for variable-length sequences
  (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10; forward and backward), which visits only
  each row's causal triangle, so a micro-batch can be packed into one row with no padding at all
  (the trainer does that);
- elsewhere (the CPU, fp32), the same math one row at a time through SDPA (`is_causal`), so the
  option runs and is tested everywhere; the kernel itself runs only on a GPU (`pytest -m gpu`).

The rows are passed as transformers' flash-attention keyword arguments (`cu_seq_lens_q`, the
cumulative row starts over the flattened [P * L] positions, and `max_length_q`, the longest row),
computed once per micro-batch on the CPU by `bond_data.packing.segments` and handed to the decoder by
`bond_data.logprobs.SequenceLogprobs`. While it does, `rows_in_kwargs()` tells the mask function
that no mask is needed. Any other call of the model (generation, a padded batch) gets transformers'
SDPA mask and attention unchanged.

Not supported (a clear error): attention logit soft-capping (Gemma-2), and on torch 2.10, whose
kernel has no window, a sliding window shorter than the longest row.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

NAME = "bond_varlen"  # the transformers attn_implementation registered by `register`
_ROWS_IN_KWARGS = contextvars.ContextVar("bond_varlen_rows", default=False)


@contextlib.contextmanager
def rows_in_kwargs():
    """While the decoder runs with `cu_seq_lens_q` in its keyword arguments: build no attention mask."""
    token = _ROWS_IN_KWARGS.set(True)
    try:
        yield
    finally:
        _ROWS_IN_KWARGS.reset(token)


def _mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    return None if _ROWS_IN_KWARGS.get() else sdpa_mask(*args, **kwargs)


class _Kernel(NamedTuple):
    fn: Callable
    window: bool  # takes window_size (torch >= 2.11); torch 2.10 takes is_causal
    scale: bool
    gqa: bool  # takes enable_gqa (torch >= 2.12)


_KERNEL: _Kernel | None = None  # torch's varlen_attn, found once by `register` (outside any compiled code)
_SDPA: Callable | None = None  # transformers' SDPA attention function, for calls that are not packed batches


def _find_kernel() -> _Kernel | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return kernel_of(varlen_attn)


def kernel_of(fn: Callable) -> _Kernel:
    """What a varlen_attn of this signature takes (2.10: is_causal; 2.11: window_size, scale; 2.12: enable_gqa)."""
    params = inspect.signature(fn).parameters
    return _Kernel(fn, "window_size" in params, "scale" in params, "enable_gqa" in params)


def uses_kernel(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and _KERNEL is not None


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, softcap: float | None = None, cu_seq_lens_q=None,
                     max_length_q: int | None = None, **kwargs):
    """transformers' attention-function contract: query [P, Hq, L, D], key / value [P, Hkv, L, D] ->
    ([P, L, Hq, D], None). Without `cu_seq_lens_q` (not a packed batch): transformers' SDPA."""
    if cu_seq_lens_q is None:
        return _SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap,
                     **kwargs)
    if softcap is not None:
        raise ValueError("attn_implementation varlen: attention logit soft-capping is not supported; use sdpa or eager")
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):  # as autocast casts SDPA's inputs (RoPE leaves q, k in fp32)
        low = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(low) for t in (query, key, value))
    p, hq, length, d = query.shape
    scale = d**-0.5 if scaling is None else scaling
    window = sliding_window if sliding_window is not None and sliding_window < max_length_q else None
    flat = lambda t: t.transpose(1, 2).reshape(p * length, t.shape[1], d)  # [P * L, H, D], rows contiguous
    q, k, v = flat(query), flat(key), flat(value)
    if uses_kernel(query):
        out = _flash_varlen(q, k, v, cu_seq_lens_q, max_length_q, scale, window, dropout)
    else:
        out = _per_row(q, k, v, cu_seq_lens_q, scale, window, dropout)
    return out.reshape(p, length, hq, d), None


def _flash_varlen(q, k, v, cu, longest: int, scale: float, window: int | None, dropout: float):
    """torch.nn.attention.varlen.varlen_attn, causal, across its signatures: 2.10 (`is_causal`, no
    scale, GQA or window), 2.11 (`window_size`, `scale`), 2.12+ (`enable_gqa`)."""
    if dropout:
        raise ValueError("attn_implementation varlen: attention dropout is not supported")
    kw = {}
    if _KERNEL.window:
        kw["window_size"] = (-1 if window is None else window - 1, 0)
    elif window is not None:
        raise ValueError(f"attn_implementation varlen: torch {torch.__version__}'s kernel has no sliding window "
                         f"({window} < the longest row, {longest}); use sdpa")
    else:
        kw["is_causal"] = True
    if _KERNEL.scale:
        kw["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        q = q * (scale / q.shape[-1] ** -0.5)  # the kernel's own scale is 1 / sqrt(D)
    if k.shape[1] != q.shape[1]:
        if _KERNEL.gqa:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    cu = cu.to(device=q.device, dtype=torch.int32)
    return _KERNEL.fn(q, k, v, cu, cu, longest, longest, **kw)


def _per_row(q, k, v, cu, scale: float, window: int | None, dropout: float):
    """The same attention one row at a time through SDPA: the reference, and the path off the GPU."""
    out = []
    bounds = cu.tolist()
    for s, e in itertools.pairwise(bounds):
        rq, rk, rv = (t[s:e].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        mask = None
        if window is not None and e - s > window:  # causal and no more than `window` back, itself included
            i = torch.arange(e - s, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        o = F.scaled_dot_product_attention(rq, rk, rv, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           dropout_p=dropout, enable_gqa=rk.shape[0] != rq.shape[0])
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def check_supported(config) -> None:
    """Refuse, before any training starts, a model whose attention this module cannot compute."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"attn_implementation varlen: {config.model_type}'s attention logit soft-capping is not "
                         "supported; use sdpa or eager")


def register() -> str:
    """Register the attention and its mask function with transformers (idempotent); returns the name
    to pass as `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    global _KERNEL, _SDPA
    if _KERNEL is None:
        _KERNEL = _find_kernel()
    _SDPA = sdpa_attention_forward
    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def transformers_name(name: str | None, folder) -> str | None:
    """The `attn_implementation` to load the model in `folder` with, for a config's value: `varlen`
    checked against the model's config and registered; any other name as it is."""
    if name != "varlen":
        return name
    from transformers import AutoConfig

    check_supported(AutoConfig.from_pretrained(folder))
    return register()


def is_varlen(lm) -> bool:
    return getattr(lm.config, "_attn_implementation", None) == NAME


def kind(lm) -> str:
    """The attention a model runs, as a config names it: `varlen`, or transformers' (e.g. `sdpa`)."""
    return "varlen" if is_varlen(lm) else str(lm.config._attn_implementation)


def check_pool(settings: list[dict], lm, precision: str, round_: int) -> None:
    """Warn (errors.LogAMismatch) when the round's log A was computed with another attention than
    `lm` runs, under bf16 autocast, where kernels round differently: rho at initialisation is then
    off by rounding, not 0 (measured, a tiny Qwen2 on this CPU: up to 2.3e-3 nats per completion,
    varlen against packed SDPA). Under fp32 the kernels agree to ~1e-6: nothing to say. Pools that
    did not record it (before this setting, or vLLM's) are not compared."""
    pool = sorted({s["attention"] for s in settings if s.get("attention")})
    ours = kind(lm)
    if precision != "bf16-autocast" or not pool or pool == [ours]:
        return
    import warnings

    from bond_data.errors import LogAMismatch

    warnings.warn(f"round {round_}: its candidates' log A was computed with {' and '.join(pool)} attention, the "
                  f"trainer runs {ours}; under bf16-autocast log pi/A at initialisation is then off by rounding "
                  f"(up to ~2e-3 nats per completion measured for varlen against sdpa), not exactly 1. Generate the "
                  f"next round with generate.attn_implementation: {ours} (bond rounds sets it from the train section)",
                  LogAMismatch, stacklevel=2)
