"""The prepared k-group's effect on the fused kernel: k-group 128 (64-byte TMA rows) against
256 (128-byte rows), each with its best config from a small grid, next to bf16, per shape.

    PYTHONPATH=. python benchmarks/bench_k_group.py [--m 1 16 64 256 1024] [--nk 28672x8192]

Per (M, N, K): bf16 ``x @ w.T``, the library's plan for a k-group 128 weight, and the fastest
of a grid for each k-group (decode: 128/256-feature tiles, tile_k one k-group, 4 stages or as
many as fit, the two largest one-wave split-K values and stream-K; prefill: 128/256 x 128
tiles, 3 or 4 stages). CUPTI kernel times in us, medians, weights rotated past 2x the L2.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax.numpy as jnp

import nvfp4_jax as nv
from benchmarks import common
from benchmarks.bench_matmul import M_VALUES, NK_VALUES, fastest, one_wave_splits
from nvfp4_jax.kernels import gemm


def grid(m: int, n: int, k: int, k_group: int):
    """The default config for ``k_group`` and a small grid around it."""
    base = gemm.default_config(m, n, k, k_group=k_group)
    yield base
    num_sms = gemm.sm_count()
    if m <= 64:
        for tile_n in (128, 256):
            tiles = -(-n // tile_n) * -(-m // base.tile_m)
            steps = -(-k // k_group)
            for split_k in one_wave_splits(tiles, steps, num_sms)[-2:]:
                cfg = dataclasses.replace(
                    base, tile_n=tile_n, tile_k=k_group, split_k=split_k, stages=4, stream_k=0
                )
                yield gemm._fit_stages(cfg, m, jnp.bfloat16)
            if num_sms <= tiles * steps:
                cfg = dataclasses.replace(
                    base, tile_n=tile_n, tile_k=k_group, stages=4, split_k=1, stream_k=num_sms
                )
                yield gemm._fit_stages(cfg, m, jnp.bfloat16)
    else:
        for tile_n in (128, 256):
            for stages in (3, 4):
                cfg = dataclasses.replace(
                    base, tile_n=tile_n, tile_m=128, tile_k=k_group, stages=stages
                )
                yield gemm._fit_stages(cfg, m, jnp.bfloat16)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="*", default=[m for m in M_VALUES if m <= 1024])
    p.add_argument("--nk", nargs="*", default=[f"{n}x{k}" for n, k in NK_VALUES])
    p.add_argument("--iterations", type=int, default=20)
    args = p.parse_args()
    print(common.device_line())
    rows = []
    for n, k, w in common.matmul_weights(args.nk):
        copies = {kg: common.prepared_copies(w, kg)[1] for kg in (128, 256)}
        for m in args.m:
            x = common.matmul_x(m, k)
            t_bf16 = common.bf16_time(x, n, args.iterations)
            t_plan = common.time_per_call(
                lambda x, w: nv.matmul(x, w), [(x, c) for c in copies[128]], args.iterations
            )
            best = {}
            for kg in (128, 256):
                configs = list(dict.fromkeys(grid(m, n, k, kg)))
                best[kg] = fastest(configs, x, copies[kg], args.iterations, verbose=True)
            row = (m, n, k, t_bf16, t_plan, best[128], best[256])
            rows.append(row)
            print(
                f"M={m} {n}x{k}: bf16 {t_bf16:.2f} plan {t_plan:.2f} kg128 {best[128][0]:.2f}"
                f" kg256 {best[256][0]:.2f} ({common.config_label(best[256][1])})",
                flush=True,
            )
    print()
    print("| M | N x K | bf16 | plan (kg128) | best kg128 | best kg256 | kg256 vs bf16 | kg256 config |")
    print("|---|---|---|---|---|---|---|---|")
    for m, n, k, tb, tp, b128, b256 in rows:
        print(
            f"| {m} | {n}x{k} | {tb:.1f} | {tp:.2f} | {b128[0]:.2f} | {b256[0]:.2f} |"
            f" {tb / b256[0]:.2f}x | {common.config_label(b256[1])} |"
        )


if __name__ == "__main__":
    main()
