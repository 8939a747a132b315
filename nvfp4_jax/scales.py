"""Scale conventions: vLLM's global scale vs our tensor scale, and Marlin's scale formats.

Two directions of the per-tensor scalar exist in the wild; every function here names which
one it takes:

* **tensor scale** (ours; ModelOpt/Quark ``weight_scale_2``, ``input_scale``): the
  *multiplier*, ``x ≈ e2m1 · block_scale · tensor_scale``, ``amax / (6·448)`` by default.
* **global scale** (vLLM kernels, compressed-tensors ``weight_global_scale``): the
  *quantize-direction* divisor, ``448·6 / amax`` -- the inverse.

Marlin (vLLM's weight-only FP4 CUDA kernel) stores block scales as a special sign-less
**S0E5M3** byte: the high byte of the fp16 value ``scale · 2^7 · scale_factor`` shifted left
by one bit (5 exponent bits, 3 mantissa bits), after swapping the middle two of every four
scales (the byte order its decoder reads). ``scale_factor`` is a power of two chosen so every
non-zero ``scale · 2^7 · scale_factor >= 2`` (the top exponent bit is then always 1, which
the kernel's bf16 decode relies on). Its global scale carries the E2M1 exponent-bias
correction ``2^(bias - 7)`` (fp16: ``2^7``, bf16: ``2^119``) divided by ``scale_factor``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from nvfp4_jax import _checks
from nvfp4_jax._exact import div_rn

MARLIN_SCALE_SHIFT = 7  # the 2^7 folded into Marlin's S0E5M3 block scales


def tensor_scale_from_global_scale(global_scale: jax.Array) -> jax.Array:
    """vLLM/compressed-tensors ``global_scale`` (``448·6/amax``) -> our ``tensor_scale``."""
    gs = _checks.positive_finite_scale(global_scale, "global_scale", None)
    return div_rn(jnp.float32(1.0), gs)


def global_scale_from_tensor_scale(tensor_scale: jax.Array) -> jax.Array:
    """Our ``tensor_scale`` (``amax/(448·6)``) -> vLLM's quantize-direction ``global_scale``."""
    ts = _checks.positive_finite_scale(tensor_scale, "tensor_scale", None)
    return div_rn(jnp.float32(1.0), ts)


def _marlin_input(scales: jax.Array) -> jax.Array:
    scales = _checks.as_array(scales, "scales")
    if scales.dtype != jnp.dtype(jnp.float8_e4m3fn):
        raise TypeError(f"scales must have dtype float8_e4m3fn, got {scales.dtype}")
    if scales.ndim != 2 or scales.size % 4:
        raise ValueError(
            f"scales must be 2-D with a size divisible by 4 (Marlin swaps bytes in groups of 4), "
            f"got shape {scales.shape}"
        )
    return scales


def marlin_compute_scale_factor(scales: jax.Array) -> jax.Array:
    """The power of two ``>= 1`` that lifts every non-zero ``scale · 2^7`` to ``>= 2``.

    Pass the concatenated scales of all experts to get the factor an MoE layer shares.
    Returns a float32 scalar (vLLM's ``_nvfp4_compute_scale_factor``).
    """
    scales = _checks.as_array(scales, "scales")
    if scales.dtype != jnp.dtype(jnp.float8_e4m3fn):
        raise TypeError(f"scales must have dtype float8_e4m3fn, got {scales.dtype}")
    v = scales.astype(jnp.float32) * 2.0**MARLIN_SCALE_SHIFT
    smallest = jnp.min(jnp.where(v > 0, v, jnp.inf))
    factor = jnp.exp2(jnp.ceil(jnp.log2(2.0 / smallest)))
    return jnp.where(smallest < 2.0, factor, 1.0).astype(jnp.float32)


