"""A/B of fast-decode instruction choices, same run, default plans.

    PYTHONPATH=. python benchmarks/ab_decode.py [--m 1 16 1024] [--nk 4096x4096 28672x8192]
        [--variants kernel "lanes 8/3" imad] [--k-group 256]

Each variant patches ``nvfp4_jax.kernels.gemm`` (as ``ablate_decode.py`` does) and prepares
its own weights, so layout variants (``_LANE_BITS``) are timed on weights in their layout:

* ``kernel``: the library as is.
* ``SHF``: the three left shifts per register (bf16: by 6, 3, 1) as funnel shifts
  ``shf.l.clamp.b32 d, 0, x, n``, which ptxas keeps as ``SHF`` on the integer ALU pipe;
  a plain ``shl`` becomes ``IMAD.SHL`` on the FMA pipe.
* ``lanes 8/3``: :data:`ALU_HEAVY_LANE_BITS`, the code layout before 2026-12-03, which
  places bf16 codes with 8 integer-ALU ops and 3 ``IMAD.SHL`` per register (the kernel's
  ``gemm._LANE_BITS``: 7 and 4); f16 11 and 6 (kernel's: 8 and 6).
* ``imad``: the compact scales widened by ``IMAD`` (a multiplier ptxas cannot see as a power
  of two) instead of ``LEA``, moving one op per two scales from the ALU to the FMA pipe.
* ``narrow x``: the x tile swizzled at a quarter's width (TMA rows of ``k_group / 4``
  elements, 64 bytes at k-group 128) also where one wgmma reads a whole k-group (the
  kernel's: 128 bytes where K is a multiple of 64, ``gemm._WIDE_X_ROWS``).

Per shape: bf16 ``x @ w.T``, then every variant timed twice in turn (CUPTI medians, weights
rotated past 2x L2; the table takes each variant's better run); outputs must be bitwise equal
to ``kernel``'s.
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import jax
import jax.numpy as jnp

import nvfp4_jax as nv
from benchmarks import common
from benchmarks.ab_configs import base_config, speedup
from nvfp4_jax.kernels import gemm

# Code bit i (0: mantissa, 1-2: exponent, 3: sign) of quarter q at lane bit [q][i], the
# layout before 2026-12-03: bf16 quarters 0-2 take shifts 6, 3 and none, quarter 3 -5, -4, 1.
ALU_HEAVY_LANE_BITS = ((0, 1, 2, 9), (3, 4, 5, 12), (6, 7, 8, 15), (10, 11, 13, 14))


def shift_left_shf(x, amount: int):
    """``gemm._shift_left`` as a funnel shift (ptxas: ``SHF.L.U32.HI``)."""
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    ptx = f"shf.l.clamp.b32 $0, 0, $1, {amount};"
    return mgpu_utils.inline_ptx(ptx, x, result_types=ir.IntegerType.get_signless(32))


def shift_add_imad(x, shift: int, add: int):
    """``gemm._shift_add`` as ``x * m + add`` with ``m = 2**shift`` read through
    ``%dynamic_smem_size`` (below 2^31, so ``>> 31`` is 0), which ptxas cannot fold into a
    ``LEA``: an ``IMAD`` on the FMA pipe."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    i32 = ir.IntegerType.get_signless(32)
    ptx = f"{{ .reg .u32 t; mov.u32 t, %dynamic_smem_size; shr.u32 t, t, 31; add.u32 $0, t, {1 << shift}; }}"
    mult = mgpu_utils.inline_ptx(ptx, result_types=i32)
    add_attr = ir.IntegerAttr.get(i32, add - (add >> 31 << 32))
    return arith.addi(arith.muli(x, mult), arith.constant(i32, add_attr))


def patches(*pairs):
    """A context factory patching ``gemm``'s attributes ``(name, value), ...``."""

    @contextlib.contextmanager
    def patched():
        with contextlib.ExitStack() as stack:
            for name, value in pairs:
                stack.enter_context(mock.patch.object(gemm, name, value))
            yield

    return patched


VARIANTS = {
    "kernel": patches(),
    "SHF": patches(("_shift_left", shift_left_shf)),
    "lanes 8/3": patches(("_LANE_BITS", ALU_HEAVY_LANE_BITS)),
    "imad": patches(("_shift_add", shift_add_imad)),
    "narrow x": patches(("_WIDE_X_ROWS", False)),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 1024])
    p.add_argument("--nk", nargs="+", default=["4096x4096", "28672x8192"])
    p.add_argument("--variants", nargs="+", default=["kernel", "lanes 8/3", "imad"])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--k-group", type=int, default=None, help="prepared k-group (default: library's)")
    args = p.parse_args()
    names = ["kernel"] + [v for v in args.variants if v != "kernel"]
    rows = []
    for n, k, w in common.matmul_weights(args.nk):
        copies = {}
        for name in names:
            with VARIANTS[name]():
                copies[name] = common.prepared_copies(w, args.k_group)[1]
        for m in args.m:
            x = common.matmul_x(m, k)
            t_bf16 = common.bf16_time(x, n, args.iterations)
            cfg = base_config(m, n, k, args.k_group)
            run = lambda x, w, cfg=cfg: nv.matmul(x, w, backend="pallas", config=cfg)
            times = {name: [] for name in names}
            outs = {}
            for _ in range(2):
                for name in names:
                    jax.clear_caches()  # retrace under this variant's patches
                    with VARIANTS[name]():
                        sets = [(x, c) for c in copies[name]]
                        times[name].append(common.time_per_call(run, sets, args.iterations))
                        outs[name] = run(x, copies[name][0])
            jax.clear_caches()
            best = {name: min(t) for name, t in times.items()}
            same = all(bool(jnp.all(o == outs["kernel"])) for o in outs.values())
            row = [m, n, k, t_bf16] + list(best.values())
            row += [speedup(t_bf16, t, 2) for t in best.values()]
            fastest = min(best, key=best.get)
            rows.append(row + [f"{fastest} {best['kernel'] / best[fastest]:.3f}", same,
                               common.config_label(cfg)])
            print(rows[-1], times, flush=True)
    common.report(
        "ab_decode" if args.k_group is None else f"ab_decode_kg{args.k_group}",
        "Fast decode variants (us, CUPTI median)",
        ["M", "N", "K", "bf16", *names, *(f"{v} vs bf16" for v in names),
         "fastest (speedup)", "bitwise equal", "config"],
        rows,
    )


if __name__ == "__main__":
    main()
