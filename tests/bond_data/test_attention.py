"""Variable-length attention (`attn_implementation: varlen`): packed rows give the log-probs and
gradients of transformers' SDPA with its block-diagonal mask, in one row with no padding, a row never
sees its neighbour, sliding windows are kept, everything that is not a packed batch (generation,
padded rows) is SDPA unchanged, and the GPU kernel equals the row-by-row reference (`-m gpu`)."""

from __future__ import annotations

import pytest
import torch
from tiny_lms import grads, random_rows, tiny_lm
from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

from bond_data import attention
from bond_data.logprobs import SequenceLogprobs, batch_logprobs, completion_logprobs, full_logits_logprobs
from bond_data.packing import collate_packed, segments

CPU = torch.device("cpu")


def varlen(model):
    model.set_attn_implementation(attention.register())
    return model


def mistral(window: int):
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                            sliding_window=window, attn_implementation="sdpa")).float()


def gemma3(window: int):
    """Gemma 3's text model: a sliding-window layer then a global one, q/k norms, scaled embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=128,
        sliding_window=window, layer_types=["sliding_attention", "full_attention"], attn_implementation="sdpa")).float()


def logprobs_and_grads(model, rows, **kw):
    model.zero_grad(set_to_none=True)
    logp = completion_logprobs(model, rows, CPU, chunk=7, **kw)
    (logp * torch.linspace(-1, 2, len(rows))).sum().backward()  # mixed signs, as the Jeffreys loss
    return logp.detach(), grads(model)


WINDOWED = {"mistral-window": mistral, "gemma3-window": gemma3}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral-window", "gemma3-window"])
def test_varlen_equals_sdpa_with_its_packed_mask_in_one_row(family, monkeypatch):
    """Qwen2 / Llama (grouped-query heads), Mistral with a sliding window shorter than most rows
    (so the window is what differs from plain causal attention), and Gemma 3 (a sliding layer and a
    global one, q/k norms)."""
    model = WINDOWED[family](window=5) if family in WINDOWED else tiny_lm(family)
    rows = random_rows(n=9)
    want, want_grads = logprobs_and_grads(model, rows)  # SDPA, bins of twice the longest row
    calls = []
    spy = attention._per_row
    monkeypatch.setattr(attention, "_per_row", lambda q, *a: calls.append(q.shape) or spy(q, *a))
    got, got_grads = logprobs_and_grads(varlen(model), rows)
    assert calls and all(shape[0] == sum(len(r["prompt"]) + len(r["completion"]) for r in rows) for shape in calls)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for k in want_grads:  # fp32 rounding of the sums, relative to the gradient's scale (Gemma's reach ~4)
        scale = max(1.0, want_grads[k].abs().max().item())
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-4, atol=1e-6 * scale)
    if family in WINDOWED:  # the reference: one row at a time, SDPA with transformers' sliding mask
        torch.testing.assert_close(got, full_logits_logprobs(WINDOWED[family](window=5), rows, CPU), rtol=0, atol=1e-5)


def test_under_bf16_autocast_the_attention_gets_bf16_inputs_as_sdpa_does(monkeypatch):
    """The bf16-autocast policy (a GPU's default): RoPE leaves q and k in fp32, and autocast casts
    SDPA's inputs to bf16 but not those of torch's varlen kernel, which then would not run; the
    attention casts them itself. Log-probs stay within bf16 rounding of SDPA's under the same policy."""
    seen = []
    spy = attention._per_row
    monkeypatch.setattr(attention, "_per_row", lambda q, k, v, *a: seen.append({q.dtype, k.dtype, v.dtype}) or spy(q, k, v, *a))
    rows = random_rows(n=9)
    with torch.no_grad():
        want = completion_logprobs(tiny_lm("qwen2"), rows, CPU, precision="bf16-autocast")
        got = completion_logprobs(varlen(tiny_lm("qwen2")), rows, CPU, precision="bf16-autocast")
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)
    torch.testing.assert_close(got, want, rtol=0, atol=5e-3)  # 9e-4 here; bf16 vs fp32 SDPA: 8e-4


