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

from policies.sparse_kernels import SPARSE_KERNELS, magnitude_keep  # noqa: E402
from search_spaces.sparsity_profiler import median_us  # noqa: E402

# builtin:tiny's, 512-wide, builtin:tiny-wide's (gate_up concatenated: 5504 x 1024; down 1024 x 2752), 7B-sized
SHAPES = ((688, 256), (256, 688), (1376, 512), (512, 1376), (5504, 1024), (1024, 2752), (11008, 4096),
          (4096, 11008))
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
    print("| shape (out x in) | sparsity | dense us | " + " | ".join(f"{k} us (ratio)" for k in SPARSE_KERNELS) + " |")
    print("|---|---:|---:|" + "---:|" * len(SPARSE_KERNELS))
    with torch.inference_mode():
        for out_f, in_f in SHAPES:
            weight = torch.randn(out_f, in_f, generator=gen)
            weight_t = weight.t().contiguous()
            x = torch.randn(in_f, generator=gen)
            dense = median_us(args.repeats, F.linear, x, weight)
            for s in SPARSITIES:
                keep = magnitude_keep(x, float(x.abs().quantile(s)) if s else -1.0)
                cells = []
                for fn in SPARSE_KERNELS.values():
                    us = median_us(args.repeats, fn, x, weight_t, keep)
                    cells.append(f"{us:.1f} ({dense / us:.2f}x)")
                print(f"| {out_f} x {in_f} | {s:.2f} | {dense:.1f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
