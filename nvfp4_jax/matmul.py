"""``matmul`` / ``linear``: activations times an NVFP4 weight (weight-only, W4A16).

``matmul(x, w)`` computes ``x @ dequantize(w)`` for ``x: [..., K]`` (bf16/fp16) and an
``NVFP4Array`` ``w`` of logical shape ``[K, N]`` quantized along K (stored ``[N, K/2]``),
accumulating in float32: ``y = (x @ (e2m1 · scale)) · tensor_scale (+ bias)``, one rounding
to the output dtype. ``linear(x, w)`` is the same product for a weight of logical shape
``[N, K]`` (PyTorch's ``F.linear`` convention) -- the same storage, no copy.

Backends (see ``backends.py``): ``"pallas"`` runs the Mosaic GPU kernel of
``kernels/gemm.py`` on its prepared weight layout, or for prefill-sized products (M >=
2048, see :func:`pallas_plan`) the Pallas dequantize kernel followed by XLA's dot;
``"xla"`` dequantizes ``e2m1 · scale`` to the activation dtype (exact: at most 5
significant bits) and calls ``dot_general``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from nvfp4_jax import _checks, backends, reference, sharding
from nvfp4_jax.array import NVFP4Array
from nvfp4_jax.backends import Backend
from nvfp4_jax.kernels import dequantize as dequantize_kernel
from nvfp4_jax.kernels import gemm

ACTIVATION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _xla_matmul(x2d, w: NVFP4Array, bias, out_dtype, config=None) -> jax.Array:
    """XLA path: ``x2d [M, K]`` times the dequantized ``[N, K]`` weight, f32 accumulation."""
    del config
    wt = reference.dequantize(w.data, w.scales, jnp.float32(1.0), x2d.dtype)  # [N, K]
    return _dense_product(x2d, wt, w.tensor_scale, bias, out_dtype)


def _dense_product(x2d, wt, tensor_scale, bias, out_dtype) -> jax.Array:
    """``(x2d [M, K] @ wt[N, K]ᵀ) · tensor_scale + bias``, f32 accumulation, one rounding."""
    acc = lax.dot_general(x2d, wt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    acc = acc * tensor_scale.astype(jnp.float32)
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return acc.astype(out_dtype)


# From this many rows on, the "pallas" backend dequantizes the weight and calls XLA's dot.
# Measured on an H100 (benchmarks/results/prefill-2026-11-23.md, bf16): at M = 4096 that
# is 1.2-1.3x faster than the fused kernel (0.90-0.94x of bf16 against 0.70-0.72x); at
# M = 1024 the two are within 6% either way; the crossover is estimated near M = 1500.
DEQUANTIZE_DOT_MIN_M = 2048
DEQUANTIZE = "dequantize"


def pallas_plan(
    m: int,
    n: int,
    k: int,
    dtype=jnp.bfloat16,
    config=None,
    k_group: int | None = None,
    scale_itemsize: int = 1,
):
    """How the ``"pallas"`` backend computes an ``[m, k] x [k, n]`` product: a
    :class:`~nvfp4_jax.kernels.gemm.GemmConfig` for the fused kernel, or
    :data:`DEQUANTIZE` for the dequantize kernel + XLA dot. ``config`` (either of those)
    overrides; None picks :data:`DEQUANTIZE` for ``m >= DEQUANTIZE_DOT_MIN_M`` (the
    tensor cores bound the product, and the fused kernel's in-loop decode costs more than
    one pass over the weight) and :func:`gemm.default_config` below (for a weight prepared
    with ``k_group`` and block scales of ``scale_itemsize`` bytes; None and 1: the default
    layout for ``k``, :func:`gemm.default_k_group`, compact scales)."""
    if config is None:
        if m >= DEQUANTIZE_DOT_MIN_M:
            return DEQUANTIZE
        return gemm.default_config(
            m, n, k, dtype=dtype, k_group=k_group, scale_itemsize=scale_itemsize
        )
    if config != DEQUANTIZE and not isinstance(config, gemm.GemmConfig):
        raise TypeError(
            f"config must be a kernels.gemm.GemmConfig, {DEQUANTIZE!r} or None, got {config!r}"
        )
    return config


def _pallas_matmul(x2d, w: NVFP4Array, bias, out_dtype, config=None) -> jax.Array:
    """Pallas path: the Mosaic GPU kernel on the prepared layout (built here if ``w`` has
    none; ``prepare`` once to avoid that), or :func:`_dequantize_dot`."""
    if jnp.dtype(out_dtype) not in ACTIVATION_DTYPES:
        raise NotImplementedError(
            f"the Pallas GEMM writes bfloat16/float16, not {jnp.dtype(out_dtype)}"
        )
    n, k = w.data.shape[0], 2 * w.data.shape[1]
    interpret = backends.interpret_pallas()
    prepared = w.prepared
    k_group = None if prepared is None else prepared.k_group
    itemsize = 1 if prepared is None else prepared.scales.dtype.itemsize  # 1: compact
    plan = pallas_plan(x2d.shape[0], n, k, x2d.dtype, config, k_group, itemsize)
    if plan == DEQUANTIZE:
        backends.note("matmul", Backend.PALLAS, DEQUANTIZE)
        return _dequantize_dot(x2d, w, bias, out_dtype, interpret)
    if prepared is None:  # any prepared layout serves both activation dtypes
        prepared = _prepare_layout(w, None, k_group)
    if config is None and interpret:  # the interpreter runs only the SMEM-operand variant
        plan = dataclasses.replace(plan, a_operand="smem")
    return gemm.nvfp4_matmul(
        x2d, prepared, n=n, k=k, bias=bias, out_dtype=out_dtype, config=plan, interpret=interpret
    )


def _dequantize_dot(x2d, w: NVFP4Array, bias, out_dtype, interpret) -> jax.Array:
    """``x2d [M, K] @ W``: the Pallas dequantize kernel writes the ``[N, K]`` weight in the
    activation dtype (a transient ``N * K * 2`` bytes), XLA's dot (cuBLAS, fp32
    accumulation) multiplies.

    bf16: the tensor scale is folded into the weight, each ``e2m1 * scale * tensor_scale``
    rounded once to bf16 (relative error <= 2^-9, what ``nvfp4_jax.dequantize`` returns),
    so the dot writes the output directly. f16 (whose range the tensor scale could
    overflow): the weight is ``e2m1 * scale`` (exact) and the tensor scale is applied to
    the fp32 product.
    """
    fold = x2d.dtype == jnp.bfloat16
    ts = w.tensor_scale if fold else jnp.float32(1.0)
    wt = dequantize_kernel.dequantize(
        w.data, w.scales, ts, out_dtype=x2d.dtype, interpret=interpret
    )
    dims = (((1,), (1,)), ((), ()))
    if fold and bias is None and jnp.dtype(out_dtype) == x2d.dtype:
        return lax.dot_general(x2d, wt, dims, preferred_element_type=out_dtype)
    acc = lax.dot_general(x2d, wt, dims, preferred_element_type=jnp.float32)
    if not fold:
        acc = acc * w.tensor_scale.astype(jnp.float32)
    if bias is not None:
        acc = acc + bias.astype(jnp.float32)
    return acc.astype(out_dtype)


backends.register("matmul", Backend.XLA)(_xla_matmul)
backends.register("matmul", Backend.PALLAS)(_pallas_matmul)


def _prepare_layout(w: NVFP4Array, dtype, k_group: int | None = None):
    return gemm.prepare_weight(w.data, w.scales, w.tensor_scale, dtype=dtype, k_group=k_group)


def prepare(w: NVFP4Array, dtype: Any = None, *, k_group: int | None = None) -> NVFP4Array:
    """Return ``w`` with the GEMM kernel's weight layout attached.

    The layout (documented in ``kernels.gemm.prepare_weight``) interleaves the codes of
    ``k_group``-wide K groups (None: 128, or 64 where K is not a multiple of 32; 64 or 256
    by choice) into uint16 lanes and stores each K group's block scales feature by feature
    (``[K/k_group, N/16, k_group]``: one vector load per row in the kernel), N and K
    zero-padded. It is built once here and travels with the array through ``jit``/``vmap``,
    so ``matmul``/``linear``/``grouped_matmul`` never rebuild it. ``w`` is a 2-D weight
    quantized along K (either logical orientation) with a scalar tensor scale, or a stack
    of expert weights (logical ``[E, K, N]`` or ``[E, N, K]``, for ``grouped_matmul``) with
    a scalar or ``[E]`` tensor scale.

    ``dtype`` picks the block scales' storage. None (default): compact one-byte scales that
    the kernel widens two at a time with a ``prmt`` and a shift-and-add; they serve bf16 and
    fp16 activations alike. On the H200 they took 0-5% more time than widened scales from
    M = 256 on and at 4096x14336, M <= 16, and 5-11% less at 28672x8192, M <= 16
    (benchmarks/results/scale_pairs-2026-12-02.md; on the H100 before the paired widening:
    scales-2026-11-23.md). bf16 or fp16:
    scales pre-widened to that dtype (two bytes each); activations of the other dtype still
    work (converted exactly for them per call, an XLA op over the scales).
    """
    if not isinstance(w, NVFP4Array):
        raise TypeError(f"w must be an NVFP4Array, got {type(w).__name__}")
    stacked = w.data.ndim == 3 and w.axis in (-1, -2)
    ts_shapes = ((), (w.data.shape[0],)) if stacked else ((),)
    if not (w.data.ndim == 2 or stacked) or jnp.shape(w.tensor_scale) not in ts_shapes:
        raise ValueError(
            "prepare: w must be a 2-D weight with a scalar tensor scale or a stack of expert "
            "weights [E, K, N] quantized along K with a scalar or [E] tensor scale, got logical "
            f"shape {w.shape} blocked on axis {w.axis + w.ndim}, tensor scale shape "
            f"{jnp.shape(w.tensor_scale)}"
        )
    if dtype is not None and jnp.dtype(dtype) not in ACTIVATION_DTYPES:
        raise TypeError(
            "prepare: dtype must be None (compact scales), bfloat16 or float16 (scales"
            f" widened to that activation dtype), got {jnp.dtype(dtype)}"
        )
    out = jax.tree_util.tree_map(lambda v: v, w)
    out.prepared = _prepare_layout(w, dtype, k_group)
    return out


def _validate(x: Any, w: Any, bias: Any, out_dtype: Any, fn: str, axis: int):
    if not isinstance(w, NVFP4Array):
        raise TypeError(
            f"{fn}: w must be an NVFP4Array (use nvfp4_jax.quantize), got {type(w).__name__}"
        )
    x = _checks.as_array(x, "x")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{fn}: x must be bfloat16 or float16, got {x.dtype}")
    if w.data.ndim != 2:
        raise ValueError(
            f"{fn}: w must be a 2-D weight, got logical shape {w.shape} "
            f"(use vmap or grouped_matmul for stacked weights)"
        )
    if w.axis != axis:
        want = (
            "[K, N] quantized along K (quantize(w, axis=0))"
            if axis == -2
            else "[N, K] quantized along K (quantize(w, axis=-1))"
        )
        raise ValueError(
            f"{fn}: w must be {want}; got logical shape {w.shape} blocked on axis {w.axis + 2}"
        )
    n, k = w.data.shape[0], 2 * w.data.shape[1]
    if x.ndim == 0 or x.shape[-1] != k:
        raise ValueError(f"{fn}: x must have shape [..., {k}] to match w {w.shape}, got {x.shape}")
    if jnp.ndim(w.tensor_scale) != 0:
        raise ValueError(
            f"{fn}: w.tensor_scale must be a scalar, got shape {jnp.shape(w.tensor_scale)}"
        )
    if bias is not None:
        bias = _checks.float_array(bias, "bias")
        if bias.shape != (n,):
            raise ValueError(f"{fn}: bias must have shape ({n},), got {bias.shape}")
    out_dtype = x.dtype if out_dtype is None else _checks.output_dtype(out_dtype, "out_dtype")
    return x, n, k, bias, out_dtype


def _linear_in_activations(dispatch: Callable, tangent: Callable, bias_like: bool) -> Callable:
    """``dispatch(x, w, c, out_dtype, backend, config)`` as a ``jax.custom_jvp`` function
    that is differentiable in ``x`` (and in ``c`` if ``bias_like``), the NVFP4 weight ``w``
    a constant (zero cotangent).

    ``tangent(x_dot, w, c_dot if bias_like else c, *, out_dtype, backend)`` is the tangent,
    linear in ``x_dot`` (and ``c_dot``), so JAX transposes it for reverse mode. It runs under
    ``jax.checkpoint``: the dense ``e2m1 · scale`` weight it builds is rebuilt wherever a
    tangent or cotangent needs it and never kept between the forward and the backward pass
    -- the saved state is the NVFP4 weight itself.
    """
    fn = jax.custom_jvp(dispatch, nondiff_argnums=(3, 4, 5))

    @fn.defjvp
    def jvp(out_dtype, backend, config, primals, tangents):
        x, w, c = primals
        y = dispatch(x, w, c, out_dtype, backend, config)
        t = functools.partial(tangent, out_dtype=out_dtype, backend=backend)
        return y, jax.checkpoint(t)(tangents[0], w, tangents[2] if bias_like else c)

    return fn


def _tangent_2d(x_dot, w, bias_dot, *, out_dtype, backend):
    """``(x_dot @ (e2m1 · scale)ᵀ) · tensor_scale + bias_dot``; transposed, the input
    gradient ``g @ (e2m1 · scale) · tensor_scale`` (float32 accumulation, one rounding)."""
    wt = _dense_codes(w, x_dot.dtype, backend)  # [N, K]
    return _dense_product(x_dot, wt, w.tensor_scale, bias_dot, out_dtype)


def _dense_codes(w: NVFP4Array, dtype: Any, backend: str | None = None) -> jax.Array:
    """``e2m1 · block scale`` of ``w`` in storage layout (``[.., N, K]``) as ``dtype``,
    without the tensor scale: exact in bf16 and fp16 (at most 5 significant bits, magnitudes
    from 2^-10 to 2688)."""
    if backends.select("dequantize", backend) is Backend.PALLAS and backends.interpret_pallas():
        backend = Backend.XLA  # the interpreter's host callbacks do not rematerialize
    return backends.call("dequantize", backend, w.data, w.scales, jnp.float32(1.0), dtype)


def _dispatch_2d(x2d, w, bias, out_dtype, backend, config):
    """Dispatch one 2-D product; ``vmap`` over ``x`` folds its batch into M."""

    @jax.custom_batching.custom_vmap
    def run(x2d, w, bias):
        return backends.call("matmul", backend, x2d, w, bias, out_dtype, config)

    @run.def_vmap
    def run_vmap(axis_size, in_batched, x2d, w, bias):
        x_b, w_b, b_b = in_batched
        if any(jax.tree_util.tree_leaves(w_b)) or any(jax.tree_util.tree_leaves(b_b)):
            # A batch of weights: one product per weight, in sequence.
            x_in = x2d if x_b else jnp.broadcast_to(x2d, (axis_size,) + x2d.shape)
            w_in = jax.tree_util.tree_map(
                lambda v, b: v if b else jnp.broadcast_to(v, (axis_size,) + v.shape), w, w_b
            )
            b_in = None
            if bias is not None:
                b_in = (
                    bias
                    if any(jax.tree_util.tree_leaves(b_b))
                    else jnp.broadcast_to(bias, (axis_size,) + bias.shape)
                )
            out = lax.map(
                lambda a: _dispatch_2d(a[0], a[1], a[2], out_dtype, backend, config),
                (x_in, w_in, b_in),
            )
            return out, True
        b, m, k = x2d.shape
        out = run(x2d.reshape(b * m, k), w, bias)
        return out.reshape(b, m, -1), True

    return run(x2d, w, bias)


# One 2-D product, differentiable in x2d and bias.
_matmul_2d = _linear_in_activations(_dispatch_2d, _tangent_2d, bias_like=True)


def matmul(
    x: jax.Array,
    w: NVFP4Array,
    *,
    bias: jax.Array | None = None,
    out_dtype: Any = None,
    backend: str | None = None,
    config: Any = None,
) -> jax.Array:
    """``x @ dequantize(w)`` (+ ``bias``) with float32 accumulation.

    Args:
      x: ``[..., K]`` bf16 or fp16 activations; any leading dims.
      w: ``NVFP4Array`` of logical shape ``[K, N]`` quantized along K
        (``quantize(w_kn, axis=0)``; stored ``[N, K/2]``), scalar tensor scale. Any N, any K
        that is a multiple of 16: the kernel pads and masks inside.
      bias: optional ``[N]``, added in float32.
      out_dtype: bf16, fp16 or fp32; default ``x.dtype``.
      backend: ``"pallas"`` or ``"xla"`` (see :mod:`nvfp4_jax.backends`).
      config: ``"pallas"`` only: a ``kernels.gemm.GemmConfig`` (the fused kernel with that
        tiling) or ``"dequantize"`` (dequantize kernel + XLA dot, which needs a transient
        ``[N, K]`` weight in the activation dtype); None: by shape, see
        :func:`pallas_plan` (the dequantize route from M = 2048 rows on).

    Returns:
      ``[..., N]`` in ``out_dtype``.

    Differentiable in ``x`` and ``bias`` (``jax.grad``, ``jax.jvp``, under ``jit``/``vmap``):
    the input gradient is ``g @ dequantize(w)ᵀ`` (float32 accumulation, ``x``'s dtype). The
    weight is a constant -- its cotangent is zero, as for a frozen (QLoRA-style) base weight;
    train a dense copy through :func:`nvfp4_jax.quant_dequant` to learn the weight itself.
    The backward pass keeps the NVFP4 weight, not a dense copy, between the passes.

    Sharding: rows of ``x`` sharded over an explicit mesh run per device; tensor
    parallelism runs inside ``jax.shard_map`` (:mod:`nvfp4_jax.sharding`).
    """
    return _product(x, w, bias, out_dtype, backend, config, "matmul", axis=-2)


def linear(
    x: jax.Array,
    w: NVFP4Array,
    bias: jax.Array | None = None,
    *,
    out_dtype: Any = None,
    backend: str | None = None,
    config: Any = None,
) -> jax.Array:
    """``F.linear``: ``x @ dequantize(w).T`` (+ ``bias``) for ``w`` of logical shape
    ``[N, K]`` quantized along K (``quantize(w_nk)``). Same storage, kernel and gradients
    as :func:`matmul`."""
    return _product(x, w, bias, out_dtype, backend, config, "linear", axis=-1)


def _product(x, w, bias, out_dtype, backend, config, fn: str, axis: int) -> jax.Array:
    """Validate, flatten the leading dims of ``x``, run the 2-D product, restore them; rows
    of ``x`` sharded over an explicit mesh run per device (``jax.shard_map``)."""
    x, n, k, bias, out_dtype = _validate(x, w, bias, out_dtype, fn, axis)

    def local(x, w, bias):
        out = _matmul_2d(x.reshape(-1, k), w, bias, out_dtype, backend, config)
        return out.reshape(*x.shape[:-1], n)

    sharded = sharding.row_parallel_mesh(fn, x, {"w": w, "bias": bias})
    if sharded is None:
        return local(x, w, bias)
    mesh, spec = sharded
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, P(), P()), out_specs=spec)(x, w, bias)
