"""What bounds the NVFP4 GEMM: the decode kernel against its FP4 byte floor, and the prefill
route (dequantize kernel + XLA dot) split into its kernels.

Run on the GPU: PYTHONPATH=. python benchmarks/bench_ablation.py [--m 1 16 64] [--nk 4096x4096]
                                                                [--prefill-m 1024 4096]

The decode ablation that took parts of the per-weight work out of the kernel (block-scale
loads and widening replaced by a constant; the code decode by a bitcast) ran on the kernel
before vectorized scale loads: it monkeypatched that kernel's ``_widen_compact`` and
``_decode_quarters_fast`` (commit 6d4b2e0 of this script); its table is in
``results/ablation-2026-12-02.md``. The prefill table times the bf16 dot alone, the
dequantize kernel alone and the whole route with its per-kernel times (a copy or transpose
XLA adds between the two shows up there), and other formulations of the bf16 dot.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax import lax

import nvfp4_jax as nv
from benchmarks import common
from benchmarks.bench_matmul_breakdown import kernel_times
from nvfp4_jax.kernels import dequantize as dequantize_kernel
from nvfp4_jax.matmul import pallas_plan

NK_VALUES = ("4096x4096", "14336x4096", "4096x14336", "28672x8192")


# x [M, K] . w [N, K]^T
_NT = (((1,), (1,)), ((), ()))
# Formulations of the bf16 product x [M, K] . w [N, K]^T that XLA may map to different GEMMs
DOTS = {
    "x @ w.T": lambda x, w: x @ w.T,
    "dot_general NT, f32 out -> bf16": lambda x, w: lax.dot_general(
        x, w, _NT, preferred_element_type=jnp.float32
    ).astype(jnp.bfloat16),
    "dot_general NT, default out": lambda x, w: lax.dot_general(x, w, _NT),
    "(w @ x.T).T": lambda x, w: (w @ x.T).T,
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="*", default=[1, 16, 64])
    p.add_argument("--nk", nargs="*", default=list(NK_VALUES))
    p.add_argument("--prefill-m", type=int, nargs="*", default=[1024, 4096])
    p.add_argument("--iterations", type=int, default=20)
    args = p.parse_args()
    hbm = common.hbm_copy_bandwidth()
    rows, prefill, dots = [], [], []
    for nk in args.nk:
        n, k = (int(v) for v in nk.split("x"))
        w_bf16 = jax.random.normal(jax.random.key(n + k), (n, k), jnp.bfloat16)
        _, copies, fp4_bytes = common.prepared_copies(w_bf16.T)
        floor_us = fp4_bytes / (hbm * 1e9) * 1e6
        for m in args.m:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            cfg = pallas_plan(m, n, k)
            t = common.time_per_call(
                lambda x, w, cfg=cfg: nv.matmul(x, w, backend="pallas", config=cfg),
                [(x, w) for w in copies],
                args.iterations,
            )
            rows.append([m, n, k, floor_us, t, f"{floor_us / t:.0%}", common.config_label(cfg)])
            print(rows[-1], flush=True)
        bf16_copies = [common.fresh_copy(w_bf16) for _ in range(common.copies_for(n * k * 2))]
        for m in args.prefill_m:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            t_dot = common.time_per_call(
                lambda x, w: lax.dot_general(x, w, _NT, preferred_element_type=jnp.bfloat16),
                [(x, w) for w in bf16_copies],
                args.iterations,
            )
            for name, fn in DOTS.items():
                t = common.time_per_call(fn, [(x, w) for w in bf16_copies], args.iterations)
                dots.append([m, n, k, name, t, f"{t_dot / t:.2f}x"])
                print(dots[-1], flush=True)
            t_dq = common.time_per_call(
                lambda w: dequantize_kernel.dequantize(
                    w.data, w.scales, w.tensor_scale, out_dtype=jnp.bfloat16
                ),
                [(w,) for w in copies],
                args.iterations,
            )
            t_route = common.time_per_call(
                lambda x, w: nv.matmul(x, w, backend="pallas", config="dequantize"),
                [(x, w) for w in copies],
                args.iterations,
            )
            kernels = kernel_times(
                lambda x, w: nv.matmul(x, w, backend="pallas", config="dequantize"),
                [(x, w) for w in copies],
                args.iterations,
            )
            dq_gbs = (n * k * 2 + fp4_bytes) / (t_dq * 1e3)
            route = ", ".join(f"{name} {t:.1f}" for name, t in kernels.items())
            ratio = f"{t_dot / t_route:.2f}x"
            prefill.append([m, n, k, t_dot, t_dq, f"{dq_gbs:.0f}", t_route, ratio, route])
            print(prefill[-1], flush=True)
    text = "\n".join(
        [
            "# Decode GEMM against its FP4 byte floor; the prefill route split (us, CUPTI median)",
            "",
            common.device_line(),
            f"HBM copy bandwidth this run: {hbm:.0f} GB/s; FP4 floor: prepared bytes / that",
            "",
            common.table(["M", "N", "K", "FP4 floor", "nvfp4", "of floor", "config"], rows),
            "",
            "Prefill route (us): the bf16 dot alone, the dequantize kernel alone, the route",
            "",
            common.table(
                [
                    "M",
                    "N",
                    "K",
                    "bf16 dot",
                    "dequantize",
                    "dq GB/s",
                    "dq + dot",
                    "vs bf16",
                    "route kernels (us)",
                ],
                prefill,
            ),
            "",
            "Other formulations of the bf16 dot (us; ratio: 'bf16 dot' above over this)",
            "",
            common.table(["M", "N", "K", "formulation", "us", "vs dot_general NT"], dots),
        ]
    )
    print(text)
    print("saved", common.save("ablation", text))


if __name__ == "__main__":
    main()
