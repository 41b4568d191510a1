"""Completion log-probs: the chunked head and the packed layout equal the full-logits reference
(fp32, CPU, 1e-4), gradients included; packing never lets a row see its neighbour."""

from __future__ import annotations

import pytest
import torch
from tiny_lms import grads, random_rows, tiny_lm

from bond_data import logprobs
from bond_data.logprobs import (SequenceLogprobs, batch_logprobs, chunked_token_logprobs, completion_logprobs,
                                full_logits_logprobs)
from bond_data.packing import collate_packed, collate_padded, pack_bins

CPU = torch.device("cpu")


@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen2", False)])
def test_chunked_packed_logprobs_and_gradients_equal_the_full_logits_reference(family, tie):
    model, rows = tiny_lm(family, tie=tie), random_rows()
    ref = full_logits_logprobs(model, rows, CPU)
    (ref * torch.linspace(-1, 2, len(rows))).sum().backward()  # a loss mixing signs, as Jeffreys does
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)
    got = completion_logprobs(model, rows, CPU, chunk=5)  # chunks smaller than a row, spanning rows
    (got * torch.linspace(-1, 2, len(rows))).sum().backward()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    got_grads = grads(model)
    assert got_grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(got_grads[k], ref_grads[k], rtol=1e-4, atol=1e-5)


def test_padded_and_packed_layouts_agree_and_packing_cuts_padding():
    model, rows = tiny_lm(), random_rows(n=32, seed=3)
    wrapped = SequenceLogprobs(model, chunk=64)
    with torch.no_grad():
        padded = batch_logprobs(wrapped, collate_padded(rows), CPU)
        packed = batch_logprobs(wrapped, collate_packed(rows), CPU)
        alone = torch.stack([full_logits_logprobs(model, [r], CPU)[0] for r in rows])  # one row per forward
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-4)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-4)
    assert collate_packed(rows).padding_fraction < 0.1 < collate_padded(rows).padding_fraction


def test_a_packed_row_never_attends_to_its_neighbour():
    """Changing row A's tokens leaves row B's log-prob unchanged when both share a packed row."""
    model = tiny_lm()
    a, b = {"prompt": [5, 6, 7], "completion": [8, 9]}, {"prompt": [10, 11], "completion": [12, 13, 14]}
    a2 = {"prompt": [50, 60, 70], "completion": [80, 90]}
    batch, batch2 = collate_packed([a, b], capacity=16), collate_packed([a2, b], capacity=16)
    assert batch.input_ids.shape[0] == 1  # one packed row holds both
    with torch.no_grad():
        wrapped = SequenceLogprobs(model)
        lp, lp2 = batch_logprobs(wrapped, batch, CPU), batch_logprobs(wrapped, batch2, CPU)
    assert lp[1] == pytest.approx(float(lp2[1]), abs=1e-5) and abs(float(lp[0] - lp2[0])) > 1e-3


def test_pack_bins_is_a_partition_within_capacity():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 50, (200,), generator=g).tolist()
    bins = pack_bins(lengths, 60)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 60 for b in bins)
    assert len(bins) <= 2 * sum(lengths) / 60 + 1  # first-fit: every bin but one is over half full
    assert pack_bins([70, 10], 60) == [[0], [1]]  # an over-long item gets a bin of its own


def test_chunked_token_logprobs_and_gradients_match_log_softmax_with_bias_and_softcap():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(13, 8, generator=g), torch.randn(50, 8, generator=g)
    bias, targets = torch.randn(50, generator=g), torch.randint(0, 50, (13,), generator=g)
    coef = torch.randn(13, generator=g)  # d loss / d logp, of both signs
    for softcap in (None, 3.0):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        logits = leaves[0] @ leaves[1].T + leaves[2]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        want = torch.log_softmax(logits, -1)[torch.arange(13), targets]
        want_grads = torch.autograd.grad((want * coef).sum(), leaves)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        got = chunked_token_logprobs(leaves[0], targets, leaves[1], leaves[2], chunk=4, softcap=softcap)
        got_grads = torch.autograd.grad((got * coef).sum(), leaves)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bf16_backward", [False, True])
