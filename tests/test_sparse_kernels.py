"""Sparse-input linear kernels equal dense matmul on the kept channels (fresh random inputs, stated tolerance)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from policies.sparse_kernels import KERNELS, magnitude_keep, sparse_mv

# float32 sums of up to 1376 products of N(0,1) values: relative error well under 1e-5 of the output scale.
ATOL = 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(256, 688), (688, 256), (512, 1376)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_kernel_equals_dense_matmul_on_kept_channels(kernel, shape, sparsity):
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(hash((kernel, shape, sparsity)) % 2**31)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    x = torch.randn(in_features, generator=gen)
    threshold = float(x.abs().quantile(sparsity)) if sparsity else -1.0
    keep = magnitude_keep(x, threshold)
    masked = torch.where(x.abs() > threshold, x, torch.zeros_like(x))
    expected = F.linear(masked, weight, bias)
    got = sparse_mv(kernel, x, weight, weight.t().contiguous(), keep, bias)
    assert torch.allclose(got, expected, atol=ATOL, rtol=1e-5)
    assert abs(1 - keep.numel() / in_features - sparsity) < 0.01


def test_zero_sparsity_dense_kernel_is_bit_identical_to_linear():
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(64, 32, generator=gen), torch.randn(32, generator=gen)
    keep = magnitude_keep(x, -1.0)
    assert torch.equal(sparse_mv("dense", x, weight, weight.t().contiguous(), keep), F.linear(x, weight))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one activation row"):
        magnitude_keep(torch.zeros(2, 3), 0.1)
    with pytest.raises(ValueError, match="unknown sparse kernel"):
        sparse_mv("triton", torch.zeros(3), torch.zeros(2, 3), torch.zeros(3, 2), torch.tensor([0]))
