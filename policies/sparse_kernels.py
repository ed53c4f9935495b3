"""Linear layers that skip the weight rows of zeroed input channels (activation sparsity at batch 1).

With a single row of activations x (decode at batch 1, or the few rows of a small verify tree), y = x W^T
only needs the columns of W (rows of W^T) whose input channel is kept. Storing W^T contiguously ("column-
major W") makes each kept channel one contiguous row, so reading the kept rows reads only the kept bytes:
at sparsity s the memory traffic is (1 - s) of dense. Whether that beats a dense GEMV depends on the
device (bandwidth vs gather overhead), which is why the runtime asks the profiler for the break-even point
instead of assuming one (TEAL, Liu et al. 2024, reports it for GPUs; on this repo's CPU the issue text
quotes ~60-70% for 512x1376 at 2 threads).

Kernels (all return exactly `x[..., keep] @ W^T[keep] (+ bias)` up to float summation order):
- `gather_mv`: index_select the kept rows of W^T, then one matrix-vector product;
- `embedding_bag_mv`: `F.embedding_bag` over W^T with the kept channels as indices and their activations as
  per-sample weights: gather and weighted sum fused, no copy of the kept rows;
- `csr_mv`: the kept activations as a one-row CSR matrix times W^T (`torch.sparse.mm`, a sparse-dense product
  that also reads only the kept rows). On this repo's 2-core CPU it is the fastest of the three for the
  larger matrices (1024x2752: 0.65x dense time at 70% sparsity, where `embedding_bag_mv` takes 0.98x;
  `benchmarks/RESULTS.md`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

KERNELS = ("dense", "gather_mv", "embedding_bag_mv", "csr_mv")


def magnitude_keep(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the channels of one activation row whose magnitude exceeds `threshold` (TEAL)."""
    if x.ndim != 1:
        raise ValueError(f"magnitude_keep takes one activation row, got shape {tuple(x.shape)}")
    return (x.abs() > threshold).nonzero().squeeze(1)


def gather_mv(x: torch.Tensor, weight_t: torch.Tensor, keep: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x[keep] @ weight_t[keep] (+ bias) for one row `x` (in,), `weight_t` (in, out) contiguous."""
    rows = weight_t.index_select(0, keep)
    y = torch.mv(rows.t(), x.index_select(0, keep))
    return y if bias is None else y + bias


def embedding_bag_mv(x: torch.Tensor, weight_t: torch.Tensor, keep: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product through `F.embedding_bag(mode="sum", per_sample_weights=...)` (fused gather + sum)."""
    y = F.embedding_bag(keep.unsqueeze(0), weight_t, per_sample_weights=x.index_select(0, keep).unsqueeze(0),
                        mode="sum").squeeze(0)
    return y if bias is None else y + bias


def csr_mv(x: torch.Tensor, weight_t: torch.Tensor, keep: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product as a (1, in) CSR row times W^T (`torch.sparse.mm`)."""
    values = x.index_select(0, keep)
    crow = torch.tensor([0, keep.numel()], dtype=keep.dtype, device=keep.device)
    with warnings.catch_warnings():  # torch calls CSR support "beta" (once a process); sparse.mm is the stable path
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        row = torch.sparse_csr_tensor(crow, keep, values, size=(1, x.shape[0]), check_invariants=False)
    y = torch.sparse.mm(row, weight_t).squeeze(0)
    return y if bias is None else y + bias


#: The kernels that skip work, by name (`dense` is the ordinary masked GEMV).
SPARSE_KERNELS = {"gather_mv": gather_mv, "embedding_bag_mv": embedding_bag_mv, "csr_mv": csr_mv}


def sparse_mv(kernel: str, x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor, keep: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch by name; `dense` multiplies the masked row by the ordinary (out, in) weight."""
    if kernel == "dense":
        masked = torch.zeros_like(x).index_copy_(0, keep, x.index_select(0, keep))
        return F.linear(masked, weight, bias)
    if kernel in SPARSE_KERNELS:
        return SPARSE_KERNELS[kernel](x, weight_t, keep, bias)
    raise ValueError(f"unknown sparse kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
