"""vLLM-style raw ops (scaled_fp4_quant, dequantize_to_dtype) and the straight-through
gradient of quant_dequant."""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import nvfp4_jax as nv


def test_scaled_fp4_quant_plain_and_swizzled(rng):
    x = jnp.asarray(rng.standard_normal((3, 50, 80)), jnp.bfloat16)
    gs = np.float32(2688) / np.float32(np.abs(np.asarray(x, np.float32)).max())
    data, scales = nv.scaled_fp4_quant(x, gs, swizzled=False)
    codes, sbytes = oracle.quantize(np.asarray(x, np.float32).reshape(150, 80), gs)
    np.testing.assert_array_equal(np.asarray(data), oracle.pack(codes))
    np.testing.assert_array_equal(np.asarray(scales).view(np.uint8), sbytes)
    data2, sw = nv.scaled_fp4_quant(x, gs)
    assert sw.shape == (256, 8)
    np.testing.assert_array_equal(np.asarray(data2), np.asarray(data))
    np.testing.assert_array_equal(np.asarray(sw).view(np.uint8), oracle.swizzle(sbytes))


@pytest.mark.parametrize("swizzled", [False, True])
def test_dequantize_to_dtype_3d_batch_scale(rng, swizzled):
    data = jnp.asarray(rng.integers(0, 256, (2, 130, 40), dtype=np.uint8))
    sbytes = rng.integers(0, 0x7F, (2, 130, 5), dtype=np.uint8)
    ts = np.float32([0.5, 0.003])
    scales = jax.lax.bitcast_convert_type(jnp.asarray(sbytes), jnp.float8_e4m3fn)
    if swizzled:
        scales = nv.swizzle_scales(scales)
    out = nv.dequantize_to_dtype(data, scales, jnp.asarray(ts), jnp.float32, swizzled=swizzled)
    want = oracle.dequantize(oracle.unpack(np.asarray(data)), sbytes, ts, np.float32)
    np.testing.assert_array_equal(np.asarray(out), want)


def test_raw_ops_bad_inputs():
    x = jnp.ones((4, 32), jnp.float32)
    with pytest.raises(ValueError, match="global_scale must be finite and > 0"):
        nv.scaled_fp4_quant(x, -1.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        nv.scaled_fp4_quant(jnp.ones((4, 8)), 1.0)
    d, s = nv.scaled_fp4_quant(x, 1.0, swizzled=False)
    with pytest.raises(
        ValueError, match=r"swizzled 128x4 scales for data \(4, 16\) must have shape \(128, 4\)"
    ):
        nv.dequantize_to_dtype(d, s, 1.0, swizzled=True)
    with pytest.raises(ValueError, match="tensor_scale must be a scalar"):
        nv.dequantize_to_dtype(d, s, jnp.ones(4))
    with pytest.raises(ValueError, match="2-D"):
        nv.dequantize_to_dtype(d[0], s[0], 1.0)
    with pytest.raises(TypeError, match="data must have dtype uint8"):
        nv.dequantize_to_dtype(d.astype(jnp.int32), s, 1.0)


def test_quant_dequant_straight_through_gradient(rng):
    x = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
    # The default tensor scale keeps every element, the amax itself included, in range.
    g = jax.grad(lambda v: jnp.sum(nv.quant_dequant(v) * 2.0))(x)
    np.testing.assert_array_equal(np.asarray(g), 2.0)
    # A tensor scale whose range 6*448*ts is below some |x|: those get zero gradient.
    ts = 0.5 / 2688
    g = jax.grad(lambda v: jnp.sum(nv.quant_dequant(v, tensor_scale=ts)))(x)
    np.testing.assert_array_equal(
        np.asarray(g),
        (np.abs(np.asarray(x)) <= np.float32(ts) * np.float32(2688 * (1 + 2**-16))).astype(
            np.float32
        ),
    )
    gj = jax.jit(jax.grad(lambda v: jnp.sum(nv.quant_dequant(v, axis=0))))(x)
    np.testing.assert_array_equal(np.asarray(gj), 1.0)
