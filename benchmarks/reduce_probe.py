"""Split-K reduction: XLA's fusion against a minimal Mosaic GPU kernel (probe) and the
library's ``split_k.add_partials`` (8-row x 128-column blocks, the torch launch path's).

    PYTHONPATH=. python benchmarks/reduce_probe.py
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks import common
from nvfp4_jax.kernels import split_k


def xla_reduce(p, ts):
    return (p.sum(axis=0) * ts[0]).astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("chunk",))
def mgpu_reduce(p, ts, *, chunk):
    s, m, n = p.shape

    def body(p_gmem, ts_gmem, o_gmem, p_smem, o_smem, bar):
        j = jax.lax.axis_index("j")
        plgpu.copy_gmem_to_smem(p_gmem.at[:, :, pl.ds(j * chunk, chunk)], p_smem, bar.at[0])
        plgpu.barrier_wait(bar.at[0])
        acc = p_smem[0]
        for i in range(1, s):
            acc = acc + p_smem[i]
        o_smem[...] = (acc * ts_gmem[0]).astype(jnp.bfloat16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[:, pl.ds(j * chunk, chunk)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
        grid=(n // chunk,),
        grid_names=("j",),
        scratch_types=[
            plgpu.SMEM((s, m, chunk), jnp.float32),
            plgpu.SMEM((m, chunk), jnp.bfloat16),
            plgpu.Barrier(num_barriers=1),
        ],
    )(p, ts)


def main():
    print(common.device_line())
    chunks = " | ".join(f"mgpu chunk {c} us" for c in (64, 128, 256))
    print(f"| S x M x N | XLA us | {chunks} | add_partials us |")
    cases = ((4, 8, 4096), (4, 16, 4096), (8, 16, 4096), (4, 64, 4096), (8, 1, 4096))
    for s, m, n in cases + ((4, 16, 14336), (4, 256, 4096)):
        ps = [jax.random.normal(jax.random.key(i), (s, m, n), jnp.float32) for i in range(8)]
        ts = jnp.array([0.37], jnp.float32)
        ref = xla_reduce(ps[0], ts)
        cells = [common.time_per_call(xla_reduce, [(p, ts) for p in ps], 50)]
        for c in (64, 128, 256):
            try:
                got = mgpu_reduce(ps[0], ts, chunk=c)
                err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
                t = common.time_per_call(
                    lambda p, ts, c=c: mgpu_reduce(p, ts, chunk=c), [(p, ts) for p in ps], 50
                )
                cells.append(f"{t:.2f} (err {err:.2g})")
            except Exception as e:  # noqa: BLE001
                cells.append("fail: " + str(e).splitlines()[0][:80])
        add = functools.partial(split_k.add_partials, out_dtype=jnp.bfloat16)
        got = add(ps[0], ts)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
        t = common.time_per_call(add, [(p, ts) for p in ps], 50)
        cells.append(f"{t:.2f} (err {err:.2g})")
        print(f"| {s}x{m}x{n} | {cells[0]:.2f} | " + " | ".join(cells[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