def marlin_process_scales(
    scales: jax.Array, scale_factor: float | jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """E4M3 block scales ``[R, C]`` (already in Marlin's row/column order) -> S0E5M3 bytes.

    vLLM's ``nvfp4_marlin_process_scales``. Returns ``(processed float8_e4m3fn [R, C],
    scale_factor float32)``: the bytes are not E4M3 values, they are viewed as e4m3 as vLLM
    does. Under ``jit`` a scale range too wide for fp16 (``scale · 2^7 · scale_factor >
    65504``) cannot be detected and gives inf bytes, as in vLLM; eagerly it raises
    ``ValueError``. ``scale_factor=None`` computes it (:func:`marlin_compute_scale_factor`); give it to
    share one factor across experts. Divide the global scale by it
    (:func:`marlin_process_global_scale` does).
    """
    scales = _marlin_input(scales)
    if scale_factor is None:
        scale_factor = marlin_compute_scale_factor(scales)
    sf = _checks.positive_finite_scale(scale_factor, "scale_factor", ())
    r, c = scales.shape
    s16 = scales.astype(jnp.float16).reshape(-1, 4)[:, jnp.array([0, 2, 1, 3])].reshape(r, c)
    s16 = (s16.astype(jnp.float32) * sf).astype(jnp.float16) * jnp.float16(2.0**MARLIN_SCALE_SHIFT)
    if _checks.is_concrete(s16) and not bool(jnp.all(jnp.isfinite(s16))):
        raise ValueError(
            f"scales span too wide a range for Marlin's S0E5M3 format: max scale "
            f"{float(jnp.max(scales.astype(jnp.float32)))} * 2^7 * scale_factor {float(sf)} "
            f"overflows float16 (the smallest non-zero scale forces the factor)"
        )
    bits = lax.bitcast_convert_type(s16, jnp.uint16)
    # (bits << 1) keeps the high byte [e4..e0 m2 m1 m0]: the sign is known to be 0.
    high = ((bits >> 7) & 0xFF).astype(jnp.uint8)
    return lax.bitcast_convert_type(high, jnp.float8_e4m3fn), sf


def marlin_decode_scales(processed: jax.Array, dtype: jnp.dtype = jnp.float16) -> jax.Array:
    """Decode S0E5M3 bytes the way Marlin's kernel does, undoing the byte swap.

    Returns ``scale · 2^7 · scale_factor`` in ``dtype``. ``float16`` is exact for every byte.
    ``bfloat16`` moves the top exponent bit onto bf16's top exponent bit: exact only when that
    bit is 1, i.e. the value is ``>= 2`` -- the reason ``scale_factor`` exists.
    """
    processed = _marlin_input(processed)
    r, c = processed.shape
    q = lax.bitcast_convert_type(processed, jnp.uint8).astype(jnp.uint16)
    if jnp.dtype(dtype) == jnp.float16:
        bits = q << 7
    elif jnp.dtype(dtype) == jnp.bfloat16:
        bits = ((q & 0x80) << 7) | ((q & 0x7F) << 4)
    else:
        raise TypeError(f"dtype must be float16 or bfloat16, got {jnp.dtype(dtype)}")
    vals = lax.bitcast_convert_type(bits.astype(jnp.uint16), dtype)
    return vals.reshape(-1, 4)[:, jnp.array([0, 2, 1, 3])].reshape(r, c)


def marlin_process_global_scale(
    tensor_scale: jax.Array, dtype: jnp.dtype, scale_factor: float | jax.Array = 1.0
) -> jax.Array:
    """Our tensor scale -> Marlin's float32 global scale for activations of ``dtype``.

    ``tensor_scale · 2^(bias - 7) / scale_factor`` where ``bias`` is the exponent-bias gap
    between E2M1 and the activation type (fp16: 14, bf16: 126): Marlin decodes a code to
    ``e2m1 · 2^-bias`` and its scale to ``scale · 2^7 · scale_factor``
    (vLLM's ``nvfp4_marlin_process_global_scale`` plus the ``/ scale_factor``).
    """
    ts = _checks.positive_finite_scale(tensor_scale, "tensor_scale", None)
    sf = _checks.positive_finite_scale(scale_factor, "scale_factor", ())
    d = jnp.dtype(dtype)
    if d == jnp.float16:
        target_exponent = 5
    elif d == jnp.bfloat16:
        target_exponent = 8
    else:
        raise TypeError(f"dtype must be float16 or bfloat16, got {d}")
    bias = 2 ** (target_exponent - 1) - 2 ** (2 - 1)
    return ts * jnp.float32(2.0 ** (bias - MARLIN_SCALE_SHIFT)) / sf
