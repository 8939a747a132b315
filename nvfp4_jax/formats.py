"""E2M1 and E4M3 codecs and FP4 nibble packing, in plain ``jnp``.

Glossary used across the package:

* **code** -- a 4-bit E2M1 pattern held in a ``uint8`` (values 0..15): bit 3 is the sign,
  bits 2..0 index the magnitudes ``[0, 0.5, 1, 1.5, 2, 3, 4, 6]``.
* **packed** -- two codes per byte: element ``2i`` in the low nibble, ``2i+1`` in the high
  nibble of byte ``i`` (vLLM, ModelOpt and compressed-tensors agree on this order).
* **scale block** -- the 16 consecutive elements along the block axis that share one
  ``float8_e4m3fn`` block scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import _checks

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
#: ``448 * 6``: the quantize-direction global scale is ``E2M1_E4M3_MAX / amax``.
E2M1_E4M3_MAX = E2M1_MAX * E4M3_MAX

E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)

# Rounding thresholds on |v|.  Even codes win ties (round half to even on the code):
# ``>`` where the lower neighbour is even, ``>=`` where the upper one is.
_E2M1_THRESHOLDS = (
    (0.25, False),  # 0.25 -> 0
    (0.75, True),  # 0.75 -> 1.0
    (1.25, False),  # 1.25 -> 1.0
    (1.75, True),  # 1.75 -> 2.0
    (2.5, False),  # 2.5  -> 2.0
    (3.5, True),  # 3.5  -> 4.0
    (5.0, False),  # 5.0  -> 4.0
)


def float_to_e2m1(x: jax.Array) -> jax.Array:
    """Round floats to E2M1 codes, round-half-to-even, saturating at +-6.

    Args:
      x: any float array.

    Returns:
      ``uint8`` array of ``x.shape`` with codes in 0..15. Negative values that round to
      zero give ``0x8`` (-0), as CUDA's ``cvt.rn.satfinite.e2m1x2``, ModelOpt and
      compressed-tensors do. ``+-inf`` saturate to ``+-6``; NaN gives ``0x0``.
    """
    return encode_e2m1(_checks.float_array(x, "x"))


def encode_e2m1(x: jax.Array) -> jax.Array:
    """Unchecked ``float_to_e2m1`` for internal use (kernels' references, the quantizer)."""
    mag = jnp.abs(x.astype(jnp.float32))
    code = jnp.zeros(x.shape, jnp.uint8)
    for bound, inclusive in _E2M1_THRESHOLDS:
        code = code + (mag >= bound if inclusive else mag > bound).astype(jnp.uint8)
    negative = jnp.signbit(x) & ~jnp.isnan(x)
    return code | (negative.astype(jnp.uint8) << 3)


def e2m1_to_float(codes: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Decode E2M1 codes (``uint8``, low 4 bits used) to ``dtype`` (exact for any float dtype)."""
    return decode_e2m1(_checks.code_array(codes, "codes"), dtype)


def decode_e2m1(codes: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Unchecked ``e2m1_to_float`` for internal use."""
    table = jnp.asarray(E2M1_VALUES)
    mag = table[(codes & 7).astype(jnp.int32)]
    return jnp.where((codes & 8) != 0, -mag, mag).astype(dtype)


def pack_fp4(codes: jax.Array) -> jax.Array:
    """Pack codes ``uint8 [..., K]`` (K even) into bytes ``uint8 [..., K/2]``.

    Element ``2i`` goes to the low nibble of byte ``i``, element ``2i+1`` to the high one.
    """
    codes = _checks.code_array(codes, "codes")
    if codes.ndim == 0 or codes.shape[-1] % 2:
        raise ValueError(
            f"pack_fp4: codes must have an even last dimension, got shape {codes.shape}"
        )
    return pack_codes(codes)


def pack_codes(codes: jax.Array) -> jax.Array:
    """Unchecked ``pack_fp4`` for internal use."""
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed: jax.Array) -> jax.Array:
    """Unpack bytes ``uint8 [..., K/2]`` into codes ``uint8 [..., K]`` (low nibble first)."""
    packed = _checks.dtype_is(packed, "packed", jnp.uint8)
    if packed.ndim == 0:
        raise ValueError("unpack_fp4: packed must have at least one dimension, got a scalar")
    return unpack_codes(packed)


def unpack_codes(packed: jax.Array) -> jax.Array:
    """Unchecked ``unpack_fp4`` for internal use."""
    pairs = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def round_to_e4m3(x: jax.Array) -> jax.Array:
    """Round non-negative float32 values to ``float8_e4m3fn``, RNE, saturating at 448.

    XLA's float32 -> e4m3fn conversion does not saturate (470 becomes NaN), so values are
    clamped to 448 first, as vLLM's reference quantizer does. NaN stays NaN.
    """
    return jnp.minimum(x, E4M3_MAX).astype(jnp.float8_e4m3fn)
