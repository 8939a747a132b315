"""Correctly rounded float32 division from integer ops, vs numpy's IEEE division."""

import jax
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from nvfp4_jax._exact import div_rn

positive_normal = st.floats(
    min_value=float(np.float32(1e-30)),
    max_value=float(np.float32(1e30)),
    width=32,
    allow_subnormal=False,
)


@given(st.lists(st.tuples(positive_normal, positive_normal), min_size=1, max_size=64))
def test_matches_ieee_division(pairs):
    a = np.array([p[0] for p in pairs], np.float32)
    b = np.array([p[1] for p in pairs], np.float32)
    with np.errstate(over="ignore", under="ignore"):
        want = a / b
    normal = np.isfinite(want) & (want >= np.finfo(np.float32).tiny)  # div_rn's domain
    np.testing.assert_array_equal(np.asarray(jax.jit(div_rn)(a, b))[normal], want[normal])


def test_reciprocals_of_every_significand_near_one(rng):
    b = (1 + np.arange(0, 2**23, 97, dtype=np.float64) / 2**23).astype(np.float32)
    b = b * np.float32(2.0) ** rng.integers(-40, 40, b.shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(div_rn(np.float32(1), b)), np.float32(1) / b)
    np.testing.assert_array_equal(np.asarray(div_rn(np.float32(2688), b)), np.float32(2688) / b)