def test_a_row_never_attends_to_its_neighbour_and_padding_tails_are_rows_of_their_own():
    a, b = {"prompt": [5, 6, 7], "completion": [8, 9]}, {"prompt": [10, 11], "completion": [12, 13, 14]}
    a2 = {"prompt": [50, 60, 70], "completion": [80, 90]}
    model = SequenceLogprobs(varlen(tiny_lm()))
    with torch.no_grad():
        lp, lp2 = (batch_logprobs(model, collate_packed(rows, one_row=True), CPU) for rows in ([a, b], [a2, b]))
    assert lp[1] == pytest.approx(float(lp2[1]), abs=1e-6) and abs(float(lp[0] - lp2[0])) > 1e-3
    c = {"prompt": [1], "completion": [2, 3]}
    binned = collate_packed([a, b, c], capacity=7)  # 5 + 5 + 3 tokens in bins of at most 7: one bin has a tail
    assert binned.input_ids.numel() > binned.tokens
    cu, longest = segments(binned.position_ids)
    starts = (binned.position_ids.reshape(-1) == 0).nonzero().reshape(-1).tolist()
    assert cu.tolist() == starts + [binned.input_ids.numel()] and len(starts) == 4 and cu.dtype == torch.int32
    assert longest == 5 == binned.longest and torch.equal(binned.cu_seqlens, cu)


def test_the_trainer_packs_a_micro_batch_into_one_row_without_padding():
    from trainer.step import train_step

    rows = [{**r, "weight": 1.0, "weight_pool": 1.0, "logp_anchor": -30.0} for r in random_rows(n=8)]
    sdpa = train_step(tiny_lm(), [rows], 0.5, 0.05, len(rows), 1, CPU)
    one = train_step(varlen(tiny_lm()), [rows], 0.5, 0.05, len(rows), 1, CPU)
    assert one["padding"] == 0 < sdpa["padding"] and one["positions"] == one["tokens"] == sdpa["tokens"]
    assert one["loss"] == pytest.approx(sdpa["loss"], abs=1e-5)


def test_generation_and_padded_batches_are_sdpa_unchanged():
    model = tiny_lm("qwen2")
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(**kw)
    with torch.no_grad():
        want_logits = model(input_ids=ids, attention_mask=mask).logits
    varlen(model)
    assert torch.equal(model.generate(**kw), want)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want_logits, rtol=0, atol=0)
    rows = random_rows(n=5)
    torch.testing.assert_close(completion_logprobs(model, rows, CPU, packed=False),
                               completion_logprobs(tiny_lm("qwen2"), rows, CPU, packed=False), rtol=0, atol=0)


def test_attention_soft_capping_is_refused_with_a_clear_error():
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           attn_implementation="eager"))
    with pytest.raises(ValueError, match="soft-capping is not supported; use sdpa or eager"):
        completion_logprobs(varlen(gemma), random_rows(n=2), CPU)


def test_the_trainer_refuses_a_soft_capped_model_before_loading_it(tmp_path):
    from trainer.checkpoints import load_policy

    Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gemma2's attention logit soft-capping is not supported"):
        load_policy(tmp_path, CPU, "varlen")  # only a config.json there: refused before weights or tokenizer


def _flash_semantics(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
    """torch's varlen_attn as documented (flash-attention conventions), written out on the CPU: key j
    is visible from query i when i - left <= j <= i + right (-1: unbounded); is_causal is right = 0;
    the scale defaults to 1 / sqrt(D); fewer key heads only with enable_gqa."""
    assert k.shape[1] == q.shape[1] or kw.get("enable_gqa")
    left, right = kw.get("window_size", (-1, 0 if kw.get("is_causal") else -1))
    scale = kw.get("scale") or q.shape[-1] ** -0.5
    out = []
    for s, e in zip(cu_q.tolist()[:-1], cu_q.tolist()[1:]):
        qi, ki, vi = q[s:e], k[s:e].repeat_interleave(q.shape[1] // k.shape[1], 1), v[s:e].repeat_interleave(
            q.shape[1] // v.shape[1], 1)
        scores = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        offset = torch.arange(e - s)[None, :] - torch.arange(e - s)[:, None]  # key - query
        seen = torch.ones_like(offset, dtype=torch.bool)
        if right >= 0:
            seen &= offset <= right
        if left >= 0:
            seen &= offset >= -left
        out.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~seen, float("-inf")).softmax(-1), vi))
    return torch.cat(out)