def test_the_compiled_head_passes_give_the_same_logprobs_and_gradients(bf16_backward):
    """fused_lse (the trainer's compile: true): the forward's logsumexp and the backward's softmax
    compiled, against eager, chunks of uneven size included (13 rows in chunks of 4), with and without
    soft-capping and a bias; with bf16_backward (under bf16 autocast) the fused softmax comes out in
    bf16 directly, where eager rounds its fp32 softmax: the same to bf16 rounding."""
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(13, 8, generator=g), torch.randn(50, 8, generator=g)
    bias = torch.randn(50, generator=g)
    targets, coef = torch.randint(0, 50, (13,), generator=g), torch.randn(13, generator=g)
    tol = 1e-3 if bf16_backward else 1e-6  # measured: 0 (the same bf16 values here) and 1e-7
    for softcap, with_bias in ((None, False), (3.0, False), (None, True)):
        got = []
        for fused in (False, True):
            leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_backward):
                logp = chunked_token_logprobs(leaves[0], targets, leaves[1], leaves[2] if with_bias else None, chunk=4,
                                              softcap=softcap, fused_lse=fused, bf16_backward=bf16_backward)
            grads = torch.autograd.grad((logp * coef).sum(), leaves if with_bias else leaves[:2])
            got.append((logp.detach(), grads))
        torch.testing.assert_close(got[1][0], got[0][0], rtol=0, atol=1e-5)
        for a, b in zip(got[1][1], got[0][1]):
            assert float((a - b).norm() / b.norm()) < tol
    assert logprobs._FUSED_SOFTMAX is not None  # the backward went through the compiled softmax


def test_a_frozen_head_gets_no_gradient_and_the_rest_the_same():
    """LoRA-style: the LM head frozen, the hidden states still get their exact gradient."""
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(9, 8, generator=g, requires_grad=True), torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (9,), generator=g)
    got = torch.autograd.grad(chunked_token_logprobs(hidden, targets, weight, chunk=4).sum(), hidden)[0]
    want = torch.autograd.grad(torch.log_softmax(hidden @ weight.T, -1)[torch.arange(9), targets].sum(), hidden)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_the_bf16_backward_keeps_the_values_and_gives_bf16_close_gradients(softcap):
    """bf16_backward (the trainer's head_backward: bf16) under bf16 autocast: the forward's log-probs
    are the fp32 ones bit for bit; the gradients are within bf16 rounding of the exact ones (float64
    log_softmax autograd), and not the fp32 path's (the bf16 matmuls ran); without autocast the
    option changes nothing."""
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(37, 64, generator=g), torch.randn(500, 64, generator=g) / 8
    bias, targets = torch.randn(500, generator=g), torch.randint(0, 500, (37,), generator=g)
    coef = torch.randn(37, generator=g)
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].T + leaves[2]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    exact = torch.autograd.grad((torch.log_softmax(logits, -1)[torch.arange(37), targets] * coef).sum(), leaves)

    def run(bf16_backward: bool, autocast: bool):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logp = chunked_token_logprobs(leaves[0], targets, leaves[1], leaves[2], chunk=16, softcap=softcap,
                                          bf16_backward=bf16_backward)
        return logp.detach(), torch.autograd.grad((logp * coef).sum(), leaves)

    def rel(got, want):
        return float((got.double() - want).norm() / want.norm())

    (fp32_values, fp32_grads), (values, grads_) = run(False, True), run(True, True)
    assert torch.equal(values, fp32_values)
    for got, ref, want in zip(grads_, fp32_grads, exact):
        assert rel(ref, want) < 1e-5 and 1e-5 < rel(got, want) < 2e-2
    plain, plain_bf16 = run(False, False), run(True, False)
    assert all(torch.equal(a, b) for a, b in zip(plain[1], plain_bf16[1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused,bf16_backward", [(False, False), (True, False), (True, True)])
def test_the_head_on_a_gpu_against_float64(fused, bf16_backward):
    """The chunked head on CUDA under bf16 autocast (TF32 matmuls; the backward over vocabulary
    slices, compiled softmax, bf16 matmuls): log-probs and gradients against float64 autograd, at a
    real vocabulary (151,936) and enough tokens for several slices."""
    g = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(1500, 256, generator=g, device="cuda")
    weight = torch.randn(151936, 256, generator=g, device="cuda") / 16
    targets = torch.randint(0, 151936, (1500,), generator=g, device="cuda")
    coef = torch.randn(1500, generator=g, device="cuda")
    leaves = [t.double().requires_grad_() for t in (hidden, weight)]
    want = torch.log_softmax(leaves[0] @ leaves[1].T, -1)[torch.arange(1500, device="cuda"), targets]
    want_grads = torch.autograd.grad((want * coef).sum(), leaves)
    got_leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = chunked_token_logprobs(got_leaves[0], targets, got_leaves[1], chunk=512, fused_lse=fused,
                                     bf16_backward=bf16_backward)
    got_grads = torch.autograd.grad((got * coef).sum(), got_leaves)
    assert float((got.detach().double() - want.detach()).abs().max()) < 5e-2  # TF32 logits: 10-bit inputs
    for a, b in zip(got_grads, want_grads):
        assert float((a.double() - b).norm() / b.norm()) < (2e-2 if bf16_backward else 5e-3)
