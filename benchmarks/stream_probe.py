"""How fast can the GEMM's TMA pipeline stream the prepared weight with no compute at all?

Runs ``plgpu.emit_pipeline_warp_specialized`` over the prepared codes and scales with the
GEMM's grid, boxes and swizzles, and a compute warpgroup that does nothing but take each
step (so the time is the TMA pipeline's alone), next to: the GEMM itself, a plain XLA
reduction that reads the same bytes, and bf16 ``x @ w.T`` at M = 1. Variants change the TMA
row width (the same bytes per step in rows of 64, 128 or 256 bytes), the stages and the
number of compute warpgroups.

    PYTHONPATH=. python benchmarks/stream_probe.py
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

import nvfp4_jax as nv
from benchmarks import common
from nvfp4_jax.kernels import gemm


def stream(data, scales, *, tile_n, groups, stages, split_k, wgs, row_bytes):
    """data u16 [G, N, L] (L = 32: 64-byte rows), scales u8 [G, N/16, 128]. Each CTA
    ``(n, s)`` streams rows ``[n*tile_n, +tile_n)`` of k-groups ``[s*G/split_k, ...)``,
    ``groups`` per step, viewing each k-group's rows as ``row_bytes``-byte rows."""
    g_total, n, lanes = data.shape
    widen = row_bytes // (2 * lanes)
    view = data.reshape(g_total, n // widen, lanes * widen)
    rows = tile_n // widen
    steps = g_total // groups // split_k
    n_tiles = n // tile_n
    swz = gemm._swizzle_transforms(lanes * widen, jnp.uint16)

    def body(d_gmem, s_gmem, out_gmem):
        n_idx = jax.lax.axis_index("n")
        s_idx = jax.lax.axis_index("s")
        d_spec = plgpu.BlockSpec(
            (groups, rows, lanes * widen), lambda k: (s_idx * steps + k, n_idx, 0), transforms=swz
        )
        s_spec = plgpu.BlockSpec(
            (groups, tile_n // 16, 128), lambda k: (s_idx * steps + k, n_idx, 0)
        )

        def step(_, d_smem, s_smem):
            del d_smem, s_smem

        plgpu.emit_pipeline_warp_specialized(
            step,
            grid=(steps,),
            memory_registers=40,
            in_specs=[d_spec, s_spec],
            wg_axis="wg",
            num_compute_wgs=wgs,
            max_concurrent_steps=min(stages, steps),
        )(d_gmem, s_gmem)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((8,), jnp.float32),
        grid=(n_tiles, split_k),
        grid_names=("n", "s"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=gemm.compiler_params(),
    )
    return kernel(view, scales)


# Per shape: (tile_n, k-groups per step, stages, split_k, compute warpgroups, TMA row bytes).
VARIANTS = {
    (4096, 4096): [
        (128, 1, 4, 4, 2, 64), (128, 1, 2, 4, 2, 64), (128, 1, 8, 4, 2, 64),
        (128, 1, 4, 4, 1, 64), (128, 1, 4, 4, 2, 128), (128, 1, 4, 4, 2, 256),
        (128, 2, 4, 4, 2, 64), (256, 1, 4, 8, 2, 64), (64, 1, 4, 2, 1, 64),
    ],
    (28672, 8192): [
        (256, 2, 4, 1, 2, 64), (256, 2, 2, 1, 2, 64), (256, 2, 4, 1, 2, 128),
        (256, 2, 4, 1, 2, 256), (256, 1, 8, 1, 2, 64), (128, 2, 4, 2, 2, 64),
    ],
}
FIELDS = ("tile_n", "groups", "stages", "split_k", "wgs", "row_bytes")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iterations", type=int, default=20)
    args = p.parse_args()
    it = args.iterations
    print(common.device_line())
    rows = []
    for (n, k), variants in VARIANTS.items():
        w = jax.random.normal(jax.random.key(0), (k, n), jnp.bfloat16)
        _, copies, nbytes = common.prepared_copies(w)
        pw = [c.prepared for c in copies]
        x = jax.random.normal(jax.random.key(1), (1, k), jnp.bfloat16)
        t_bf16 = common.bf16_time(x, n, it)
        t_ours = common.time_per_call(lambda x, w: nv.matmul(x, w), [(x, c) for c in copies], it)
        t_xla = common.time_per_call(
            lambda d, s: (jnp.max(d, axis=(0, 1)), jnp.max(s, axis=(0, 1))),
            [(q.data, q.scales) for q in pw],
            it,
        )
        rows.append((n, k, "bf16 x @ w.T, M = 1", t_bf16, n * k * 2))
        rows.append((n, k, "nvfp4 matmul, M = 1 (default)", t_ours, nbytes))
        rows.append((n, k, "XLA max over codes + scales", t_xla, nbytes))
        for variant in variants:
            tile_n, groups, stages, split_k, wgs, row_bytes = variant
            name = (
                f"TMA pipeline n{tile_n} k{128 * groups} s{stages} sk{split_k} wgs{wgs}"
                f" rows {row_bytes} B"
            )
            fn = functools.partial(stream, **dict(zip(FIELDS, variant)))
            try:
                t = common.time_per_call(fn, [(q.data, q.scales) for q in pw], it)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{name}: failed: {str(e).splitlines()[0][:200]}")
                continue
            rows.append((n, k, name, t, nbytes))
    print()
    print("| N x K | what | us | GB/s |")
    print("|---|---|---|---|")
    for n, k, name, t, b in rows:
        print(f"| {n}x{k} | {name} | {t:.2f} | {b / t / 1e3:.0f} |")


if __name__ == "__main__":
    main()
