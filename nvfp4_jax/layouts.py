"""Block-scale layouts and the CUTLASS alignment padding.

**Swizzled 128x4 layout** (CUTLASS / FlashInfer, vLLM's ``swizzle_blockscale``): scales
``[B, M, C]`` (``C = K/16`` scale columns) are zero-padded to ``M_pad = round_up(M, 128)`` and
``C_pad = round_up(C, 4)``, reshaped ``(B, M_pad/128, 4, 32, C_pad/4, 4)`` and permuted
``(0, 1, 4, 3, 2, 5)``. The byte of scale ``(m, c)`` lands at::

    ((m >> 7) * (C_pad / 4) + (c >> 2)) * 512 + (m & 31) * 16 + ((m >> 5) & 3) * 4 + (c & 3)

of the flattened ``[M_pad, C_pad]`` result.

**CUTLASS padding**: the FP4 GEMM wants N and K multiples of 32. Weights ``[N, K/2]`` are
padded with zero bytes, activations get the same number of zero bytes on K, and the output
is sliced back to N columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nvfp4_jax import _checks


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _scales(scales, name: str) -> jax.Array:
    scales = _checks.as_array(scales, name)
    if scales.dtype != jnp.dtype(jnp.float8_e4m3fn):
        raise TypeError(f"{name} must have dtype float8_e4m3fn, got {scales.dtype}")
    if scales.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be 2-D [M, K/16] or 3-D [B, M, K/16], got shape {scales.shape}"
        )
    return scales


def swizzled_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the swizzled layout of scales of (unpadded) ``shape``."""
    *b, m, c = shape
    return (*b, round_up(m, 128), round_up(c, 4))


def swizzle_scales(scales: jax.Array) -> jax.Array:
    """Plain ``e4m3 [M, C]`` or ``[B, M, C]`` scales -> the padded, swizzled 128x4 layout
    ``[M_pad, C_pad]`` / ``[B, M_pad, C_pad]`` (padding is zero)."""
    return swizzle(_scales(scales, "scales"))


def swizzle(scales: jax.Array) -> jax.Array:
    """Unchecked :func:`swizzle_scales` for ``[..., M, C]`` of any byte dtype (kernels)."""
    *lead, m, c = scales.shape
    mp, cp = round_up(m, 128), round_up(c, 4)
    x = jnp.pad(scales.reshape(-1, m, c), ((0, 0), (0, mp - m), (0, cp - c)))
    x = x.reshape(-1, mp // 128, 4, 32, cp // 4, 4).transpose(0, 1, 4, 3, 2, 5)
    return x.reshape(*lead, mp, cp)


def unswizzle(swizzled: jax.Array, rows: int, cols: int) -> jax.Array:
    """Unchecked :func:`unswizzle_scales`: ``[..., M_pad, C_pad]`` -> ``[..., rows, cols]``."""
    *lead, mp, cp = swizzled.shape
    x = swizzled.reshape(-1, mp // 128, cp // 4, 32, 4, 4).transpose(0, 1, 4, 3, 2, 5)
    return x.reshape(*lead, mp, cp)[..., :rows, :cols]


def unswizzle_scales(swizzled: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`swizzle_scales`: ``shape`` is the unpadded ``(M, C)`` / ``(B, M, C)``."""
    swizzled = _scales(swizzled, "swizzled")
    shape = tuple(int(d) for d in shape)
    if len(shape) != swizzled.ndim:
        raise ValueError(f"shape {shape} must have the rank of swizzled {swizzled.shape}")
    if swizzled.shape != swizzled_shape(shape):
        raise ValueError(
            f"swizzled scales for shape {shape} must have shape {swizzled_shape(shape)}, "
            f"got {swizzled.shape}"
        )
    return unswizzle(swizzled, shape[-2], shape[-1])


def pad_weight_for_cutlass(data: jax.Array, alignment: int = 32) -> tuple[jax.Array, int]:
    """Pad packed weights ``uint8 [N, K/2]`` with zero bytes so N and K are multiples of
    ``alignment``. Returns ``(padded, pad_bytes)``: ``pad_bytes`` is the K padding in bytes,
    to pass to :func:`pad_activation_for_cutlass`."""
    data = _checks.dtype_is(data, "data", jnp.uint8)
    if data.ndim != 2:
        raise ValueError(f"data must be 2-D packed weights [N, K/2], got shape {data.shape}")
    if alignment <= 0 or alignment % 2:
        raise ValueError(f"alignment must be a positive even number of elements, got {alignment}")
    n, kb = data.shape
    pad_rows = round_up(n, alignment) - n
    pad_bytes = (round_up(2 * kb, alignment) - 2 * kb) // 2
    return jnp.pad(data, ((0, pad_rows), (0, pad_bytes))), pad_bytes


def pad_activation_for_cutlass(data: jax.Array, pad_bytes: int) -> jax.Array:
    """Pad packed activations ``uint8 [..., K/2]`` on K by ``pad_bytes`` zero bytes."""
    data = _checks.dtype_is(data, "data", jnp.uint8)
    if not isinstance(pad_bytes, int) or pad_bytes < 0:
        raise ValueError(f"pad_bytes must be a non-negative int, got {pad_bytes!r}")
    if pad_bytes == 0:
        return data
    return jnp.pad(data, [(0, 0)] * (data.ndim - 1) + [(0, pad_bytes)])


def slice_output(out: jax.Array, n: int) -> jax.Array:
    """Drop the N padding of a GEMM output ``[..., N_pad]`` -> ``[..., n]``."""
    out = _checks.as_array(out, "out")
    if out.ndim == 0 or not 0 < n <= out.shape[-1]:
        raise ValueError(f"n must be in 1..{out.shape[-1] if out.ndim else 0}, got {n}")
    return out[..., :n]
