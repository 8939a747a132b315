"""What the in-kernel decode costs: the fused GEMM with its decode taken out, at any M.

Run on the GPU:
    PYTHONPATH=. python benchmarks/ablate_decode.py [--m 64 256 1024 4096] [--nk 4096x4096 ...]

Per shape, same run, CUPTI medians with weights rotated past 2x the L2: bf16 ``x @ w.T``; the
fused kernel as the library configures it (``ab_configs.base_config``: the tiling of the
default plan, also where the library would take the dequantize route); and the same kernel
with ``gemm._decode_scaled_fast`` replaced by a bitcast of the prepared uint16 code lanes to
bf16 (no scale loads, no integer decode, no scale multiply; the results are meaningless,
the MMAs, pipeline and epilogue are those of the real kernel). The gap between the two is
the decode's share of the kernel time; the gap between the bitcast kernel and bf16 is what
the kernel's tiling and pipeline cost without any decode.

``--half``: also the kernel with half its decode (:func:`half_decode`: the real decode of a
warpgroup's first 64 rows, its registers reused for the other 64; wrong results), the most a
layout that decodes each weight once per 256 tokens instead of 128 could gain (tiles of 128
rows per warpgroup, the prefill plans).
"""

from __future__ import annotations

import argparse
from unittest import mock

import jax
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

import nvfp4_jax as nv
from benchmarks import common
from benchmarks.ab_configs import base_config, speedup
from benchmarks.bench_matmul import NK_VALUES
from nvfp4_jax.kernels import gemm


def bitcast_quarters(lanes, bands, dtype):
    """Stand-in for ``gemm._decode_scaled_fast``: the four quarters of a k-group are the code
    lanes ``uint16 [R, kg/4]`` (WGMMA layout) reinterpreted as ``dtype``; ``bands`` unused."""
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    del bands
    layout = plgpu.Layout.WGMMA
    ret = plgpu.ShapeDtypeStruct(lanes.shape, dtype, layout)

    @plgpu.inline_mgpu(arg_types=(layout,), return_type=(ret,) * 4)
    def cast(_, w):
        pair_ty = ir.VectorType.get((2,), mgpu_utils.dtype_to_ir_type(dtype))
        regs = np.empty_like(w.registers)
        for idx, reg in np.ndenumerate(w.registers):
            regs[idx] = mgpu_utils.bitcast(reg, pair_ty)
        return tuple(
            fa.FragmentedArray(_registers=regs, _layout=w.layout, _is_signed=None) for _ in range(4)
        )

    return cast(lanes)


_DECODE = gemm._decode_scaled_fast  # the real decode, before any patch


def half_decode(lanes, bands, dtype):
    """Stand-in for ``gemm._decode_scaled_fast`` on 128-row warpgroups: the real decode of
    rows 0-63, whose quarters also stand in for rows 64-127."""
    from jax.experimental.mosaic.gpu import fragmented_array as fa

    rows = lanes.shape[0]
    if rows != 128:
        raise ValueError(f"half_decode needs 128-row warpgroups, got {rows}")
    halves = _DECODE(lanes[: rows // 2], bands, dtype)
    layout = plgpu.Layout.WGMMA
    ret = plgpu.ShapeDtypeStruct(lanes.shape, dtype, layout)

    @plgpu.inline_mgpu(arg_types=(layout,) * 4, return_type=(ret,) * 4)
    def twice(_, *quarters):
        return tuple(
            fa.FragmentedArray(
                _registers=np.concatenate([q.registers, q.registers], axis=0),
                _layout=q.layout,
                _is_signed=None,
            )
            for q in quarters
        )

    return twice(*halves)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in NK_VALUES])
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--half", action="store_true", help="also time half the decode")
    args = p.parse_args()
    rows = []
    for m, n, k, x, copies in common.matmul_problems(args.nk, args.m):
        t_bf16 = common.bf16_time(x, n, args.iterations)
        cfg = base_config(m, n, k)
        run = lambda x, w, cfg=cfg: nv.matmul(x, w, backend="pallas", config=cfg)
        t_full = common.time_per_call(run, [(x, w) for w in copies], args.iterations)
        jax.clear_caches()  # retrace with the stand-in
        with mock.patch.object(gemm, "_decode_scaled_fast", bitcast_quarters):
            t_cast = common.time_per_call(run, [(x, w) for w in copies], args.iterations)
        jax.clear_caches()
        half = []
        if args.half:
            with mock.patch.object(gemm, "_decode_scaled_fast", half_decode):
                t_half = common.time_per_call(run, [(x, w) for w in copies], args.iterations)
            jax.clear_caches()
            half = [t_half, speedup(t_bf16, t_half, 2)]
        mma_us = 2 * m * n * k / 989e12 * 1e6  # at the H100/H200 dense bf16 peak
        rows.append(
            [
                m,
                n,
                k,
                t_bf16,
                t_full,
                t_cast,
                speedup(t_bf16, t_full, 2),
                speedup(t_bf16, t_cast, 2),
                f"{1 - t_cast / t_full:.0%}",
                mma_us,
                common.config_label(cfg),
                *half,
            ]
        )
        print(rows[-1], flush=True)
    common.report(
        "ablate_decode",
        "Fused GEMM with and without its decode (us, CUPTI median)",
        [
            "M",
            "N",
            "K",
            "bf16",
            "kernel",
            "no decode",
            "kernel vs bf16",
            "no decode vs bf16",
            "decode share",
            "MMA at 989 TFLOP/s",
            "config",
            *(["half decode", "half decode vs bf16"] if args.half else []),
        ],
        rows,
        notes=["no decode: code lanes bitcast to bf16 in place of decode and scales"],
    )


if __name__ == "__main__":
    main()
