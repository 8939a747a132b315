"""quantize / dequantize / quant_dequant: bit-exact vs the numpy + ml_dtypes oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from hypothesis import given
from hypothesis import strategies as st

import nvfp4_jax as nv

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]


def _random(rng, shape, dtype, log10_scale=0.0):
    x = rng.standard_normal(shape) * 10.0**log10_scale
    # Mix in outliers and exact zeros within blocks.
    x = np.where(rng.random(shape) < 0.02, x * 30, x)
    x = np.where(rng.random(shape) < 0.02, 0.0, x)
    big = float(jnp.finfo(dtype).max)  # finite inputs (test_nan_inf_policy covers the rest)
    return jnp.asarray(np.clip(x, -big, big), dtype)


def _check_bits(x, a, gs, axis=-1):
    xs = np.moveaxis(np.asarray(x.astype(jnp.float32)), axis, -1)
    codes, scales = oracle.quantize(xs, gs)
    np.testing.assert_array_equal(np.asarray(a.data), oracle.pack(codes))
    np.testing.assert_array_equal(np.asarray(a.scales).view(np.uint8), scales)
    return codes, scales


@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 6)),
    dtype=st.sampled_from(DTYPES),
    log10_scale=st.floats(-6, 4),
    given_scale=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_bit_exact(shape, dtype, log10_scale, given_scale, seed):
    rng = np.random.default_rng(seed)
    x = _random(rng, (shape[0], 16 * shape[1]), dtype, log10_scale)
    if given_scale:
        ts = np.float32(10.0 ** rng.uniform(-8, 1))
        a = nv.quantize(x, tensor_scale=ts)
        gs = np.float32(1) / ts
        assert float(a.tensor_scale) == ts
    else:
        a = nv.quantize(x)
        gs, ts = oracle.default_global_scale(np.asarray(x.astype(jnp.float32)))
        assert np.asarray(a.tensor_scale) == ts
    codes, scales = _check_bits(x, a, gs)
    out = nv.dequantize(a, jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), oracle.dequantize(codes, scales, ts, np.float32))
    qd = nv.quant_dequant(x, tensor_scale=ts if given_scale else None)
    assert qd.dtype == x.dtype
    np.testing.assert_array_equal(
        np.asarray(qd.astype(jnp.float32)),
        oracle.quant_dequant(np.asarray(x), gs, ts).astype(np.float32),
    )


def test_global_scale_argument_is_vllm_multiplier(rng):
    x = _random(rng, (8, 64), jnp.bfloat16)
    gs = np.float32(123.456)
    a = nv.quantize(x, global_scale=gs)
    _check_bits(x, a, gs)
    assert float(a.tensor_scale) == np.float32(1) / gs


@pytest.mark.parametrize("dtype", DTYPES)
def test_axis_and_3d(rng, dtype):
    w = _random(rng, (3, 48, 20), dtype)  # [E, K, N] quantized along K
    a = nv.quantize(w, axis=1)
    assert a.shape == (3, 48, 20) and a.data.shape == (3, 20, 24) and a.scales.shape == (3, 20, 3)
    gs, _ = oracle.default_global_scale(np.asarray(w.astype(jnp.float32)))
    _check_bits(w, a, gs, axis=1)
    assert nv.dequantize(a).shape == (3, 48, 20)


def test_per_batch_tensor_scale(rng):
    x = _random(rng, (4, 8, 32), jnp.bfloat16)
    ts = np.float32(10.0 ** rng.uniform(-3, 0, size=4))
    a = nv.quantize(x, tensor_scale=jnp.asarray(ts))
    codes, scales = _check_bits(x, a, np.float32(1) / ts)
    np.testing.assert_array_equal(
        np.asarray(nv.dequantize(a, jnp.float32)), oracle.dequantize(codes, scales, ts, np.float32)
    )


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("exp2", [0, -20, 10])
def test_every_tie_value(sign, exp2):
    # amax 6 with tensor scale 1 gives block scale 1.0: the scaled values are the ties exactly.
    block = np.array(
        [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32
    )
    x = jnp.asarray(sign * block * 2.0**exp2, jnp.float32)[None]
    a = nv.quantize(x, tensor_scale=2.0**exp2)
    assert np.asarray(a.scales).astype(np.float32)[0, 0] == 1.0
    got = np.asarray(nv.unpack_fp4(a.data))[0]
    want = np.array([6, 0, 1, 1, 2, 2, 4, 4, 0, 0.5, 1, 1.5, 2, 3, 4, 6]) * sign
    np.testing.assert_array_equal(oracle.decode_codes(got), want)
    if sign < 0:  # -0.25 and -0 round to -0: code 0x8
        assert got[1] == 0x8 and got[8] == 0x8


def test_all_zero_blocks_and_all_zero_input():
    x = jnp.zeros((2, 32), jnp.bfloat16).at[0, :16].set(jnp.arange(1, 17, dtype=jnp.bfloat16))
    a = nv.quantize(x)
    assert np.asarray(a.scales).astype(np.float32)[1].tolist() == [0, 0]
    assert np.asarray(a.data)[1].tolist() == [0] * 16
    z = nv.quantize(jnp.zeros((3, 16), jnp.float32))
    assert float(z.tensor_scale) == 1.0
    assert not np.asarray(z.data).any() and not np.asarray(z.scales).astype(np.float32).any()
    np.testing.assert_array_equal(np.asarray(nv.dequantize(z, jnp.float32)), 0)


def test_subnormal_e4m3_scales(rng):
    # Tensor scale 1 with small blocks: block scales in E4M3's subnormal range [2^-9, 2^-6).
    x = jnp.asarray(rng.uniform(-1, 1, (4, 64)) * 0.02, jnp.float32)
    a = nv.quantize(x, tensor_scale=1.0)
    s = np.asarray(a.scales).astype(np.float32)
    assert ((s > 0) & (s < 2.0**-6)).any()
    _check_bits(x, a, np.float32(1))


def test_saturation_at_448_and_6(rng):
    # A tensor scale far too small: every block scale clamps to 448, codes saturate at +-6.
    x = jnp.asarray(rng.standard_normal((2, 32)) + 3.0, jnp.float32)
    a = nv.quantize(x, tensor_scale=1e-6)
    assert (np.asarray(a.scales).astype(np.float32) == 448).all()
    _check_bits(x, a, np.float32(1) / np.float32(1e-6))
    assert (np.asarray(nv.unpack_fp4(a.data)) & 7 == 7).any()
    # Values between 448 and 464 round down to 448 in E4M3 (464 is a tie to even).
    gs = np.float32(1.0)
    for amax in [448 * 6, 460 * 6, 463.9 * 6, 464 * 6, 470 * 6, 1e5]:
        xb = jnp.full((1, 16), amax, jnp.float32)
        a = nv.quantize(xb, global_scale=gs)
        assert np.asarray(a.scales).astype(np.float32)[0, 0] == 448


def test_nan_inf_policy(rng):
    x = np.asarray(rng.standard_normal((2, 48)), np.float32)
    x[0, 3] = np.nan
    x[1, 40] = np.inf
    a = nv.quantize(jnp.asarray(x))
    s = np.asarray(a.scales).astype(np.float32)
    assert np.isnan(s[0, 0]) and np.isnan(s[1, 2])
    assert np.isfinite(s[0, 1:]).all() and np.isfinite(s[1, :2]).all()
    codes = np.asarray(nv.unpack_fp4(a.data))
    assert not codes[0, :16].any() and not codes[1, 32:].any()
    # The default tensor scale ignores the non-finite elements.
    finite = np.where(np.isfinite(x), np.abs(x), 0)
    assert float(a.tensor_scale) == np.float32(1) / (np.float32(2688) / np.float32(finite.max()))
    gs, _ = oracle.default_global_scale(x)
    _check_bits(jnp.asarray(x), a, gs)
    out = np.asarray(nv.dequantize(a, jnp.float32))
    assert np.isnan(out[0, :16]).all() and np.isfinite(out[0, 16:]).all()


def test_gaussian_dequantization_error(rng):
    x = jnp.asarray(rng.standard_normal((256, 1024)), jnp.float32)
    y = nv.dequantize(nv.quantize(x), jnp.float32)
    err = float(jnp.linalg.norm(y - x) / jnp.linalg.norm(x))
    assert 0.085 < err < 0.105, err


def test_jit_and_vmap_agree_with_eager(rng):
    x = _random(rng, (3, 8, 64), jnp.bfloat16)
    eager = [nv.quantize(x[i]) for i in range(3)]
    vm = jax.vmap(nv.quantize)(x)
    jt = jax.jit(lambda v: nv.quantize(v, axis=-1))(x[0])
    np.testing.assert_array_equal(np.asarray(jt.data), np.asarray(eager[0].data))
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(vm.data[i]), np.asarray(eager[i].data))
        np.testing.assert_array_equal(
            np.asarray(vm.scales[i]).view(np.uint8), np.asarray(eager[i].scales).view(np.uint8)
        )
        assert vm.tensor_scale[i] == eager[i].tensor_scale
    deq_vm = jax.vmap(nv.dequantize)(vm)
    np.testing.assert_array_equal(np.asarray(deq_vm[1]), np.asarray(nv.dequantize(eager[1])))
    qd = jax.jit(nv.quant_dequant)(x)
    np.testing.assert_array_equal(np.asarray(qd), np.asarray(nv.quant_dequant(x)))


def test_bad_inputs():
    x = jnp.ones((4, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 16, got 4"):
        nv.quantize(x, axis=0)
    for bad in (
        jnp.ones((2, 16), jnp.int32),
        jnp.ones((2, 16), bool),
        jnp.ones((2, 16), jnp.complex64),
    ):
        with pytest.raises(TypeError, match="x must be one of bfloat16, float16, float32"):
            nv.quantize(bad)
    with pytest.raises(TypeError):
        nv.quantize(jnp.ones((2, 16), jnp.float8_e4m3fn))
    with pytest.raises(ValueError, match="out of range"):
        nv.quantize(x, axis=2)
    with pytest.raises(ValueError, match="0-d"):
        nv.quantize(jnp.float32(1))
    for ts in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="tensor_scale must be finite and > 0"):
            nv.quantize(x, tensor_scale=ts)
    with pytest.raises(ValueError, match="global_scale must be finite and > 0"):
        nv.quant_dequant(x, global_scale=0.0)
    with pytest.raises(ValueError, match="not both"):
        nv.quantize(x, tensor_scale=1.0, global_scale=1.0)
    with pytest.raises(
        ValueError, match="tensor_scale must be a scalar or have a leading-batch shape"
    ):
        nv.quantize(x, tensor_scale=jnp.ones(4))
    with pytest.raises(TypeError, match="NVFP4Array"):
        nv.dequantize(x)
    with pytest.raises(TypeError, match="dtype must be one of"):
        nv.dequantize(nv.quantize(x), jnp.int8)
