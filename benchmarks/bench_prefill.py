"""Prefill-sized products (M >= 256): the fused Pallas GEMM (default and candidate tilings)
against the dequantize route (``config="dequantize"``: the Pallas dequantize kernel writes
the ``[N, K]`` bf16 weight, XLA's dot multiplies), which ``nvfp4_jax.matmul`` takes from
``matmul.DEQUANTIZE_DOT_MIN_M`` rows on.

Run on an H100: PYTHONPATH=. python benchmarks/bench_prefill.py [--m 1024 4096]
             [--nk 4096x4096] [--no-candidates]

Columns (CUPTI kernel time per call, medians, weights rotated past 2x the L2): bf16
``x @ W.T``; the fused kernel with its default config and the fastest candidate tiling
(M >= 1024); ``dq`` = the dequantize kernel alone; ``dq+dot exact`` = the f16 scheme of
the route (weight without tensor scale, f32 dot, tensor scale, one rounding) run on bf16;
``dequantize route`` = the bf16 route (tensor scale folded into the bf16 weight).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

import nvfp4_jax as nv
from benchmarks import common
from nvfp4_jax.kernels import gemm
from nvfp4_jax.kernels.dequantize import dequantize

# (tile_n, tile_m, tile_k, stages) tried besides the default. 128 x 256 tiles measured 1.3-1.45x
# slower than 256 x 128 on the H100; 192 x 256 (three 64-row warpgroups) runs out of registers.
CANDIDATES = (
    (128, 256, 64, 4),
    (128, 256, 128, 2),
    (256, 128, 128, 3),
)


def _dot_nk(x, w_nk, out_dtype):
    return lax.dot_general(x, w_nk, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def dq_exact(x, w):
    wt = dequantize(w.data, w.scales, jnp.float32(1.0), out_dtype=x.dtype)
    return (_dot_nk(x, wt, jnp.float32) * w.tensor_scale).astype(x.dtype)


def dq_route(x, w):
    return nv.matmul(x, w, backend="pallas", config="dequantize")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="*", default=[256, 1024, 4096])
    p.add_argument(
        "--nk", nargs="*", default=["4096x4096", "14336x4096", "4096x14336", "28672x8192"]
    )
    p.add_argument("--no-candidates", action="store_true")
    p.add_argument("--iterations", type=int, default=10)
    args = p.parse_args()
    rows = []
    for nk in args.nk:
        n, k = (int(v) for v in nk.split("x"))
        w_bf16 = [
            jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16)
            for i in range(common.copies_for(n * k * 2))
        ]
        _, copies, _ = common.prepared_copies(w_bf16[0].T)
        it = args.iterations
        t_dq = common.time_per_call(
            lambda w: dequantize(w.data, w.scales, w.tensor_scale, out_dtype=jnp.bfloat16),
            [(w,) for w in copies],
            it,
        )
        for m in args.m:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            sets = [(x, w) for w in copies]
            t_bf16 = common.time_per_call(lambda x, w: x @ w.T, [(x, w) for w in w_bf16], it)
            base = gemm.default_config(m, n, k)
            t_fused = common.time_per_call(
                lambda x, w, base=base: nv.matmul(x, w, backend="pallas", config=base), sets, it
            )
            best = (t_fused, base)
            if not args.no_candidates and m >= 1024:
                for tn, tm, tk, st in CANDIDATES:
                    cfg = gemm._fit_stages(
                        dataclasses.replace(base, tile_n=tn, tile_m=tm, tile_k=tk, stages=st),
                        m,
                        jnp.bfloat16,
                    )
                    try:
                        t = common.time_per_call(
                            lambda x, w, cfg=cfg: nv.matmul(x, w, backend="pallas", config=cfg),
                            sets,
                            it,
                        )
                    except Exception as e:  # noqa: BLE001 - a candidate may not fit SMEM
                        print(f"  skip {cfg}: {str(e).splitlines()[0][:100]}", flush=True)
                        continue
                    print(f"  {m} {nk} {common.config_label(cfg)}: {t:.1f} us", flush=True)
                    if t < best[0]:
                        best = (t, cfg)
            t_exact = common.time_per_call(dq_exact, sets, it)
            t_route = common.time_per_call(dq_route, sets, it)
            row = [m, n, k, t_bf16, t_fused, best[0], common.config_label(best[1]), t_dq]
            row += [t_exact, t_route]
            row += [f"{t_bf16 / t:.2f}x" for t in (t_fused, best[0], t_exact, t_route)]
            rows.append(row)
            print(row, flush=True)
    common.report(
        "prefill",
        "Prefill: fused NVFP4 GEMM vs Pallas dequantize + XLA dot",
        [
            "M",
            "N",
            "K",
            "bf16",
            "fused",
            "best fused",
            "best config",
            "dq",
            "dq+dot exact",
            "dequantize route",
            "fused/bf16",
            "best/bf16",
            "exact/bf16",
            "route/bf16",
        ],
        rows,
        ["times in us (CUPTI, median, weights rotated past 2x L2); ratios: bf16 time / time"],
    )


if __name__ == "__main__":
    main()
