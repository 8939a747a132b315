"""Block-scale formats and k-groups of the prepared weight, same kernel, same run.

Run on an H100: PYTHONPATH=. python benchmarks/bench_scales.py [--m 1 16 64 256 1024]
             [--nk 4096x4096 ...] [--k-groups 128 256]

For every shape: bf16 ``jnp.dot`` and the fused kernel (its default config for the weight's
k-group) on the weight prepared with pre-widened bf16 scales (``prepare_weight(dtype=bf16)``,
2 bytes per scale) and with compact one-byte scales (``dtype=None``), for each k-group asked
for. Times are CUPTI kernel times per call (incl. any split-K reduction), medians, weights
rotated past 2x L2; ratios are bf16 time / time.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import nvfp4_jax as nv
from benchmarks import common
from benchmarks.bench_matmul import M_VALUES, NK_VALUES
from nvfp4_jax.kernels import gemm

FORMATS = {"widened": jnp.bfloat16, "compact": None}


def variants(w, k_groups):
    """(label, rotated prepared copies) per scale format and k-group."""
    out = []
    for k_group in k_groups:
        for name, dtype in FORMATS.items():
            prep = gemm.prepare_weight(
                w.data, w.scales, w.tensor_scale, dtype=dtype, k_group=k_group
            )
            nbytes = prep.data.nbytes + prep.scales.nbytes
            copies = [common.fresh_copy(prep) for _ in range(common.copies_for(nbytes))]
            out.append((f"{name} kg{k_group}", copies))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="*", default=[m for m in M_VALUES if m < 2048])
    p.add_argument("--nk", nargs="*", default=[f"{n}x{k}" for n, k in NK_VALUES])
    p.add_argument("--k-groups", type=int, nargs="*", default=[gemm.DEFAULT_K_GROUP])
    p.add_argument("--iterations", type=int, default=20)
    args = p.parse_args()
    rows, labels = [], []
    for nk in args.nk:
        n, k = (int(v) for v in nk.split("x"))
        w_bf16 = [
            jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16)
            for i in range(common.copies_for(n * k * 2))
        ]
        prepared = variants(nv.quantize(w_bf16[0].T, axis=0), args.k_groups)
        labels = [label for label, _ in prepared]
        for m in args.m:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            t_bf16 = common.time_per_call(
                lambda x, w: x @ w.T, [(x, w) for w in w_bf16], args.iterations
            )
            row = [m, n, k, t_bf16]
            for label, copies in prepared:
                cfg = gemm.default_config(m, n, k, k_group=copies[0].k_group)
                t = common.time_per_call(
                    lambda x, w, cfg=cfg, n=n, k=k: gemm.nvfp4_matmul(x, w, n=n, k=k, config=cfg),
                    [(x, w) for w in copies],
                    args.iterations,
                )
                row += [t, f"{t_bf16 / t:.2f}x", common.config_label(cfg)]
                print(m, n, k, label, f"{t:.2f} us", common.config_label(cfg), flush=True)
            rows.append(row)
    headers = ["M", "N", "K", "bf16"]
    for label in labels:
        headers += [label, "vs bf16", "config"]
    common.report(
        "scales",
        "Block-scale formats of the prepared weight: widened bf16 vs compact bytes",
        headers,
        rows,
        ["times in us (CUPTI, median, weights rotated past 2x L2)"],
    )


if __name__ == "__main__":
    main()
