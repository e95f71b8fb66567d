"""varlen_attention against a float64 reference, forward and dq/dk/dv (Triton interpreter on the CPU)."""
from __future__ import annotations

import pytest
import torch

from k15sys.ops.attention import varlen_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k, v, lens, causal, scale):
    """Per-sequence float64 attention written out explicitly (no SDPA)."""
    outs, s0 = [], 0
    rep = q.shape[1] // k.shape[1]
    for L in lens:
        qs, ks, vs = q[s0:s0 + L].double(), k[s0:s0 + L].double(), v[s0:s0 + L].double()
        ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vs))
        s0 += L
    return torch.cat(outs)


def run_case(lens, HQ, HKV, D, causal, dtype, tol, backend="triton"):
    g = torch.Generator().manual_seed(sum(lens) + HQ * 7 + D)
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q, k, v = (torch.randn(T, h, D, generator=g).to(DEV) for h in (HQ, HKV, HKV))
    do = torch.randn(T, HQ, D, generator=g).to(DEV)
    scale = D ** -0.5
    qq, kk, vv = (x.detach().clone().to(dtype).requires_grad_() for x in (q, k, v))
    out = varlen_attention(qq, kk, vv, cu, max(lens), causal=causal, backend=backend)
    (out.float() * do).sum().backward()
    q0, k0, v0 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q0, k0, v0, lens, causal, scale)
    (ref * do.double()).sum().backward()
    for name, got, want in (("out", out, ref), ("dq", qq.grad, q0.grad), ("dk", kk.grad, k0.grad), ("dv", vv.grad, v0.grad)):
        err = ((got.double() - want).norm() / want.norm().clamp_min(1.0)).item()  # dq is exactly 0 for T=1
        assert err < tol, (name, err)


@pytest.mark.parametrize("lens", [[1], [1, 1, 3], [17, 40, 5], [70, 2, 9]])
@pytest.mark.parametrize("HQ,HKV", [(2, 2), (4, 1), (8, 1)])
def test_triton_fp32_matches_float64(lens, HQ, HKV):
    run_case(lens, HQ, HKV, 16, True, torch.float32, 1e-5)


@pytest.mark.parametrize("D", [24, 8])
def test_triton_head_dims_off_the_kernel_sizes_are_zero_padded(D):
    run_case([9, 20], 4, 2, D, True, torch.float32, 1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_triton_noncausal_fp16_and_d64(causal):
    run_case([23, 48], 2, 1, 64, causal, torch.float32, 1e-5)
    run_case([23, 48], 4, 2, 16, causal, torch.float16, 5e-3)


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


def test_torch_backend_and_bad_input():
    run_case([5, 9], 4, 2, 16, True, torch.float32, 1e-5, backend="torch")
    q = torch.randn(10, 4, 16)
    k = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, k, torch.tensor([0, 4, 9], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, k, k, cu, 5)
    with pytest.raises(ValueError, match="kv heads"):
        varlen_attention(q, torch.randn(10, 3, 16), torch.randn(10, 3, 16), cu, 6)
    with pytest.raises(ValueError, match="head dim"):
        varlen_attention(torch.randn(10, 4, 160), torch.randn(10, 2, 160), torch.randn(10, 2, 160), cu, 6, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, k, cu, 6, backend="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[1, 300, 4097, 77], [2048, 2048]])
@pytest.mark.parametrize("HQ,HKV,D", [(16, 16, 128), (32, 4, 128), (8, 1, 64)])
def test_gpu_bf16(lens, HQ, HKV, D):
    run_case(lens, HQ, HKV, D, True, torch.bfloat16, 2e-2)
