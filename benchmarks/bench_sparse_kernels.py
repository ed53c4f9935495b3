"""Where activation-sparse kernels beat dense on this device: latency vs sparsity per matrix shape.

For each shape (out, in) and sparsity s, the median time of one batch-1 product y = x W^T with the
`dense` GEMV (F.linear), and with the sparse-input kernels of `policies.sparse_kernels` that read only the
(1 - s) kept rows of W^T. The break-even sparsity (the lowest s at which a sparse kernel is faster than
dense) is the number a sparsity policy needs per device; groundwork for issue 5.

    python benchmarks/bench_sparse_kernels.py [--threads 2] [--repeats 200]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from policies.sparse_kernels import embedding_bag_mv, gather_mv, magnitude_keep  # noqa: E402
from profilers.sparse_profiler import median_us  # noqa: E402

SHAPES = ((688, 256), (256, 688), (1376, 512), (512, 1376), (11008, 4096), (4096, 11008))
SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"\n### Sparse-input kernels vs dense GEMV, {args.threads} threads, {dt.date.today().isoformat()}\n")
    print(f"Command: `{shlex.join(['python', *sys.argv])}`; float32, batch 1, median of {args.repeats} calls, "
          "microseconds; ratio = dense / kernel (> 1: the kernel is faster).\n")
    print("| shape (out x in) | sparsity | dense us | gather_mv us (ratio) | embedding_bag_mv us (ratio) |")
    print("|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        for out_f, in_f in SHAPES:
            weight = torch.randn(out_f, in_f, generator=gen)
            weight_t = weight.t().contiguous()
            x = torch.randn(in_f, generator=gen)
            dense = median_us(args.repeats, F.linear, x, weight)
            for s in SPARSITIES:
                keep = magnitude_keep(x, float(x.abs().quantile(s)) if s else -1.0)
                g = median_us(args.repeats, gather_mv, x, weight_t, keep)
                e = median_us(args.repeats, embedding_bag_mv, x, weight_t, keep)
                print(f"| {out_f} x {in_f} | {s:.2f} | {dense:.1f} | {g:.1f} ({dense / g:.2f}x) | "
                      f"{e:.1f} ({dense / e:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
