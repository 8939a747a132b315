"""Tile sweep of the bf16 dequantize kernel (the prefill route's first kernel) on this GPU.

Run on a GPU: PYTHONPATH=. python benchmarks/sweep_dequantize.py [--shapes 28672x8192 ...]

For each ``[N, K]`` weight and ``TileConfig(row_subtiles, col_subtiles)`` (sub-tiles of
16 rows x 4 blocks, a half block per thread; the default is ``HALF_BLOCK_CONFIG``): CUPTI
kernel time (median, rotated copies past 2x L2), achieved GB/s (codes + scales read, bf16
written) and its share of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import nvfp4_jax as nv
from benchmarks import common
from nvfp4_jax.kernels import dequantize as dq
from nvfp4_jax.kernels.quantize import TileConfig

CONFIGS = ((1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (1, 4), (4, 2), (1, 8))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=["28672x8192", "14336x4096", "4096x4096"])
    p.add_argument("--iterations", type=int, default=20)
    args = p.parse_args()
    hbm = common.hbm_copy_bandwidth()
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        w = nv.quantize(jax.random.normal(jax.random.key(1), (n, k), jnp.bfloat16))
        nbytes = n * k // 2 + n * k // 16 + n * k * 2
        copies = [common.fresh_copy(w) for _ in range(common.copies_for(nbytes))]
        sets = [(a.data, a.scales, a.tensor_scale) for a in copies]
        for cfg in CONFIGS:
            tile = TileConfig(*cfg)
            us = common.time_per_call(
                lambda d, s, t, tile=tile: dq.dequantize(d, s, t, config=tile),
                sets,
                args.iterations,
            )
            gbs = nbytes / (us * 1e-6) / 1e9
            rows.append([n, k, f"{cfg[0]}x{cfg[1]}", us, gbs, f"{100 * gbs / hbm:.0f}%"])
            print(rows[-1], flush=True)
    common.report(
        "sweep_dequantize",
        "Dequantize kernel (-> bf16) tile sweep",
        ["N", "K", "tile", "us", "GB/s", "% of copy"],
        rows,
        notes=[f"HBM copy bandwidth this run: {hbm:.0f} GB/s"],
    )


if __name__ == "__main__":
    main()
