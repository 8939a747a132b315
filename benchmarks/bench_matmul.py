"""``nvfp4_jax.matmul`` (Pallas kernel) vs bf16 ``jnp.dot`` and the XLA dequantize->dot path.

Run on an H100: PYTHONPATH=. python benchmarks/bench_matmul.py [--m 1 16 --nk 4096x4096]
             [--configs]   # also sweep GemmConfigs per shape and report the best

``y = x @ W`` with ``x [M, K]`` bf16 and ``W`` a ``[K, N]`` NVFP4 weight (stored ``[N, K/2]``);
the bf16 baseline multiplies by a bf16 ``[N, K]`` weight (``x @ W.T``). Times are CUPTI
kernel times per call, medians, with enough weight copies rotated that every timed loop
touches more than 2x the 50 MB L2. The FP4 floor is the prepared weight's bytes over the HBM
copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import jax
import jax.numpy as jnp

import nvfp4_jax as nv
from benchmarks import common
from nvfp4_jax.kernels import gemm
from nvfp4_jax.matmul import DEQUANTIZE, pallas_plan

M_VALUES = (1, 16, 64, 256, 1024, 4096)
NK_VALUES = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192))


def one_wave_splits(tiles: int, steps: int, num_sms: int) -> list[int]:
    """The split-K values (up to 16) that divide the ``steps`` K steps of each of ``tiles``
    output tiles and keep the grid within one wave of ``num_sms`` CTAs; ``[1]`` if none."""
    return [s for s in range(1, 17) if steps % s == 0 and tiles * s <= num_sms] or [1]


def sweep(m: int, n: int, k: int, k_group: int | None = None):
    """The default config, then a grid around it (for ``--configs``). Decode (M <= 64):
    128/256-feature tiles, tile_k one or two k-groups, 4 or 8 pipeline stages (fewer where SMEM is
    short), and the two largest split-K values that keep the grid within one wave, with
    XLA and (split-K 2 to 4; 8-CTA clusters measured slower) cluster reduction, K-folded
    (:func:`gemm.k_fold_config`, M <= 16), and stream-K over all SMs. Prefill:
    tile shapes, tile_k, stages (4 also with the output in 32-token chunks, 3 of 256-token
    tiles in 16-token chunks), with and without ``overlap_decode``, the candidates of
    :func:`gemm.prefill_tilings` (k-group 128), and the dequantize route. ``k_group``: the
    prepared weight's (None: the default for ``k``)."""
    k_group = k_group or gemm.default_k_group(k)
    plan = pallas_plan(m, n, k, k_group=k_group)
    yield plan
    base = gemm.default_config(m, n, k, k_group=k_group)
    if plan != base:
        yield base
    num_sms = gemm.sm_count()
    if m <= 64:
        for tile_n, tile_k, stages in itertools.product((128, 256), (k_group, 2 * k_group), (4, 8)):
            tiles = -(-n // tile_n) * -(-m // base.tile_m)
            steps = -(-k // tile_k)
            for split_k in one_wave_splits(tiles, steps, num_sms)[-2:]:
                cfg = dataclasses.replace(
                    base, tile_n=tile_n, tile_k=tile_k, split_k=split_k, stages=stages, stream_k=0
                )
                for reduce in ("xla", "cluster") if 2 <= split_k <= 4 else ("xla",):
                    cfg = dataclasses.replace(cfg, split_k_reduce=reduce)
                    yield gemm._fit_stages(cfg, m, jnp.bfloat16)
                folded = gemm.k_fold_config(dataclasses.replace(cfg, split_k_reduce="xla"), m, k)
                if folded is not None:  # the splits inside the CTA
                    yield gemm._fit_stages(folded, m, jnp.bfloat16)
            if num_sms <= tiles * steps:  # stream-K over all SMs (a unit per CTA)
                cfg = dataclasses.replace(
                    base,
                    tile_n=tile_n,
                    tile_k=tile_k,
                    stages=stages,
                    split_k=1,
                    split_k_reduce="xla",
                    stream_k=num_sms,
                )
                yield gemm._fit_stages(cfg, m, jnp.bfloat16)
    else:
        grid = itertools.product(
            (128, 256), (128, 256), (k_group, 2 * k_group), (3, 4), (False, None)
        )
        keys = ("tile_n", "tile_m", "tile_k", "stages", "overlap_decode")
        for values in grid:
            cfg = dataclasses.replace(base, out_chunk=0, **dict(zip(keys, values)))
            yield cfg
            if cfg.stages == 4:  # the output in 32-token chunks leaves SMEM for 4 stages
                yield dataclasses.replace(cfg, out_chunk=32)
            if cfg.stages == 3 and cfg.tile_m == 256:  # (16-token chunks: 3 stages of m256)
                yield dataclasses.replace(cfg, out_chunk=16)
        if k_group == 128:  # the cost model's candidates (compact scales, the default layout)
            yield from gemm.prefill_tilings(m, n, k, num_sms=num_sms, scale_itemsize=1)
        if plan != DEQUANTIZE:
            yield DEQUANTIZE


def fastest(configs, x, copies, iterations: int, verbose: bool = True):
    """(time in us, config) of the fastest of ``configs`` for ``nv.matmul(x, w)`` rotating
    over the prepared weight ``copies``; configs that fail to compile are skipped."""
    best = None
    for cfg in configs:
        try:
            t = common.time_per_call(
                lambda x, w, cfg=cfg: nv.matmul(x, w, backend="pallas", config=cfg),
                [(x, w) for w in copies],
                iterations,
            )
        except Exception as e:  # noqa: BLE001 - a swept config may not fit SMEM
            print(f"  skip {cfg}: {str(e).splitlines()[0][:100]}")
            continue
        if verbose:
            print(f"  {t:.2f} us {cfg}", flush=True)
        if best is None or t < best[0]:
            best = (t, cfg)
    if best is None:
        raise RuntimeError(f"no config ran for x {list(x.shape)}")
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="*", default=list(M_VALUES))
    p.add_argument("--nk", nargs="*", default=[f"{n}x{k}" for n, k in NK_VALUES])
    p.add_argument("--configs", action="store_true")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--no-xla", action="store_true", help="skip the (slow) XLA dequant->dot path")
    args = p.parse_args()
    hbm = common.hbm_copy_bandwidth()
    rows = []
    for nk in args.nk:
        n, k = (int(v) for v in nk.split("x"))
        bf16_copies = common.copies_for(n * k * 2)
        w_bf16 = [
            jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16) for i in range(bf16_copies)
        ]
        _, fp4_copies, fp4_bytes = common.prepared_copies(w_bf16[0].T)
        floor_us = fp4_bytes / (hbm * 1e9) * 1e6
        for m in args.m:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            t_bf16 = common.time_per_call(
                lambda x, w: x @ w.T, [(x, w) for w in w_bf16], args.iterations
            )
            configs = sweep(m, n, k) if args.configs else [pallas_plan(m, n, k)]
            t_fp4, cfg = fastest(configs, x, fp4_copies, args.iterations, verbose=args.configs)
            t_xla = float("nan")
            if not args.no_xla:
                t_xla = common.time_per_call(
                    lambda x, w: nv.matmul(x, w, backend="xla"),
                    [(x, w) for w in fp4_copies],
                    max(5, args.iterations // 4),
                )
            row = [m, n, k] + common.timing_cells(t_bf16, t_fp4, t_xla, floor_us, cfg)
            rows.append(row)
            print(row, flush=True)
    common.report(
        "matmul" + ("_sweep" if args.configs else ""),
        "nvfp4_jax.matmul (weight-only NVFP4, Pallas Mosaic GPU) vs bf16",
        [
            "M",
            "N",
            "K",
            "bf16",
            "nvfp4",
            "xla dq+dot",
            "vs bf16",
            "vs xla",
            "% of FP4 floor",
            "config",
        ],
        rows,
        [
            (
                f"HBM copy bandwidth this run: {hbm:.0f} GB/s; times in us (CUPTI, median, weights"
                " rotated past 2x L2)"
            )
        ],
    )


if __name__ == "__main__":
    main()
