"""Public NVFP4 operations: validate, move the block axis last, dispatch to a backend."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from nvfp4_jax import _checks, backends, reference
from nvfp4_jax._exact import div_rn
from nvfp4_jax.array import NVFP4Array
from nvfp4_jax.backends import Backend
from nvfp4_jax.formats import E2M1_E4M3_MAX
from nvfp4_jax.kernels import dequantize as dequantize_kernels
from nvfp4_jax.kernels import quantize as quantize_kernels
from nvfp4_jax.layouts import swizzled_shape

backends.register("quantize", Backend.XLA)(reference.quantize)
backends.register("dequantize", Backend.XLA)(reference.dequantize)
backends.register("quant_dequant", Backend.XLA)(reference.quant_dequant)


@backends.register("quantize", Backend.PALLAS)
def _pallas_quantize(x, global_scale, *, swizzled=False):
    return quantize_kernels.quantize(
        x, global_scale, swizzled=swizzled, interpret=backends.interpret_pallas()
    )


@backends.register("dequantize", Backend.PALLAS)
def _pallas_dequantize(data, scales, tensor_scale, dtype, *, swizzled=False):
    return dequantize_kernels.dequantize(
        data,
        scales,
        tensor_scale,
        out_dtype=dtype,
        swizzled=swizzled,
        interpret=backends.interpret_pallas(),
    )


@backends.register("quant_dequant", Backend.PALLAS)
def _pallas_quant_dequant(x, global_scale, tensor_scale):
    return quantize_kernels.quant_dequant(
        x, global_scale, tensor_scale, interpret=backends.interpret_pallas()
    )


def _prepare(x: Any, axis: int, fn: str) -> tuple[jax.Array, int]:
    x = _checks.quantizable(x, "x")
    ax = _checks.axis(axis, x.ndim)
    _checks.block_multiple(x.shape[ax], f"{fn}(x of shape {x.shape}, axis={axis})")
    return jnp.moveaxis(x, ax, -1), ax


def _scales(xs: jax.Array, tensor_scale: Any, global_scale: Any) -> tuple[jax.Array, jax.Array]:
    """(quantize-direction global scale, tensor scale) for storage-layout ``xs``."""
    if tensor_scale is not None and global_scale is not None:
        raise ValueError(
            "give tensor_scale or global_scale, not both (one is the inverse of the other)"
        )
    batch = xs.shape[:-2]
    if tensor_scale is not None:
        ts = _checks.positive_finite_scale(tensor_scale, "tensor_scale", batch)
        return div_rn(jnp.float32(1.0), ts), ts
    if global_scale is not None:
        gs = _checks.positive_finite_scale(global_scale, "global_scale", batch)
        return gs, div_rn(jnp.float32(1.0), gs)
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
    data, scales = backends.call("quantize", backend, xs, gs)
    return NVFP4Array(data, scales, ts, axis=ax, dtype=xs.dtype)


def dequantize(
    a: NVFP4Array, dtype: Any = jnp.bfloat16, *, backend: str | None = None
) -> jax.Array:
    """``e2m1 · scale · tensor_scale`` (float32 math, one rounding) as ``dtype``, in the
    logical shape and axis order of ``a``."""
    if not isinstance(a, NVFP4Array):
        raise TypeError(f"a must be an NVFP4Array, got {type(a).__name__}")
    dtype = _checks.output_dtype(dtype)
    out = backends.call("dequantize", backend, a.data, a.scales, a.tensor_scale, dtype)
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
    Differentiable with a straight-through gradient: the cotangent passes unchanged where
    ``|x| <= 6·448·tensor_scale`` (the representable range) and is zero where the value
    saturates. Arguments as in :func:`quantize`.
    """
    xs, ax = _prepare(x, axis, "quant_dequant")
    gs, ts = _scales(xs, tensor_scale, global_scale)
    return jnp.moveaxis(_fake_quant(xs, gs, ts, backend), -1, ax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fake_quant(xs: jax.Array, gs: jax.Array, ts: jax.Array, backend: str | None) -> jax.Array:
    return backends.call("quant_dequant", backend, xs, gs, ts)


def _fake_quant_fwd(xs, gs, ts, backend):
    return _fake_quant(xs, gs, ts, backend), (xs, gs, ts)


def _fake_quant_bwd(backend, residuals, g):
    xs, gs, ts = residuals
    # A relative slack of 2^-16 keeps the tensor's own amax inside despite the rounding of
    # ts = 1/gs; real saturation (a tensor scale chosen too small) is far larger.
    limit = reference.batch_broadcast(ts * jnp.float32(E2M1_E4M3_MAX * (1 + 2.0**-16)), xs.ndim)
    inside = jnp.abs(xs.astype(jnp.float32)) <= limit
    return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(gs), jnp.zeros_like(ts)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def scaled_fp4_quant(
    x: jax.Array,
    global_scale: jax.Array | float,
    *,
    swizzled: bool = True,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """vLLM's ``scaled_fp4_quant``: quantize the last axis of ``x [..., K]`` with a
    quantize-direction ``global_scale`` (``448·6/amax``) and return raw tensors.

    Returns ``(data uint8 [M, K/2], scales float8_e4m3fn)`` with ``M = prod(x.shape[:-1])``;
    the scales are ``[M, K/16]``, or with ``swizzled=True`` (vLLM's
    ``is_sf_swizzled_layout``) the zero-padded 128x4 layout ``[round_up(M, 128),
    round_up(K/16, 4)]``.
    """
    x = _checks.quantizable(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension")
    _checks.block_multiple(x.shape[-1], f"scaled_fp4_quant(x of shape {x.shape})", "last axis")
    gs = _checks.positive_finite_scale(global_scale, "global_scale", ())
    x2 = x.reshape(-1, x.shape[-1])
    return backends.call("quantize", backend, x2, gs, swizzled=bool(swizzled))


def dequantize_to_dtype(
    data: jax.Array,
    scales: jax.Array,
    tensor_scale: jax.Array | float,
    dtype: Any = jnp.bfloat16,
    *,
    swizzled: bool = False,
    backend: str | None = None,
) -> jax.Array:
    """Dequantize raw tensors (vLLM's ``dequantize_to_dtype``, post-2026 convention).

    Args:
      data: ``uint8 [M, K/2]`` or ``[B, M, K/2]``.
      scales: ``float8_e4m3fn`` ``[.., M, K/16]``, or with ``swizzled=True`` the padded 128x4
        layout ``[.., round_up(M, 128), round_up(K/16, 4)]``.
      tensor_scale: the dequantize-direction multiplier (``1/global_scale``): a scalar, or
        ``[B]`` for 3-D data (one per batch entry, vLLM's ``has_batch_global_scale``).
      dtype: bf16, fp16 or fp32 output.
    """
    data = _checks.dtype_is(data, "data", jnp.uint8)
    if data.ndim not in (2, 3):
        raise ValueError(f"data must be 2-D [M, K/2] or 3-D [B, M, K/2], got shape {data.shape}")
    scales = _checks.as_array(scales, "scales")
    if scales.dtype != jnp.dtype(jnp.float8_e4m3fn):
        raise TypeError(f"scales must have dtype float8_e4m3fn, got {scales.dtype}")
    plain = data.shape[:-1] + (2 * data.shape[-1] // 16,)
    _checks.block_multiple(2 * data.shape[-1], "data", "unpacked last axis (2 * data.shape[-1])")
    want = swizzled_shape(plain) if swizzled else plain
    if scales.shape != want:
        layout = "swizzled 128x4" if swizzled else "plain"
        raise ValueError(
            f"{layout} scales for data {data.shape} must have shape {want}, got {scales.shape}"
        )
    ts = _checks.positive_finite_scale(tensor_scale, "tensor_scale", data.shape[:-2])
    dtype = _checks.output_dtype(dtype)
    return backends.call("dequantize", backend, data, scales, ts, dtype, swizzled=bool(swizzled))
