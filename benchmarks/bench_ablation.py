"""What bounds the decode GEMM: kernel time with parts of its work taken out.

Run on the GPU: PYTHONPATH=. python benchmarks/bench_ablation.py [--m 1 16 64] [--nk 4096x4096]

Each variant compiles ``nvfp4_jax.matmul``'s default config with one piece of the per-weight
work replaced by something free; the results are wrong on purpose and only the times count:

- ``full``: the kernel as shipped;
- ``const scales``: the block-scale loads and their widening replaced by a constant (the
  bf16x2 multiplies stay);
- ``raw codes``: the code decode (shifts and masks) replaced by a bitcast of the lanes;
- ``neither``: both, leaving the TMA pipeline, the scale multiplies and the wgmmas.

The gap between ``full`` and a variant is what that work costs where it is not hidden; the
gap between ``neither`` and the FP4 byte floor is the pipeline's own limit. A second table
splits the ``dequantize + dot`` prefill route into its two kernels.
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import nvfp4_jax as nv
from benchmarks import common
from benchmarks.bench_matmul_breakdown import kernel_times
from nvfp4_jax.kernels import dequantize as dequantize_kernel
from nvfp4_jax.kernels import gemm
from nvfp4_jax.matmul import pallas_plan

NK_VALUES = ("4096x4096", "14336x4096", "4096x14336", "28672x8192")


def _const_widen(b, dtype, exp):
    # (b & 0) keeps the array's layout; LLVM folds the load away
    bits = (b.astype(jnp.uint16) & np.uint16(0)) | np.uint16(
        np.array(2.0**exp, dtype).view(np.uint16)
    )
    return lax.bitcast_convert_type(bits, dtype)


def _raw_quarters(lanes, dtype):
    return (lax.bitcast_convert_type(lanes, dtype),) * gemm._CODES_PER_LANE


@contextlib.contextmanager
def variant(name: str):
    saved = gemm._widen_compact, gemm._decode_quarters_fast
    if name in ("const scales", "neither"):
        gemm._widen_compact = _const_widen
    if name in ("raw codes", "neither"):
        gemm._decode_quarters_fast = _raw_quarters
    jax.clear_caches()
    try:
        yield
    finally:
        gemm._widen_compact, gemm._decode_quarters_fast = saved
        jax.clear_caches()


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
VARIANTS = ("full", "const scales", "raw codes", "neither")


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
            times = []
            for name in VARIANTS:
                with variant(name):
                    times.append(
                        common.time_per_call(
                            lambda x, w, cfg=cfg: nv.matmul(x, w, backend="pallas", config=cfg),
                            [(x, w) for w in copies],
                            args.iterations,
                        )
                    )
            rows.append([m, n, k, floor_us, *times, common.config_label(cfg)])
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
            "# Decode GEMM with parts of its work removed (us, CUPTI median)",
            "",
            common.device_line(),
            f"HBM copy bandwidth this run: {hbm:.0f} GB/s; FP4 floor: prepared bytes / that",
            "",
            common.table(["M", "N", "K", "FP4 floor", *VARIANTS, "config"], rows),
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
