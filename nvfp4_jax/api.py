"""Public NVFP4 operations: validate, move the block axis last, dispatch to a backend."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nvfp4_jax import _checks, backends, reference
from nvfp4_jax.array import NVFP4Array
from nvfp4_jax.backends import Backend

backends.register("quantize", Backend.XLA)(reference.quantize)
backends.register("dequantize", Backend.XLA)(reference.dequantize)
backends.register("quant_dequant", Backend.XLA)(reference.quant_dequant)


def _prepare(x: Any, axis: int, fn: str) -> tuple[jax.Array, int]:
    x = _checks.quantizable(x, "x")
    ax = _checks.axis(axis, x.ndim)
    _checks.block_multiple(x.shape[ax], f"{fn}(x of shape {x.shape}, axis={axis})")
    return jnp.moveaxis(x, ax, -1), ax


def _scales(xs: jax.Array, tensor_scale: Any, global_scale: Any) -> tuple[jax.Array, jax.Array]:
    """(quantize-direction global scale, tensor scale) for storage-layout ``xs``."""
    if tensor_scale is not None and global_scale is not None:
        raise ValueError("give tensor_scale or global_scale, not both (one is the inverse of the other)")
    batch = xs.shape[:-2]
    if tensor_scale is not None:
        ts = _checks.positive_finite_scale(tensor_scale, "tensor_scale", batch)
        return jnp.float32(1.0) / ts, ts
    if global_scale is not None:
        gs = _checks.positive_finite_scale(global_scale, "global_scale", batch)
        return gs, jnp.float32(1.0) / gs
    return reference.default_scales(xs)


def quantize(
    x: jax.Array,
    *,
    axis: int = -1,
    tensor_scale: jax.Array | float | None = None,
    global_scale: jax.Array | float | None = None,
    backend: str | None = None,
) -> NVFP4Array:
    """Quantize ``x`` (bf16/fp16/fp32) to NVFP4 along ``axis`` (length a multiple of 16).

    Codes and block scales are bit-identical to vLLM's reference quantizer (see
    ``reference.py`` for the recipe and the NaN/Inf policy).

    Args:
      x: the array; any rank >= 1.
      axis: the block (contracting) axis. For a matmul weight ``[K, N]`` use ``axis=0``;
        storage puts it last (``data [N, K/2]``).
      tensor_scale: the per-tensor multiplier (``x ≈ e2m1·scale·tensor_scale``); a scalar, or
        one value per leading batch dim of the storage layout (e.g. ``[E]`` for experts).
        Quantization then uses ``global_scale = 1/tensor_scale``.
      global_scale: alternatively vLLM's quantize-direction scale (``448·6/amax``), used as
        is, for bit-parity with ``scaled_fp4_quant(x, global_scale)``.
        Neither given: ``global_scale = 448·6/amax(|x|)`` over the finite elements and
        ``tensor_scale = 1/global_scale`` (= ``amax/(448·6)`` up to one rounding; all-zero
        input: both 1).
      backend: ``"xla"`` or ``"pallas"``; see :mod:`nvfp4_jax.backends`.

    Returns:
      An :class:`NVFP4Array` of ``x.shape`` with ``dtype=x.dtype``.
    """
    xs, ax = _prepare(x, axis, "quantize")
    gs, ts = _scales(xs, tensor_scale, global_scale)
    _, impl = backends.implementation("quantize", backend)
    data, scales = impl(xs, gs)
    return NVFP4Array(data, scales, ts, axis=ax, dtype=xs.dtype)


def dequantize(a: NVFP4Array, dtype: Any = jnp.bfloat16, *, backend: str | None = None) -> jax.Array:
    """``e2m1 · scale · tensor_scale`` (float32 math, one rounding) as ``dtype``, in the
    logical shape and axis order of ``a``."""
    if not isinstance(a, NVFP4Array):
        raise TypeError(f"a must be an NVFP4Array, got {type(a).__name__}")
    dtype = _checks.output_dtype(dtype)
    _, impl = backends.implementation("dequantize", backend)
    out = impl(a.data, a.scales, a.tensor_scale, dtype)
    return jnp.moveaxis(out, -1, a.axis)


def quant_dequant(
    x: jax.Array,
    *,
    axis: int = -1,
    tensor_scale: jax.Array | float | None = None,
    global_scale: jax.Array | float | None = None,
    backend: str | None = None,
) -> jax.Array:
    """Fake quantization: NVFP4-round ``x`` and return it in ``x``'s dtype and shape.

    Bit-identical to ``dequantize(quantize(x, ...), x.dtype)``; see
    ``reference.quant_dequant`` for how it relates to vLLM's ``ref_nvfp4_quant_dequant``.
    Arguments as in :func:`quantize`.
    """
    xs, ax = _prepare(x, axis, "quant_dequant")
    gs, ts = _scales(xs, tensor_scale, global_scale)
    _, impl = backends.implementation("quant_dequant", backend)
    return jnp.moveaxis(impl(xs, gs, ts), -1, ax)
