"""fused_logprobs / fused_logprob_loss against a float64 reference, forward and backward, both backends.

The Triton backend runs through Triton's CPU interpreter when there is no GPU (tiny shapes, fp32/fp16:
the interpreter's bf16 arithmetic is wrong); the gpu-marked tests run the same checks on CUDA in bf16.
"""
from __future__ import annotations

import pytest
import torch

from k15sys.ops.logprobs import fused_logprob_loss, fused_logprobs

IGNORE = -100


def reference(hidden, weight, labels, temperature=1.0):
    """float64 log-probs and entropy with plain autograd (materialises [T, V]; small shapes only)."""
    z = (hidden.double() @ weight.double().T) / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0).long()
    lp = torch.where(valid, logp.gather(1, safe[:, None]).squeeze(1), 0.0)
    ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    return lp, ent


def make(T, H, V, dtype, device="cpu", scale=1.0, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(T, H, generator=g) * scale).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < ignore_frac] = IGNORE
    return hidden, weight, labels.to(device)


def _interpreter_or_cuda() -> str:
    if torch.cuda.is_available():
        return "cuda"
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest)")
    return "cpu"


def naive_same_dtype(hidden, weight, labels, temperature, g_lp, g_ent):
    """Plain PyTorch in the input dtype (logits in that dtype, softmax in fp32): the bar for low precision."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    z = (h @ w.T).float() / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = labels != IGNORE
    lp = torch.where(valid, logp.gather(1, torch.where(valid, labels, 0)[:, None].long()).squeeze(1), 0.0)
    ent = torch.where(valid, -(logp.exp() * logp).sum(-1), 0.0)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return lp, ent, h.grad, w.grad


def assert_close_or_2x_naive(ours, naive, ref, tol):
    err = (ours.double() - ref).abs().max().item()
    err_naive = (naive.double() - ref).abs().max().item()
    assert err <= max(tol, 2 * err_naive), (err, err_naive)


def check_against_reference(backend, T, H, V, dtype, temperature, chunk, tol, device="cpu", scale=1.0,
                            vocab_chunk=None):
    hidden, weight, labels = make(T, H, V, dtype, device, scale=scale, seed=T * 7 + V)
    g = torch.Generator().manual_seed(1)
    g_lp = torch.randn(T, generator=g).to(device)
    g_ent = torch.randn(T, generator=g).to(device)

    h1 = hidden.clone().requires_grad_()
    w1 = weight.clone().requires_grad_()
    lp, ent = fused_logprobs(h1, w1, labels, temperature=temperature, return_entropy=True, backend=backend, chunk=chunk,
                             vocab_chunk=vocab_chunk)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()

    h0 = hidden.double().requires_grad_()
    w0 = weight.double().requires_grad_()
    lp0, ent0 = reference(h0, w0, labels, temperature)
    ((lp0 * g_lp.double()).sum() + (ent0 * g_ent.double()).sum()).backward()

    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(lp.double(), lp0, atol=tol, rtol=tol)
        torch.testing.assert_close(ent.double(), ent0, atol=tol, rtol=tol)
        torch.testing.assert_close(h1.grad.double(), h0.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(w1.grad.double(), w0.grad, atol=tol, rtol=tol)
    else:  # low precision: within 2x of plain PyTorch's own error in the same dtype (FlashAttention's bar)
        naive = naive_same_dtype(hidden, weight, labels, temperature, g_lp, g_ent)
        for ours, nv, ref in zip((lp, ent, h1.grad, w1.grad), naive, (lp0, ent0, h0.grad, w0.grad)):
            assert_close_or_2x_naive(ours, nv, ref, tol)
    assert torch.all(lp[labels == IGNORE] == 0)
    # ignored rows get no gradient
    assert torch.all(h1.grad[labels == IGNORE] == 0)

    # the fused loss yields the same gradient in one pass
    h2 = hidden.clone().requires_grad_()
    w2 = weight.clone().requires_grad_()
    loss, lp2, ent2 = fused_logprob_loss(h2, w2, labels, g_lp, g_ent, temperature=temperature, backend=backend, chunk=chunk)
    loss.backward()
    torch.testing.assert_close(loss.double(), (lp.double() * g_lp.double()).sum() + (ent.double() * g_ent.double()).sum(),
                               atol=1e-4 * T, rtol=1e-5)
    torch.testing.assert_close(lp2, lp, atol=tol, rtol=tol)
    if dtype == torch.float32:
        torch.testing.assert_close(h2.grad.double(), h1.grad.double(), atol=tol, rtol=tol)
        torch.testing.assert_close(w2.grad.double(), w1.grad.double(), atol=tol, rtol=tol)
    else:  # the two paths round partial sums differently: each is held to the same bar
        for ours, nv, ref in zip((h2.grad, w2.grad), naive[2:], (h0.grad, w0.grad)):
            assert_close_or_2x_naive(ours, nv, ref, tol)


SHAPES = [  # (T, H, V, chunk, vocab_chunk): T=1, awkward sizes, several row blocks x vocabulary chunks (ragged)
    (1, 24, 1013, None, None),
    (37, 24, 1013, 16, 300),
    (5, 16, 33, 2, 7),
    (9, 8, 5000, 4, None),
]


@pytest.mark.parametrize("T,H,V,chunk,vocab_chunk", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_torch_backend_fp32(T, H, V, chunk, vocab_chunk, temperature):
    check_against_reference("torch", T, H, V, torch.float32, temperature, chunk, tol=2e-5, vocab_chunk=vocab_chunk)


@pytest.mark.parametrize("T,H,V,chunk,vocab_chunk", SHAPES)
def test_triton_interpreter_fp32(T, H, V, chunk, vocab_chunk):
    check_against_reference("triton", T, H, V, torch.float32, 0.7, chunk, tol=2e-5, device=_interpreter_or_cuda(),
                            vocab_chunk=vocab_chunk)


def test_triton_interpreter_fp16_and_large_logits():
    # fp16 inputs; hidden scaled so logits reach ~+-60 (exp would overflow without the max shift)
    check_against_reference("triton", 13, 32, 300, torch.float16, 1.0, 8, tol=1e-3, scale=12.0,
                            device=_interpreter_or_cuda(), vocab_chunk=128)
    check_against_reference("torch", 13, 32, 300, torch.float16, 1.0, 8, tol=1e-3, scale=12.0)


def test_bf16_torch_backend_within_twice_pytorch_error():
    hidden, weight, labels = make(64, 32, 777, torch.bfloat16, seed=3)
    lp0, _ = reference(hidden, weight, labels)
    lp = fused_logprobs(hidden, weight, labels, backend="torch", chunk=16)
    naive = torch.log_softmax((hidden @ weight.T).float(), -1)
    valid = labels != IGNORE
    naive_lp = torch.where(valid, naive.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1), 0.0)
    err = (lp.double() - lp0).abs().max()
    err_naive = (naive_lp.double() - lp0).abs().max()
    assert err <= 2 * err_naive + 1e-6


@pytest.mark.parametrize("T,H,V,dtype,temperature,scale", [
    (1, 24, 1013, torch.float32, 1.0, 1.0),
    (37, 24, 1013, torch.float32, 0.7, 1.0),  # several row blocks and vocabulary splits, H % BLOCK_K != 0
    (20, 40, 70, torch.float32, 1.3, 1.0),  # one split smaller than a tile
    (13, 32, 300, torch.float16, 1.0, 12.0),  # logits up to ~+-60 in fp16
])
def test_fused_stats_kernel_against_float64(T, H, V, dtype, temperature, scale):
    """The fully fused statistics kernel (logit tiles on chip, vocabulary splits merged) vs float64."""
    from k15sys.kernels.fused_logprobs import launch_stats
    from k15sys.ops.logprobs import merge_partials

    dev = _interpreter_or_cuda()
    hidden, weight, labels = make(T, H, V, dtype, dev, scale=scale, seed=T + V)
    part = launch_stats(hidden, weight, labels, inv_temp=1.0 / temperature)
    lse, ent, lp = merge_partials(part, labels, IGNORE)
    # the kernel rounds each logit to the input dtype (as the GEMM of the backward does): so does the reference
    z = (hidden.double() @ weight.double().T).to(dtype).double() / temperature
    lse0 = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    valid = labels != IGNORE
    ent0 = torch.where(valid, lse0 - (p * z).sum(-1), 0.0)
    lp0 = torch.where(valid, z.gather(1, torch.where(valid, labels, 0)[:, None].long()).squeeze(1) - lse0, 0.0)
    tol = 2e-5 if dtype == torch.float32 else 5e-4 * scale
    for ours, ref in ((lse, lse0), (ent, ent0), (lp, lp0)):
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        torch.testing.assert_close(ours.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,scale,tol", [(torch.float32, 1.0, 2e-5), (torch.float16, 12.0, 1e-3)])
def test_buffer_free_forward_with_backward(dtype, scale, tol):
    """chunk=0: forward statistics from the fused kernel, backward chunked; against float64 (and 2x naive)."""
    dev = _interpreter_or_cuda()
    T, H, V, temperature = 37, 24, 1013, 0.7
    hidden, weight, labels = make(T, H, V, dtype, dev, scale=scale, seed=21)
    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(T, generator=g).to(dev), torch.randn(T, generator=g).to(dev)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = fused_logprobs(h1, w1, labels, temperature=temperature, return_entropy=True, backend="triton", chunk=0)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    h0, w0 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp0, ent0 = reference(h0, w0, labels, temperature)
    ((lp0 * g_lp.double()).sum() + (ent0 * g_ent.double()).sum()).backward()
    naive = naive_same_dtype(hidden, weight, labels, temperature, g_lp, g_ent)
    for ours, nv, ref in zip((lp, ent, h1.grad, w1.grad), naive, (lp0, ent0, h0.grad, w0.grad)):
        assert_close_or_2x_naive(ours, nv, ref, tol)
    with pytest.raises(ValueError, match="chunk"):
        fused_logprobs(hidden, weight, labels, backend="torch", chunk=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_of_one_input_only(backend):
    """A frozen LM head (or frozen hidden states): only the other gradient is computed, and it is the same."""
    dev = "cpu" if backend == "torch" else _interpreter_or_cuda()
    hidden, weight, labels = make(11, 16, 400, torch.float32, dev, seed=4)
    grads = {}
    for need in ("both", "hidden", "weight"):
        h = hidden.clone().requires_grad_(need in ("both", "hidden"))
        w = weight.clone().requires_grad_(need in ("both", "weight"))
        lp, ent = fused_logprobs(h, w, labels, return_entropy=True, backend=backend, chunk=4, vocab_chunk=128)
        (lp.sum() - 0.5 * ent.sum()).backward()
        grads[need] = (h.grad, w.grad)
    assert grads["hidden"][1] is None and grads["weight"][0] is None
    torch.testing.assert_close(grads["hidden"][0], grads["both"][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads["weight"][1], grads["both"][1], atol=1e-6, rtol=1e-6)


def test_no_grad_and_empty_inputs():
    dev = _interpreter_or_cuda()
    hidden, weight, labels = make(9, 24, 1013, torch.float32, dev, seed=11)
    lp0, ent0 = reference(hidden, weight, labels, 0.9)
    for backend, chunk in (("triton", None), ("triton", 0), ("torch", None)):
        with torch.no_grad():
            lp, ent = fused_logprobs(hidden, weight, labels, temperature=0.9, return_entropy=True, backend=backend,
                                     chunk=chunk)
        torch.testing.assert_close(lp.double(), lp0, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(ent.double(), ent0, atol=2e-5, rtol=2e-5)
        h = hidden[:0].clone().requires_grad_()
        w = weight.clone().requires_grad_()
        lp, ent = fused_logprobs(h, w, labels[:0], return_entropy=True, backend=backend, chunk=chunk)
        assert lp.shape == ent.shape == (0,)
        (lp.sum() + ent.sum()).backward()
        assert h.grad.shape == (0, 24) and torch.all(w.grad == 0)


def test_bad_input():
    h, w, y = make(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="hidden"):
        fused_logprobs(h[0], w, y)
    with pytest.raises(ValueError, match="weight"):
        fused_logprobs(h, w[:, :4], y)
    with pytest.raises(ValueError, match="labels"):
        fused_logprobs(h, w, y[:3])
    with pytest.raises(ValueError, match="labels"):
        fused_logprobs(h, w, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="weight"):
        fused_logprobs(h, w.double(), y)
    with pytest.raises(ValueError, match="backend"):
        fused_logprobs(h, w, y, backend="cuda")
    with pytest.raises(ValueError, match="vocab_chunk"):
        fused_logprobs(h, w, y, vocab_chunk=0)
    with pytest.raises(ValueError, match="lp_coef"):
        fused_logprob_loss(h, w, y, torch.ones(3))
    with pytest.raises(ValueError, match="lp_coef"):
        fused_logprob_loss(h, w, y, torch.tensor([1.0, float("nan"), 0.0, 0.0]))


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,V", [(1, 64, 1013), (300, 128, 32000), (1029, 256, 5001), (700, 200, 151936)])
def test_gpu_bf16_matches_reference(T, H, V):
    hidden, weight, labels = make(T, H, V, torch.bfloat16, device="cuda", seed=T)
    lp0, ent0 = reference(hidden, weight, labels, 0.8)
    lp, ent = fused_logprobs(hidden, weight, labels, temperature=0.8, return_entropy=True, backend="triton")
    naive = torch.log_softmax((hidden @ weight.T).float() / 0.8, -1)
    valid = labels != IGNORE
    naive_lp = torch.where(valid, naive.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1), 0.0)
    assert (lp.double() - lp0).abs().max() <= 2 * (naive_lp.double() - lp0).abs().max() + 1e-5
    assert (ent.double() - ent0).abs().max() < 5e-2
    lp_free, ent_free = fused_logprobs(hidden, weight, labels, temperature=0.8, return_entropy=True, chunk=0)
    assert (lp_free.double() - lp0).abs().max() <= 2 * (naive_lp.double() - lp0).abs().max() + 1e-5
    assert (ent_free.double() - ent0).abs().max() < 5e-2
    check_against_reference("triton", T, H, V, torch.float32, 0.8, 256, tol=5e-3, device="cuda")


def test_fused_loss_scales_with_upstream_gradient():
    h, w, y = make(6, 8, 50, torch.float32, seed=5)
    coef = torch.randn(6)
    grads = []
    for scale in (1.0, 3.0):
        hh = h.clone().requires_grad_()
        loss, _, _ = fused_logprob_loss(hh, w, y, coef, backend="torch")
        (scale * loss).backward()
        grads.append(hh.grad)
    torch.testing.assert_close(grads[1], 3.0 * grads[0])
