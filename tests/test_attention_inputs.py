"""varlen_attention names the argument at fault for inputs of the wrong kind (issue 23 item 8)."""
from __future__ import annotations

import pytest
import torch

from k15sys.ops import varlen_attention


def test_wrong_kinds_of_input_are_clear_value_errors():
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    assert varlen_attention(q, q, q, cu, 4).shape == (6, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens: expected a torch.Tensor, got list"):
        varlen_attention(q, q, q, [0, 2, 6], 4)
    with pytest.raises(ValueError, match="k: expected a torch.Tensor"):
        varlen_attention(q, q.numpy(), q, cu, 4)
    qi = torch.ones(6, 2, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="q: expected a floating-point tensor"):
        varlen_attention(qi, qi, qi, cu, 4)
