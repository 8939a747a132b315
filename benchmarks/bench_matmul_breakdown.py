"""Per-kernel CUPTI times of one ``nvfp4_jax.matmul`` call: the Pallas GEMM and the XLA
kernels around it (split-K reduction, padding), for the decode shapes.

Run on an H100: PYTHONPATH=. python benchmarks/bench_matmul_breakdown.py [--m 1 16]
             [--nk 4096x4096] [--split-k 1 2 4 8]   # also force these split-K values

Weights are rotated past 2x the L2 as in bench_matmul.py; each kernel's time is the median
over iterations of its mean over the weight copies.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import statistics

import jax

import nvfp4_jax as nv
from benchmarks import common
from nvfp4_jax.kernels import gemm


def kernel_times(fn, arg_sets, iterations: int = 20) -> dict[str, float]:
    """Median per-call microseconds of every kernel ``fn`` launches, by kernel name."""
    from jax.experimental.mosaic.gpu import profiler

    run_all = jax.jit(lambda sets: [fn(*a) for a in sets])
    jax.block_until_ready(run_all(arg_sets))
    _, timings = profiler.measure(run_all, aggregate=False, iterations=iterations)(arg_sets)
    per_iter = collections.defaultdict(lambda: [0.0] * iterations)
    names = [name for name, _ in timings[0]]
    for it, kernels in enumerate(timings):
        for name, ms in kernels:
            per_iter[name][it] += ms * 1e3 / len(arg_sets)
    return {name: statistics.median(per_iter[name]) for name in dict.fromkeys(names)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="*", default=[1, 16])
    p.add_argument("--nk", nargs="*", default=["4096x4096", "14336x4096"])
    p.add_argument("--split-k", type=int, nargs="*", default=[])
    args = p.parse_args()
    rows = []
    for m, n, k, x, copies in common.matmul_problems(args.nk, args.m):
        base = gemm.default_config(m, n, k)
        configs = [base] + [
            dataclasses.replace(base, split_k=s)
            for s in args.split_k
            if s != base.split_k and (-(-k // base.tile_k)) % s == 0
        ]
        for cfg in configs:
            times = kernel_times(
                lambda x, w, cfg=cfg: nv.matmul(x, w, backend="pallas", config=cfg),
                [(x, c) for c in copies],
            )
            total = sum(times.values())
            detail = ", ".join(f"{name[:40]} {t:.2f}" for name, t in times.items())
            row = [m, n, k, common.config_label(cfg), total, detail]
            rows.append(row)
            print(row, flush=True)
    common.report(
        "matmul_breakdown",
        "Per-kernel times of nvfp4_jax.matmul (CUPTI, us per call, median)",
        ["M", "N", "K", "config", "total", "kernels (name us)"],
        rows,
    )


if __name__ == "__main__":
    main()
