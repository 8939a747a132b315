"""The ``jnp`` oracle of every NVFP4 operation: plain code, no tricks.

These functions work in the *storage layout*: the block axis is last, ``x: [..., K]`` with
``K % 16 == 0``. They assume validated input (the public API in ``api.py`` validates and
moves axes). Every Pallas kernel is tested bit-for-bit against them.

The quantization recipe is vLLM's reference quantizer ``ref_nvfp4_quant``, in float32 and in
this exact order (``gs`` is the quantize-direction global scale, ``448*6/amax`` by default)::

    amax16 = max|x| over each scale block
    s      = e4m3_rne(min(gs * (amax16 * f32(1/6)), 448))
    inv    = 1 / (f32(s) * (1/gs))          (0 where the denominator is 0)
    q      = e2m1_rne(clip(x * inv, -6, 6))

The three divisions go through ``_exact.div_rn`` (integer long division): XLA:GPU's own f32
division is ``div.full`` (up to 2 ulp off), which would move codes that sit on rounding ties.

Non-finite input: a scale block holding NaN or +-inf gets the NaN block scale (E4M3 ``0x7F``)
and all-zero codes, so it dequantizes to NaN; other blocks are unaffected, and the default
global scale is computed from the finite elements only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nvfp4_jax._exact import div_rn
from nvfp4_jax.formats import (
    BLOCK_SIZE,
    E2M1_E4M3_MAX,
    decode_e2m1,
    encode_e2m1,
    pack_codes,
    round_to_e4m3,
    unpack_codes,
)
from nvfp4_jax.layouts import swizzle_scales, unswizzle_scales


def batch_broadcast(v: jax.Array, ndim: int) -> jax.Array:
    """Append unit dims to a scalar or leading-batch scale so it broadcasts over rank ``ndim``."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


@jax.jit
def default_scales(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Default ``(global_scale, tensor_scale)`` of ``x``: ``gs = 448*6/amax``, ``ts = 1/gs``.

    ``amax`` is taken over the finite elements; without a non-zero one both scales are 1.
    ``ts`` is computed as ``1/gs`` (it equals ``amax/(448*6)`` up to one rounding) because
    XLA rewrites ``amax / 2688`` into ``amax * (1/2688)`` under ``vmap``, which would make the
    result depend on batching.
    """
    mag = jnp.abs(x.astype(jnp.float32))
    amax = jnp.max(jnp.where(jnp.isfinite(mag), mag, 0.0))
    ok = amax > 0
    gs = jnp.where(ok, div_rn(jnp.float32(E2M1_E4M3_MAX), jnp.where(ok, amax, 1.0)), 1.0)
    gs = gs.astype(jnp.float32)
    return gs, div_rn(jnp.float32(1.0), gs)


def _blocks_to_codes(x: jax.Array, gs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shared core: ``x [..., K]`` -> (codes ``uint8 [..., K]``, scales ``e4m3 [..., K/16]``)."""
    *lead, k = x.shape
    blocks = x.astype(jnp.float32).reshape(*lead, k // BLOCK_SIZE, BLOCK_SIZE)
    gs = batch_broadcast(gs.astype(jnp.float32), blocks.ndim - 1)
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    # The barrier keeps XLA from reassociating gs * (amax * (1/6)) into amax * (gs * (1/6)).
    scale = round_to_e4m3(gs * jax.lax.optimization_barrier(amax * jnp.float32(1.0 / 6.0)))
    scale = jnp.where(jnp.isfinite(amax), scale, jnp.nan).astype(jnp.float8_e4m3fn)
    denom = scale.astype(jnp.float32) * div_rn(jnp.float32(1.0), gs)
    inv = jnp.where(denom == 0, 0.0, div_rn(jnp.float32(1.0), jnp.where(denom == 0, 1.0, denom)))
    scaled = jnp.clip(blocks * inv[..., None], -6.0, 6.0)
    codes = encode_e2m1(scaled).reshape(*lead, k)
    return codes, scale


@functools.partial(jax.jit, static_argnames=("swizzled",))
def quantize(
    x: jax.Array, global_scale: jax.Array, *, swizzled: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Quantize ``x [..., K]`` (bf16/fp16/fp32) with a quantize-direction global scale.

    Args:
      x: ``[..., K]``, ``K % 16 == 0``.
      global_scale: float32 scalar, or one value per leading batch entry (a prefix of
        ``x.shape[:-1]``): the multiplier ``448*6/amax`` (vLLM's convention).

      swizzled: return the scales in the padded 128x4 layout (``layouts.swizzle_scales``);
        ``x`` must then be 2-D or 3-D.

    Returns:
      ``(data uint8 [..., K/2], scales float8_e4m3fn [..., K/16])``.
    """
    codes, scales = _blocks_to_codes(x, global_scale)
    return pack_codes(codes), swizzle_scales(scales) if swizzled else scales


@functools.partial(jax.jit, static_argnames=("dtype", "swizzled"))
def dequantize(
    data: jax.Array,
    scales: jax.Array,
    tensor_scale: jax.Array,
    dtype: jnp.dtype,
    *,
    swizzled: bool = False,
) -> jax.Array:
    """``data uint8 [..., K/2]``, ``scales e4m3 [..., K/16]`` -> ``dtype [..., K]``.

    With ``swizzled=True`` the scales are in the padded 128x4 layout (2-D or 3-D data).
    ``out = e2m1 * (f32(scale) * tensor_scale)`` in float32, then one cast to ``dtype``
    (vLLM's ``dequantize_to_dtype`` order). ``tensor_scale`` is a scalar or one value per
    leading batch entry.
    """
    values = decode_e2m1(unpack_codes(data))
    *lead, k = values.shape
    if swizzled:
        scales = unswizzle_scales(scales, (*lead, k // BLOCK_SIZE))
    ts = batch_broadcast(tensor_scale.astype(jnp.float32), len(lead) + 1)
    block_scale = scales.astype(jnp.float32) * ts
    out = values.reshape(*lead, k // BLOCK_SIZE, BLOCK_SIZE) * block_scale[..., None]
    return out.reshape(*lead, k).astype(dtype)


@jax.jit
def quant_dequant(x: jax.Array, global_scale: jax.Array, tensor_scale: jax.Array) -> jax.Array:
    """Fake quantization: exactly ``dequantize(quantize(x, global_scale), tensor_scale)`` in
    ``x.dtype``, fused.

    vLLM's ``ref_nvfp4_quant_dequant`` dequantizes with ``scale / global_scale``; we use
    ``scale * tensor_scale`` like :func:`dequantize`, so fake and real quantization agree
    bit for bit (XLA also rewrites a division by a broadcast scalar into a multiplication by
    its reciprocal, so ``s / gs`` would not be reproducible across backends). The two differ
    by at most one float32 ulp of the block's scale factor.
    """
    codes, scales = _blocks_to_codes(x, global_scale)
    *lead, k = x.shape
    ts = batch_broadcast(tensor_scale.astype(jnp.float32), len(lead) + 1)
    block_scale = scales.astype(jnp.float32) * ts
    values = decode_e2m1(codes).reshape(*lead, k // BLOCK_SIZE, BLOCK_SIZE)
    return (values * block_scale[..., None]).reshape(x.shape).astype(x.dtype)
