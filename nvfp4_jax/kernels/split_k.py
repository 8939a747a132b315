"""Split-K partial sums -> the GEMM's output: a Pallas Mosaic GPU kernel and its reference.

A split-K tiling of the GEMM (``GemmConfig.split_k > 1``, ``split_k_reduce="xla"``) stores
float32 partial sums ``[S, R, C]`` (``S`` splits, ``R`` token rows, ``C`` output features
padded to whole tiles; the 2^7 of the fast decode already applied). Under ``jax.jit`` XLA adds
them in one fusion (:func:`nvfp4_jax.kernels.gemm.nvfp4_matmul`). A launch from PyTorch
(``interop.torch_kernel``) has no XLA: this kernel is its second launch,

    ``out[r, c] = out_dtype(sum_s partials[s, r, c] * tensor_scale + bias[c])``

in float32, the splits added in order ``s = 0, 1, ...`` as :func:`add_partials_reference` does
(the compiler may fuse the scale and the bias into one FMA: the last bit can differ).

Layout: CTA ``(j, i)`` owns the ``[rb, cb]`` block at rows ``i * rb``, columns ``j * cb``
(:func:`block_shape`); one TMA load brings the block of every split into SMEM, ``rb`` more
copy the bias row into each of its rows (register arrays of the strided layout do not
broadcast), the sum runs in registers, and one TMA store writes the block. Ragged edge
blocks read zeros past the end and store only in bounds.

Measured on an H200 (``benchmarks/results/torch_launch-2026-12-03.md``, session 22):
1.3-2.1 us at N = 4096 against 1.0-1.8 us for XLA's fusion, so :func:`nvfp4_matmul` keeps
XLA's; from torch it replaced 4-CTA cluster reductions, halving the call at M = 64 (19.1 ->
9.7 us at N = K = 4096) and taking 4096x14336 at M = 1 from 19.5 to 13.0 us.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nvfp4_jax import _checks
from nvfp4_jax.kernels.quantize import interpret_params

_OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_THREADS = 128  # one warpgroup
_MAX_BLOCK_ROWS = 8
_SMEM_BUDGET = 160 * 1024  # bytes of partial sums per CTA
_MAX_SPLITS = 256  # the largest TMA box dimension


def block_shape(splits: int, rows: int, cols: int) -> tuple[int, int]:
    """The ``(rb, cb)`` block of :func:`add_partials` for ``[splits, rows, cols]`` partials:
    128 columns (``cols`` if fewer) by at most 8 rows, fewer where ``splits`` blocks would
    not fit SMEM; ``rb * cb`` is a multiple of 128 (one warpgroup's strided layout).
    Raises ``ValueError`` if no block qualifies (fewer than 128 columns and one row, or
    more than 256 splits: one TMA box)."""
    _checks.ints_at_least(
        ("splits", splits, 1), ("rows", rows, 1), ("cols", cols, 1), context="add_partials: "
    )
    if splits > _MAX_SPLITS:
        raise ValueError(
            f"add_partials: at most {_MAX_SPLITS} splits (one TMA box), got partials"
            f" [{splits}, {rows}, {cols}]"
        )
    cb = min(cols, _THREADS)
    rb = min(rows, _MAX_BLOCK_ROWS)
    while rb > 1 and splits * rb * cb * 4 > _SMEM_BUDGET:
        rb //= 2
    while rb > 1 and (rb * cb) % _THREADS:
        rb -= 1
    if (rb * cb) % _THREADS or splits * rb * cb * 4 > _SMEM_BUDGET:
        raise ValueError(
            f"add_partials: no block of partials [{splits}, {rows}, {cols}] fits the kernel"
            f" (rows * columns of a block must be a multiple of {_THREADS}, the splits' blocks"
            f" within {_SMEM_BUDGET} bytes of SMEM)"
        )
    return rb, cb


def _check(partials, tensor_scale, bias, out_dtype) -> jnp.dtype:
    if partials.ndim != 3 or partials.dtype != jnp.float32:
        raise ValueError(
            f"partials must be float32 [splits, rows, cols], got {partials.dtype}"
            f" {list(partials.shape)}"
        )
    _, _, cols = partials.shape
    if cols % 8:
        raise ValueError(f"partials' cols must be a multiple of 8 (TMA rows), got {cols}")
    if tensor_scale.shape != (1,) or tensor_scale.dtype != jnp.float32:
        raise ValueError(
            f"tensor_scale must be float32 [1], got {tensor_scale.dtype} {list(tensor_scale.shape)}"
        )
    if bias is not None and (bias.shape != (cols,) or not jnp.issubdtype(bias.dtype, jnp.floating)):
        raise ValueError(f"bias must be a float [{cols}], got {bias.dtype} {list(bias.shape)}")
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    return out_dtype


def add_partials_reference(
    partials: jax.Array, tensor_scale: jax.Array, bias: jax.Array | None = None, *, out_dtype
) -> jax.Array:
    """The pure-jnp :func:`add_partials` (float32, splits in order)."""
    out_dtype = _check(partials, tensor_scale, bias, out_dtype)
    total = partials[0]
    for s in range(1, partials.shape[0]):
        total = total + partials[s]
    total = total * tensor_scale[0]
    if bias is not None:
        total = total + bias.astype(jnp.float32)
    return total.astype(out_dtype)


def add_partials_kernel(
    partials: jax.Array,
    tensor_scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    out_dtype,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array:
    """Adds split-K partial sums, applies the tensor scale and the bias: one kernel (the
    call alone, unjitted, as ``interop.torch_kernel`` lowers it; :func:`add_partials` is its
    jitted form).

    Args:
      partials: float32 ``[S, R, C]``, ``C`` a multiple of 8.
      tensor_scale: float32 ``[1]``.
      bias: optional float ``[C]``, added in float32.
      out_dtype: bfloat16, float16 or float32.
      interpret: run in the Mosaic GPU CPU interpreter.

    Returns:
      ``out_dtype [R, C]``.
    """
    out_dtype = _check(partials, tensor_scale, bias, out_dtype)
    splits, rows, cols = partials.shape
    rb, cb = block_shape(splits, rows, cols)
    has_bias = bias is not None

    def body(p_gmem, ts_gmem, *refs):
        bias_gmem = refs[0] if has_bias else None
        out_gmem, p_smem, o_smem, *refs = refs[1:] if has_bias else refs
        b_smem = refs.pop(0) if has_bias else None
        barrier = refs.pop(0)
        r0 = jax.lax.axis_index("r") * rb
        c0 = jax.lax.axis_index("c") * cb
        plgpu.copy_gmem_to_smem(
            p_gmem.at[:, pl.ds(r0, rb), pl.ds(c0, cb)], p_smem, barrier.at[0]
        )
        if has_bias:  # the bias row into every row of the block
            for r in range(rb):
                plgpu.copy_gmem_to_smem(bias_gmem.at[pl.ds(c0, cb)], b_smem.at[r], barrier.at[0])
        plgpu.barrier_wait(barrier.at[0])
        total = p_smem[0]
        for s in range(1, splits):
            total = total + p_smem[s]
        total = total * ts_gmem[0]
        if has_bias:
            total = total + b_smem[...].astype(jnp.float32)
        o_smem[...] = total.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[pl.ds(r0, rb), pl.ds(c0, cb)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    scratch = [plgpu.SMEM((splits, rb, cb), jnp.float32), plgpu.SMEM((rb, cb), out_dtype)]
    if has_bias:
        scratch.append(plgpu.SMEM((rb, cb), bias.dtype))
    scratch.append(plgpu.Barrier(num_arrivals=1 + (rb if has_bias else 0), num_barriers=1))
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((rows, cols), out_dtype),
        grid=(-(-cols // cb), -(-rows // rb)),
        grid_names=("c", "r"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params(interpret),
    )
    args = (partials, tensor_scale) + ((bias,) if has_bias else ())
    return kernel(*args)


add_partials = jax.jit(add_partials_kernel, static_argnames=("out_dtype", "interpret"))
