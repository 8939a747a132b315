"""``nvfp4_jax.grouped_matmul`` (Pallas) vs bf16 ``jax.lax.ragged_dot`` and the XLA
dequantize -> ragged_dot path, on MoE expert projections.

Run on an H100: PYTHONPATH=. python benchmarks/bench_moe.py [--t 1 16 --models mixtral]

Models: ``mixtral`` (E=8, H=4096, I=14336, top-2) and ``small`` (E=64, H=2048, I=1408, top-6).
For each token count T the routing comes from random router logits (softmax, top-k), so
``rows = T * top_k`` sorted assignments are split over the experts as a real router would.
Both projections are timed: ``w13`` (``[rows, H] x [E, H, 2I]``) and ``w2``
(``[rows, I] x [E, I, H]``). Times are CUPTI kernel times per call (every kernel of the call,
including the tile gather/scatter), medians, with weight copies rotated past 2x the L2.
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

MODELS = {"mixtral": (8, 4096, 14336, 2), "small": (64, 2048, 1408, 6)}
T_VALUES = (1, 16, 128, 1024, 8192)


def routing(t: int, e: int, top_k: int, seed: int):
    logits = jax.random.normal(jax.random.key(seed), (t, e), jnp.float32)
    _, experts = nv.moe.route(logits, top_k)
    return jnp.bincount(experts.reshape(-1), length=e).astype(jnp.int32)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--t", type=int, nargs="*", default=list(T_VALUES))
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--no-xla", action="store_true", help="skip the XLA dequant->ragged_dot path")
    p.add_argument("--configs", action="store_true", help="sweep kernel configs, report the best")
    args = p.parse_args()
    hbm = common.hbm_copy_bandwidth()
    rows_out = []
    for model in args.models:
        e, h, inter, top_k = MODELS[model]
        for proj, (k, n) in (("w13", (h, 2 * inter)), ("w2", (inter, h))):
            w_bf16 = [
                jax.random.normal(jax.random.key(i), (e, k, n), jnp.bfloat16)
                for i in range(common.copies_for(e * k * n * 2))
            ]
            wq = nv.prepare(jax.vmap(lambda a: nv.quantize(a, axis=0))(w_bf16[0]))
            fp4_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(wq.prepared))
            fp4 = [common.fresh_copy(wq) for _ in range(common.copies_for(fp4_bytes))]
            for t in args.t:
                rows = t * top_k
                gs = routing(t, e, top_k, seed=t)
                active = int((gs > 0).sum())
                x = jax.random.normal(jax.random.key(t), (rows, k), jnp.bfloat16)
                t_bf16 = common.time_per_call(
                    lambda x, w, g: jax.lax.ragged_dot(x, w, g),
                    [(x, w, gs) for w in w_bf16],
                    args.iterations,
                )
                base = gemm.default_grouped_config(
                    rows, e, n, k, scale_itemsize=wq.prepared.scales.dtype.itemsize
                )
                configs = [base]
                if args.configs:
                    tile_ms = {max(8, base.tile_m // 2 // 8 * 8), base.tile_m, 2 * base.tile_m}
                    grid = itertools.product(sorted(tile_ms), (1, 2))
                    configs += [
                        dataclasses.replace(base, tile_m=min(tm, 256), split_k=sk)
                        for tm, sk in grid
                    ]
                best = None
                for cfg in configs:
                    try:
                        t_cfg = common.time_per_call(
                            lambda x, w, g, cfg=cfg: nv.grouped_matmul(
                                x, w, g, backend="pallas", config=cfg
                            ),
                            [(x, w, gs) for w in fp4],
                            args.iterations,
                        )
                    except Exception as err:  # noqa: BLE001 - a swept config may not fit
                        print(f"  skip {cfg}: {str(err).splitlines()[0][:100]}")
                        continue
                    if args.configs:
                        print(f"  {t_cfg:.1f} us {cfg}", flush=True)
                    if best is None or t_cfg < best[0]:
                        best = (t_cfg, cfg)
                t_fp4, cfg = best
                t_xla = float("nan")
                if not args.no_xla:
                    t_xla = common.time_per_call(
                        lambda x, w, g: nv.grouped_matmul(x, w, g, backend="xla"),
                        [(x, w, gs) for w in fp4],
                        max(3, args.iterations // 3),
                    )
                # Bytes of the active experts' FP4 weights: the decode-time floor.
                floor_us = fp4_bytes * active / e / (hbm * 1e9) * 1e6
                row = [model, proj, t, rows, active]
                row += common.timing_cells(t_bf16, t_fp4, t_xla, floor_us, cfg)
                rows_out.append(row)
                print(row, flush=True)
    common.report(
        "moe" + ("_sweep" if args.configs else ""),
        "nvfp4_jax.grouped_matmul (NVFP4 experts, Pallas Mosaic GPU) vs bf16 ragged_dot",
        [
            "model",
            "proj",
            "T",
            "rows",
            "experts hit",
            "bf16 ragged_dot",
            "nvfp4",
            "xla dq+ragged",
            "vs bf16",
            "vs xla",
            "% of floor",
            "config",
        ],
        rows_out,
        [
            (
                f"HBM copy bandwidth this run: {hbm:.0f} GB/s; times in us (CUPTI, median,"
                " weights rotated past 2x L2); floor = active experts' FP4 bytes / HBM bandwidth"
            )
        ],
    )


if __name__ == "__main__":
    main()
