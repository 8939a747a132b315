"""NVFP4Array invariants, pytree behaviour and repr."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nvfp4_jax as nv


def _arr(rng, shape=(32, 24), axis=0):
    return nv.quantize(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16), axis=axis)


def test_layout_of_a_weight(rng):
    a = _arr(rng)
    assert a.shape == (32, 24) and a.axis == -2 and a.dtype == jnp.bfloat16
    assert a.data.shape == (24, 16) and a.scales.shape == (24, 2) and a.tensor_scale.shape == ()
    assert a.nbytes == 24 * 16 + 24 * 2 + 4 and a.ndim == 2 and a.size == 32 * 24


def test_pytree_tree_map_and_jit(rng):
    a = _arr(rng)
    leaves, tree = jax.tree_util.tree_flatten(a)
    assert len(leaves) == 3  # no prepared layout yet
    b = jax.tree_util.tree_unflatten(tree, leaves)
    assert isinstance(b, nv.NVFP4Array) and b.shape == a.shape
    c = jax.tree_util.tree_map(lambda v: v, a)
    np.testing.assert_array_equal(np.asarray(c.data), np.asarray(a.data))
    out = jax.jit(lambda w: nv.dequantize(w, jnp.float32))(a)
    assert out.shape == (32, 24)
    shapes = jax.eval_shape(lambda w: w, a)
    assert shapes.data.shape == (24, 16)


def test_vmap_over_experts(rng):
    x = jnp.asarray(rng.standard_normal((4, 32, 24)), jnp.float32)
    a = jax.vmap(lambda e: nv.quantize(e, axis=0))(x)
    assert a.shape == (4, 32, 24) and a.tensor_scale.shape == (4,) and a.axis == -2
    out = jax.vmap(nv.dequantize)(a)
    assert out.shape == (4, 32, 24)
    np.testing.assert_array_equal(
        np.asarray(out[2]), np.asarray(nv.dequantize(nv.quantize(x[2], axis=0)))
    )


def test_repr(rng):
    r = repr(_arr(rng))
    assert r.startswith("NVFP4Array(shape=(32, 24), dtype=bfloat16, axis=0, data=uint8[24,16]")
    assert "scales=float8_e4m3fn[24,2]" in r and "tensor_scale=0." in r


def test_constructor_validation():
    data = jnp.zeros((4, 8), jnp.uint8)
    scales = jnp.zeros((4, 1), jnp.float8_e4m3fn)
    a = nv.NVFP4Array(data, scales, 0.5, axis=0, dtype=jnp.float16)
    assert a.shape == (16, 4) and a.dtype == jnp.float16
    with pytest.raises(TypeError, match="data must have dtype uint8"):
        nv.NVFP4Array(data.astype(jnp.int8), scales)
    with pytest.raises(TypeError, match="scales must have dtype float8_e4m3fn"):
        nv.NVFP4Array(data, scales.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"scales must have shape \(4, 1\)"):
        nv.NVFP4Array(data, jnp.zeros((4, 2), jnp.float8_e4m3fn))
    with pytest.raises(ValueError, match="multiple of 16, got 12"):
        nv.NVFP4Array(jnp.zeros((4, 6), jnp.uint8), scales)
    with pytest.raises(ValueError, match="tensor_scale must be finite and > 0"):
        nv.NVFP4Array(data, scales, -1.0)
    with pytest.raises(ValueError, match="leading-batch shape"):
        nv.NVFP4Array(data, scales, jnp.ones(4))
    with pytest.raises(TypeError, match="dtype must be one of"):
        nv.NVFP4Array(data, scales, dtype=jnp.int32)
    with pytest.raises(ValueError, match="out of range"):
        nv.NVFP4Array(data, scales, axis=3)
