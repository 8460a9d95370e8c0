"""Latency against channel width on this CPU: is a width below a multiple of 8 (or 16) slower?

Times three ops that dominate CPU models (a 3x3 conv at 28x28, a 1x1 conv at 56x56, a ViT-S
linear over 197 tokens) at every output width in a window, with the graphprune op table's timer
(``torch.utils.benchmark.Timer.blocked_autorange``), one thread, batch 1 and 16, and writes
``benchmarks/results/widths.csv`` (one row per op and width, the 1-minute load average of
the moment in every row). The reading in ``docs/how-to/latency.md`` decides ``round_to``.

    python benchmarks/widths.py [--low 104 --high 136] [--batches 1 16]
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch

from _common import environment_columns
from graphprune.latency import OpSpec, time_op

OPS = {  # name -> spec at out width w (in width fixed)
    "conv3x3_28": lambda w, b: OpSpec("conv2d", 128, w, b, (28, 28), (3, 3), (1, 1), (1, 1), (1, 1)),
    "conv1x1_56": lambda w, b: OpSpec("conv2d", 64, w, b, (56, 56), (1, 1), (1, 1), (0, 0), (1, 1)),
    "linear_197": lambda w, b: OpSpec("linear", 384, w, b, (197,)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=104)
    parser.add_argument("--high", type=int, default=136)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--min-run-time", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "widths.csv")
    args = parser.parse_args()
    torch.manual_seed(0)
    env = {**environment_columns(), "threads": 1}
    rows = []
    for batch in args.batches:
        for name, make in OPS.items():
            for width in range(args.low, args.high + 1):
                ms = time_op(make(width, batch), threads=1, min_run_time=args.min_run_time)
                rows.append({"op": name, "batch": batch, "out_width": width, "median_ms": f"{ms:.4f}",
                             "load_1min": f"{os.getloadavg()[0]:.2f}", **env})
            print(name, batch, "done")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
