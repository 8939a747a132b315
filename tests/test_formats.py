"""E2M1 codec and nibble packing vs ml_dtypes (property tests)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import nvfp4_jax as nv

TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
TIE_RESULT = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ties_round_half_to_even(sign):
    x = jnp.asarray(np.array(TIES, np.float32) * sign)
    got = np.asarray(nv.e2m1_to_float(nv.float_to_e2m1(x)))
    np.testing.assert_array_equal(got, np.array(TIE_RESULT, np.float32) * sign)


def test_negative_underflow_is_minus_zero_and_saturation():
    x = jnp.asarray([-0.1, -0.25, 0.1, 7.0, 100.0, -1e30, np.inf, -np.inf, np.nan], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(nv.float_to_e2m1(x)), [0x8, 0x8, 0x0, 0x7, 0x7, 0xF, 0x7, 0xF, 0x0]
    )


@given(
    hnp.arrays(
        np.float32, hnp.array_shapes(max_dims=3, max_side=9), elements=st.floats(-20, 20, width=32)
    )
)
def test_float_to_e2m1_matches_ml_dtypes(x):
    np.testing.assert_array_equal(
        np.asarray(nv.float_to_e2m1(jnp.asarray(x))), oracle.e2m1_codes(x)
    )


@given(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
def test_decode_all_codes(dtype):
    codes = jnp.arange(16, dtype=jnp.uint8)
    got = np.asarray(nv.e2m1_to_float(codes, dtype).astype(jnp.float32))
    want = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got[8]), True)


@given(
    hnp.arrays(
        np.uint8,
        st.tuples(st.integers(1, 4), st.integers(1, 12)).map(lambda s: (s[0], 2 * s[1])),
        elements=st.integers(0, 15),
    )
)
def test_pack_unpack_roundtrip(codes):
    packed = nv.pack_fp4(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(packed), oracle.pack(codes))
    np.testing.assert_array_equal(np.asarray(nv.unpack_fp4(packed)), codes)


@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=7)))
def test_unpack_pack_roundtrip(packed):
    np.testing.assert_array_equal(
        np.asarray(nv.pack_fp4(nv.unpack_fp4(jnp.asarray(packed)))), packed
    )


def test_low_nibble_is_even_element_and_matches_bitcast():
    packed = jnp.asarray([0x21, 0xF8], jnp.uint8)
    np.testing.assert_array_equal(np.asarray(nv.unpack_fp4(packed)), [1, 2, 8, 15])
    # XLA's own u8 -> float4 bitcast puts element 0 in the low nibble too.
    f4 = jax.lax.bitcast_convert_type(packed, jnp.float4_e2m1fn).reshape(-1)
    np.testing.assert_array_equal(
        np.asarray(f4.astype(jnp.float32)), np.asarray(nv.e2m1_to_float(nv.unpack_fp4(packed)))
    )


def test_bad_inputs():
    with pytest.raises(TypeError, match="codes must have dtype uint8"):
        nv.pack_fp4(jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="even last dimension"):
        nv.pack_fp4(jnp.zeros(3, jnp.uint8))
    with pytest.raises(ValueError, match="4-bit codes"):
        nv.pack_fp4(jnp.asarray([1, 16], jnp.uint8))
    with pytest.raises(TypeError, match="floating dtype"):
        nv.float_to_e2m1(jnp.zeros(4, jnp.int32))
    with pytest.raises(TypeError, match="packed must have dtype uint8"):
        nv.unpack_fp4(jnp.zeros(4, jnp.float32))
    with pytest.raises(ValueError, match="scalar"):
        nv.unpack_fp4(jnp.uint8(3))
    with pytest.raises(TypeError, match="must be an array"):
        nv.float_to_e2m1("nope")
