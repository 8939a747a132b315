"""Swizzled 128x4 scale layout and CUTLASS padding."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nvfp4_jax as nv


def _scales(rng, shape):
    bytes_ = rng.integers(1, 0x7F, size=shape, dtype=np.uint8)  # positive finite e4m3
    return bytes_.view(ml_dtypes.float8_e4m3fn)


@given(
    b=st.one_of(st.none(), st.integers(1, 3)),
    m=st.integers(1, 300),
    c=st.integers(1, 13),
    seed=st.integers(0, 2**32 - 1),
)
def test_swizzle_roundtrip_and_offsets(b, m, c, seed):
    rng = np.random.default_rng(seed)
    shape = (m, c) if b is None else (b, m, c)
    s = _scales(rng, shape)
    sw = nv.swizzle_scales(jnp.asarray(s))
    mp, cp = -(-m // 128) * 128, -(-c // 4) * 4
    assert sw.shape == shape[:-2] + (mp, cp) and sw.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(sw).view(np.uint8), oracle.swizzle(s.view(np.uint8)))
    back = nv.unswizzle_scales(sw, shape)
    np.testing.assert_array_equal(np.asarray(back).view(np.uint8), s.view(np.uint8))


def test_swizzle_padding_is_zero(rng):
    s = _scales(rng, (130, 5))
    sw = np.asarray(nv.swizzle_scales(jnp.asarray(s))).view(np.uint8)
    assert sw.shape == (256, 8)
    assert np.count_nonzero(sw) == 130 * 5


def test_swizzle_bad_inputs():
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        nv.swizzle_scales(jnp.zeros((4, 4), jnp.float32))
    with pytest.raises(ValueError, match="2-D"):
        nv.swizzle_scales(jnp.zeros((4,), jnp.float8_e4m3fn))
    sw = nv.swizzle_scales(jnp.zeros((4, 4), jnp.float8_e4m3fn))
    with pytest.raises(ValueError, match=r"must have shape \(256, 4\)"):
        nv.unswizzle_scales(sw, (200, 4))
    with pytest.raises(ValueError, match="rank"):
        nv.unswizzle_scales(sw, (1, 4, 4))


def test_cutlass_padding_and_slice(rng):
    data = jnp.asarray(rng.integers(0, 256, (50, 24), dtype=np.uint8))  # N=50, K=48
    padded, pad_bytes = nv.pad_weight_for_cutlass(data)
    assert padded.shape == (64, 32) and pad_bytes == 8
    np.testing.assert_array_equal(np.asarray(padded[:50, :24]), np.asarray(data))
    assert not np.asarray(padded[50:]).any() and not np.asarray(padded[:, 24:]).any()
    act = jnp.asarray(rng.integers(0, 256, (3, 7, 24), dtype=np.uint8))
    pa = nv.pad_activation_for_cutlass(act, pad_bytes)
    assert pa.shape == (3, 7, 32) and not np.asarray(pa[..., 24:]).any()
    aligned, zero = nv.pad_weight_for_cutlass(padded)
    assert zero == 0 and aligned.shape == padded.shape
    assert nv.slice_output(jnp.ones((3, 64)), 50).shape == (3, 50)
    with pytest.raises(ValueError, match="2-D"):
        nv.pad_weight_for_cutlass(act)
    with pytest.raises(ValueError, match="n must be in 1..64"):
        nv.slice_output(jnp.ones((3, 64)), 65)
    with pytest.raises(ValueError, match="pad_bytes"):
        nv.pad_activation_for_cutlass(act, -1)