def _v210(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _flash_semantics(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)


def _v211(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    return _flash_semantics(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)


def _v212(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
          enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    return _flash_semantics(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
                            enable_gqa=enable_gqa)


@pytest.mark.parametrize("signature", [_v210, _v211, _v212], ids=["torch-2.10", "torch-2.11", "torch-2.12"])
@pytest.mark.parametrize("window", [None, 6])
def test_each_kernel_signature_gets_the_causal_window_scale_and_heads_right(signature, window, monkeypatch):
    """The call into torch's kernel, against each of its signatures so far (their documented meaning,
    written out above): causal, the sliding window as transformers means it, a non-default scale and
    grouped-query heads give the row-by-row reference. torch 2.10's kernel has no window: refused."""
    monkeypatch.setattr(attention, "_KERNEL", attention.kernel_of(signature))
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 7, 20, 21, 40], dtype=torch.int32)
    q, k, v = (torch.randn(40, h, 16, generator=g) for h in (4, 2, 2))
    want = attention._per_row(q, k, v, cu, 0.1, window, 0.0)
    if window is not None and signature is _v210:
        with pytest.raises(ValueError, match="has no sliding window"):
            attention._flash_varlen(q, k, v, cu, 19, 0.1, window, 0.0)
        return
    torch.testing.assert_close(attention._flash_varlen(q, k, v, cu, 19, 0.1, window, 0.0), want, rtol=0, atol=1e-5)


def test_the_kernel_path_trains_end_to_end_with_a_stand_in_kernel(monkeypatch):
    """The GPU path rehearsed on the CPU: a stand-in for torch's kernel that insists on what the real
    one needs (one half-precision dtype for q, k, v, [T, H, D] contiguous, int32 row starts on their
    device, an int longest row) takes the trainer's bf16-autocast step through its wrapping (packing
    into one row, the decoder's keyword arguments, each layer, the backward), once per layer, and
    gives SDPA's loss within bf16 rounding."""
    from trainer.step import train_step

    calls = []

    def strict(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
               enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and all(t.is_contiguous() for t in (q, k, v))
        assert cu_seq_q.dtype == torch.int32 and cu_seq_q.device == q.device and isinstance(max_q, int)
        calls.append(q.shape)
        return _flash_semantics(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
                                enable_gqa=enable_gqa)

    monkeypatch.setattr(attention, "_KERNEL", attention.kernel_of(strict))
    monkeypatch.setattr(attention, "uses_kernel", lambda q: True)
    rows = [{**r, "weight": 1.0, "weight_pool": 1.0, "logp_anchor": -30.0} for r in random_rows(n=8)]
    want = train_step(tiny_lm("qwen2"), [rows], 0.5, 0.05, len(rows), 1, CPU, precision="bf16-autocast")
    got = train_step(varlen(tiny_lm("qwen2")), [rows], 0.5, 0.05, len(rows), 1, CPU, precision="bf16-autocast")
    tokens = sum(len(r["prompt"]) + len(r["completion"]) for r in rows)
    assert calls == [torch.Size([tokens, 4, 8])] * 2  # one packed row, each of the 2 layers once
    assert got["padding"] == 0 and got["loss"] == pytest.approx(want["loss"], rel=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [None, 6])
def test_the_flash_kernel_equals_the_row_by_row_reference_on_a_gpu(window):
    """torch's varlen flash kernel (bf16) against SDPA one row at a time on the same bf16 inputs in
    fp32: outputs and input gradients, grouped-query heads, a non-default scale, with and without a window."""
    attention.register()  # finds the kernel
    g = torch.Generator("cuda").manual_seed(0)
    cu = torch.tensor([0, 7, 20, 21, 40], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(40, h, 64, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (8, 2, 2))
    out = attention._flash_varlen(q, k, v, cu, 19, 0.1, window, 0.0)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention._per_row(*ref_in, cu.cpu(), 0.1, window, 0.0)
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # bf16 rounds to ~0.4% per value
    assert rel(out, ref) < 1e-2
    grad = torch.randn(out.shape, generator=g, device="cuda")
    out.backward(grad.bfloat16())
    ref.backward(grad)
    for t, r in zip((q, k, v), ref_in):
        assert rel(t.grad, r.grad) < 2e-2
