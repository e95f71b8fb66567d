"""varlen_attention against a float64 reference, forward and dq/dk/dv (Triton interpreter on the CPU, CUDA on a GPU).

The bar is relative: the error of the Triton kernels (vs float64) may be at most twice the error of the same
attention written in plain PyTorch in the input dtype (FlashAttention's bar), or below a small floor.
"""
from __future__ import annotations

import pytest
import torch

from k15sys.ops.attention import varlen_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# On CUDA every (dtype, head dim, GQA ratio, mask, head count) combination compiles its own kernels (seconds each):
# there the CPU-sized cases below run one combination per code path and the GPU grid at the end covers the rest.
interpreter_only = pytest.mark.skipif(DEV == "cuda", reason="covered on CUDA by the GPU grid (compile time)")


def plain(q, k, v, lens, causal, scale):
    """Attention per sequence in plain PyTorch in the inputs' dtype (matmuls in that dtype, softmax by torch)."""
    outs, s0 = [], 0
    rep = q.shape[1] // k.shape[1]
    for L in lens:
        qs, ks, vs = q[s0:s0 + L], k[s0:s0 + L].repeat_interleave(rep, 1), v[s0:s0 + L].repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vs))
        s0 += L
    return torch.cat(outs)


def reference(q, k, v, lens, causal, scale):
    """The same attention in float64, written out explicitly (no SDPA)."""
    return plain(q.double(), k.double(), v.double(), lens, causal, scale)


def _grads(fn, q, k, v, dtype, do):
    qq, kk, vv = (x.detach().clone().to(dtype).requires_grad_() for x in (q, k, v))
    out = fn(qq, kk, vv)
    (out.double() * do.double()).sum().backward()
    return out, qq.grad, kk.grad, vv.grad


def _rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1.0)).item()  # dq is exactly 0 for T=1


def run_case(lens, HQ, HKV, D, causal, dtype, floor, backend="triton"):
    """Forward and the three gradients: error <= max(floor, 2 x plain PyTorch's error in ``dtype``)."""
    g = torch.Generator().manual_seed(sum(lens) + HQ * 7 + D)
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q, k, v = (torch.randn(T, h, D, generator=g).to(DEV) for h in (HQ, HKV, HKV))
    do = torch.randn(T, HQ, D, generator=g).to(DEV)
    scale = D ** -0.5
    ours = _grads(lambda a, b, c: varlen_attention(a, b, c, cu, max(lens), causal=causal, backend=backend),
                  q, k, v, dtype, do)
    base = _grads(lambda a, b, c: plain(a, b, c, lens, causal, scale), q, k, v, dtype, do)
    want = _grads(lambda a, b, c: reference(a, b, c, lens, causal, scale), q, k, v, torch.float64, do)
    for name, got, bar, ref in zip(("out", "dq", "dk", "dv"), ours, base, want):
        err, err_plain = _rel_err(got, ref), _rel_err(bar, ref)
        assert err <= max(floor, 2 * err_plain), (name, err, err_plain)


@pytest.mark.parametrize("lens", [[1], [1, 1, 3], [17, 40, 5], [70, 2, 9]])
@pytest.mark.parametrize("HQ,HKV", [(2, 2), pytest.param(4, 1, marks=interpreter_only),
                                     pytest.param(8, 1, marks=interpreter_only)])
def test_triton_fp32_matches_float64(lens, HQ, HKV):
    run_case(lens, HQ, HKV, 16, True, torch.float32, 1e-5)


@interpreter_only
@pytest.mark.parametrize("D", [24, 8])
def test_triton_head_dims_off_the_kernel_sizes_are_zero_padded(D):
    run_case([9, 20], 4, 2, D, True, torch.float32, 1e-5)


@pytest.mark.parametrize("causal", [pytest.param(True, marks=interpreter_only), False])  # CUDA: fp32 causal above
def test_triton_noncausal_fp16_and_d64(causal):
    run_case([23, 48], 2, 1, 64, causal, torch.float32, 1e-5)
    if DEV == "cpu":  # fp16 on CUDA: the GPU grid
        run_case([23, 48], 4, 2, 16, causal, torch.float16, 1e-6)


@interpreter_only  # the GPU configs differ in query and key block sizes already (e.g. dK/dV 64 x 128)
@pytest.mark.parametrize("blocks", [(32, 16, 4, 1), (16, 32, 4, 1)])
def test_triton_query_and_key_blocks_differ(blocks, monkeypatch):
    """Query and key blocks of different sizes (as the GPU configs use): diagonal / ragged-end bookkeeping."""
    from k15sys.ops import attention as A

    monkeypatch.setattr(A, "_INTERPRETER_CONFIG", blocks)
    run_case([17, 40, 5, 70], 4, 2, 16, True, torch.float32, 1e-5)
    run_case([33, 9], 2, 1, 16, False, torch.float32, 1e-5)


def test_triton_unaligned_inputs():
    """Inputs starting off a 16-byte boundary (tensor descriptors need one) are copied, not refused."""
    T, H, D = 21, 2, 16
    buf = torch.randn(3 * T * H * D + 1, generator=torch.Generator().manual_seed(0)).to(DEV)
    q, k, v = (buf[1 + i * T * H * D:1 + (i + 1) * T * H * D].view(T, H, D) for i in range(3))
    assert q.data_ptr() % 16 != 0
    cu = torch.tensor([0, 9, 21], dtype=torch.int32, device=DEV)
    out = varlen_attention(q, k, v, cu, 12, backend="triton")
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, 12, backend="torch"), atol=1e-5, rtol=1e-5)
    out.sum().item()  # the device ran both (a CUDA error would surface here)


def test_torch_backend_and_bad_input():
    run_case([5, 9], 4, 2, 16, True, torch.float32, 1e-5, backend="torch")
    q = torch.randn(10, 4, 16, device=DEV)
    k = torch.randn(10, 2, 16, device=DEV)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, k, torch.tensor([0, 4, 9], dtype=torch.int32, device=DEV), 6)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, k, k, cu, 5)
    with pytest.raises(ValueError, match="kv heads"):
        varlen_attention(q, torch.randn(10, 3, 16, device=DEV), torch.randn(10, 3, 16, device=DEV), cu, 6)
    big = [torch.randn(10, h, 160, device=DEV) for h in (4, 2, 2)]
    with pytest.raises(ValueError, match="head dim"):
        varlen_attention(*big, cu, 6, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, k, cu, 6, backend="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[1, 300, 1100, 77], [1024, 1024]])
@pytest.mark.parametrize("dtype,causal,HQ,HKV,D", [
    (torch.bfloat16, True, 16, 16, 128),
    (torch.bfloat16, True, 32, 4, 128),
    (torch.bfloat16, False, 8, 1, 64),
    (torch.float16, True, 12, 4, 80),  # an odd head dim: zero-padded to 128
    (torch.float16, False, 16, 16, 128),
    (torch.float16, True, 8, 1, 64),
])
def test_gpu_low_precision(lens, dtype, causal, HQ, HKV, D):
    """GPU block sizes: bf16 and fp16, both masks, GQA ratios 1/3/8, head dims 128, 64 and 80 (each combination
    compiles its own kernels, so the grid is a covering list rather than the full product)."""
    run_case(lens, HQ, HKV, D, causal, dtype, 1e-6)
