"""Correctly rounded float32 division built from integer ops.

XLA:GPU lowers f32 division to ``div.full.f32`` (up to 2 ulp off) and XLA's simplifier turns
``a / broadcast(b)`` into ``a * (1/b)``, so a plain ``/`` gives backend-dependent bits. The
NVFP4 recipe divides three times (``448·6/amax``, ``1/gs``, ``1/(s·(1/gs))``); this module
computes those quotients by restoring long division of the 24-bit significands in uint32,
which every backend evaluates exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_QUOTIENT_BITS = 26  # 24 significand bits, a guard bit and one for the [0.5, 1) case


@jax.jit
def div_rn(a: jax.Array, b: jax.Array) -> jax.Array:
    """IEEE round-to-nearest-even ``a / b`` for positive normal float32 ``a`` and ``b``.

    Where the inputs are zero, subnormal, non-finite, or the quotient leaves the normal
    range, the result is XLA's own ``a / b`` (callers mask those cases anyway).
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    a, b = jnp.broadcast_arrays(a, b)
    ab, bb = lax.bitcast_convert_type(a, jnp.uint32), lax.bitcast_convert_type(b, jnp.uint32)
    ea, eb = (ab >> 23) & 0xFF, (bb >> 23) & 0xFF
    ma, mb = (ab & 0x7FFFFF) | 0x800000, (bb & 0x7FFFFF) | 0x800000

    def step(_, carry):  # one bit of quo = floor(2^25 * ma / mb); rem = the remainder
        quo, rem = carry
        bit = rem >= mb
        return (quo << 1) | bit.astype(jnp.uint32), jnp.where(bit, rem - mb, rem) << 1

    quo, rem = lax.fori_loop(0, _QUOTIENT_BITS, step, (jnp.zeros_like(ma), ma))
    # ma/mb is in (0.5, 2): quo has 26 bits when ma >= mb, else 25.
    wide = quo >= (1 << 25)
    quo = jnp.where(wide, quo, quo << 1)  # now 26 bits: 1.xxx (23 frac) + guard + extra
    sticky = (rem != 0) | ((quo & 1) != 0)
    guard = (quo >> 1) & 1
    mant = quo >> 2  # 24 bits
    up = (guard == 1) & (sticky | ((mant & 1) == 1))
    mant = mant + up.astype(jnp.uint32)
    carry = mant >= (1 << 24)
    mant = jnp.where(carry, mant >> 1, mant)
    exp = (
        ea.astype(jnp.int32)
        - eb.astype(jnp.int32)
        + 127
        - 1
        + wide.astype(jnp.int32)
        + carry.astype(jnp.int32)
    )
    bits = (exp.astype(jnp.uint32) << 23) | (mant & 0x7FFFFF)
    exact = lax.bitcast_convert_type(bits, jnp.float32)
    ok = (ea > 0) & (ea < 255) & (eb > 0) & (eb < 255) & (exp > 0) & (exp < 255)
    return jnp.where(ok, exact, a / b)
