"""Scale-convention converters vs a direct float computation of what they encode."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest

import nvfp4_jax as nv

E4M3 = ml_dtypes.float8_e4m3fn
ALL_POSITIVE_E4M3 = np.arange(1, 0x7F, dtype=np.uint8).view(E4M3)  # 126 finite positives


def test_global_and_tensor_scale_are_inverses():
    ts = jnp.asarray([1e-3, 0.5, 3.0], jnp.float32)
    gs = nv.global_scale_from_tensor_scale(ts)
    np.testing.assert_array_equal(np.asarray(gs), np.float32(1) / np.asarray(ts))
    np.testing.assert_array_equal(
        np.asarray(nv.tensor_scale_from_global_scale(gs)), np.float32(1) / np.asarray(gs)
    )
    with pytest.raises(ValueError, match="global_scale must be finite and > 0"):
        nv.tensor_scale_from_global_scale(0.0)


def _unswap(x):
    r, c = x.shape
    return x.reshape(-1, 4)[:, [0, 2, 1, 3]].reshape(r, c)


@pytest.mark.parametrize("with_zero", [False, True])
def test_marlin_scales_fp16_encode_exactly(with_zero):
    # Every positive E4M3 up to 56: with factor 8, 56 * 2^7 * 8 is the largest that fits fp16.
    fits = ALL_POSITIVE_E4M3[ALL_POSITIVE_E4M3.astype(np.float32) <= 56]
    s = np.resize(fits, 8 * 16).reshape(8, 16)
    if with_zero:
        s[0, :4] = 0
    proc, sf = nv.marlin_process_scales(jnp.asarray(s))
    sf = float(sf)
    # Smallest positive E4M3 is 2^-9: 2^-9 * 2^7 = 2^-2 < 2, so the factor is 2^3.
    assert sf == 8.0
    # Direct computation of what each byte encodes: the fp16 top byte of s * 2^7 * sf, <<1.
    byte = np.asarray(proc).view(np.uint8)
    value16 = (byte.astype(np.uint16) << 7).view(np.float16).astype(np.float64)
    np.testing.assert_array_equal(_unswap(value16), s.astype(np.float64) * 2**7 * sf)
    dec = np.asarray(nv.marlin_decode_scales(proc, jnp.float16)).astype(np.float64)
    np.testing.assert_array_equal(dec, s.astype(np.float64) * 2**7 * sf)
    # bf16 decode is exact because the factor lifted every non-zero value to >= 2.
    dec_bf16 = np.asarray(nv.marlin_decode_scales(proc, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(dec_bf16.astype(np.float64), s.astype(np.float64) * 2**7 * sf)


def test_marlin_shared_scale_factor_and_bf16_failure_without_it():
    s = ALL_POSITIVE_E4M3[:8].reshape(2, 4)  # includes subnormals
    proc, sf = nv.marlin_process_scales(jnp.asarray(s), scale_factor=1.0)
    assert float(sf) == 1.0
    dec16 = np.asarray(nv.marlin_decode_scales(proc, jnp.float16)).astype(np.float64)
    np.testing.assert_array_equal(dec16, s.astype(np.float64) * 2**7)
    dec_bf16 = np.asarray(nv.marlin_decode_scales(proc, jnp.bfloat16).astype(jnp.float32))
    assert (dec_bf16 != s.astype(np.float32) * 2**7).any()  # why the factor exists
    normal = np.full((1, 4), 1.0, np.float32).astype(E4M3)
    assert float(nv.marlin_compute_scale_factor(jnp.asarray(normal))) == 1.0
    assert float(nv.marlin_compute_scale_factor(jnp.zeros((1, 4), jnp.float8_e4m3fn))) == 1.0


@pytest.mark.parametrize("dtype,bias", [(jnp.float16, 14), (jnp.bfloat16, 126)])
def test_marlin_global_scale_and_full_dequant(rng, dtype, bias):
    """Emulate Marlin's decode: code nibble into the low exponent bits (e2m1 · 2^-bias),
    times the decoded S0E5M3 scale, times the processed global scale == e2m1 · s · ts."""
    ts = np.float32(0.0123)
    s = rng.choice(ALL_POSITIVE_E4M3[40:], size=(4, 8))
    proc, sf = nv.marlin_process_scales(jnp.asarray(s))
    g = float(nv.marlin_process_global_scale(ts, dtype, sf))
    assert g == np.float64(ts) * 2.0 ** (bias - 7) / float(sf)
    codes = rng.integers(0, 16, size=(4, 8), dtype=np.uint8)
    raw = oracle.decode_codes(codes) * 2.0**-bias
    dec = np.asarray(nv.marlin_decode_scales(proc, dtype).astype(jnp.float32)).astype(np.float64)
    np.testing.assert_allclose(
        raw * dec * g, oracle.decode_codes(codes) * s.astype(np.float64) * ts, rtol=1e-7
    )


def test_marlin_scale_range_overflow_raises():
    s = np.array([[2.0**-9, 448, 1, 1]], np.float32).astype(E4M3)
    with pytest.raises(ValueError, match="overflows float16"):
        nv.marlin_process_scales(jnp.asarray(s))


def test_marlin_bad_inputs():
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        nv.marlin_process_scales(jnp.ones((2, 4), jnp.float16))
    with pytest.raises(ValueError, match="divisible by 4"):
        nv.marlin_process_scales(jnp.ones((1, 3), jnp.float8_e4m3fn))
    with pytest.raises(ValueError, match="scale_factor must be finite and > 0"):
        nv.marlin_process_scales(jnp.ones((1, 4), jnp.float8_e4m3fn), scale_factor=0.0)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        nv.marlin_process_global_scale(1.0, jnp.float32)
