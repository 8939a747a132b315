"""Memory-bound NVFP4 kernels (quantize, dequantize, quant_dequant) vs the XLA path.

Run on a GPU: PYTHONPATH=. python benchmarks/bench_quant.py [--rows 8192 --cols 8192]

For each op it prints the minimal bytes (inputs read once, outputs written once), the
kernel time of the Pallas and XLA backends, achieved GB/s, % of the HBM copy bandwidth
measured in the same run, and the speed-up over XLA. Times are CUPTI kernel times, medians
over many runs, rotating input copies so no run is served from L2.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import nvfp4_jax as nv
from benchmarks import common


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--cols", type=int, default=8192)
    p.add_argument("--iterations", type=int, default=30)
    args = p.parse_args()
    r, k = args.rows, args.cols
    n = r * k
    hbm = common.hbm_copy_bandwidth()
    copies = 2
    xs = [jax.random.normal(jax.random.key(i), (r, k), jnp.bfloat16) for i in range(copies)]
    gs = jnp.float32(2688.0 / 5.0)
    qs = [nv.quantize(x, global_scale=gs) for x in xs]

    ops = {
        # name: (fn(backend) -> callable, arg sets, bytes)
        "quantize (given scale)": (
            lambda b: lambda x: nv.scaled_fp4_quant(x, gs, swizzled=False, backend=b),
            [(x,) for x in xs],
            n * 2 + n // 2 + n // 16,
        ),
        "quantize swizzled (given scale)": (
            lambda b: lambda x: nv.scaled_fp4_quant(x, gs, swizzled=True, backend=b),
            [(x,) for x in xs],
            n * 2 + n // 2 + n // 16,
        ),
        "quantize (default scale, +amax pass)": (
            lambda b: lambda x: nv.quantize(x, backend=b),
            [(x,) for x in xs],
            n * 2 + n // 2 + n // 16,
        ),
        "dequantize -> bf16": (
            lambda b: lambda a: nv.dequantize(a, jnp.bfloat16, backend=b),
            [(a,) for a in qs],
            n // 2 + n // 16 + n * 2,
        ),
        "quant_dequant (given scale)": (
            lambda b: lambda x: nv.quant_dequant(x, global_scale=gs, backend=b),
            [(x,) for x in xs],
            n * 4,
        ),
    }
    rows = []
    for name, (make, arg_sets, nbytes) in ops.items():
        t_pallas = common.time_per_call(make("pallas"), arg_sets, args.iterations)
        t_xla = common.time_per_call(make("xla"), arg_sets, args.iterations)
        gbs = nbytes / (t_pallas * 1e-6) / 1e9
        rows.append(
            [
                name,
                f"{nbytes / 2**20:.0f} MiB",
                t_pallas,
                t_xla,
                gbs,
                f"{100 * gbs / hbm:.0f}%",
                f"{t_xla / t_pallas:.2f}x",
            ]
        )
    common.report(
        "quant_kernels",
        "NVFP4 memory-bound kernels",
        ["op", "min bytes", "pallas us", "xla us", "pallas GB/s", "% of HBM", "vs xla"],
        rows,
        [
            (
                f"input: {r} x {k} bf16 ({n / 2**20:.0f} Mi elements); HBM copy bandwidth this"
                f" run: {hbm:.0f} GB/s"
            )
        ],
    )


if __name__ == "__main__":
    main()
