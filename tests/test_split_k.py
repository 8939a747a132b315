"""``kernels.split_k.add_partials``: the split-K sum as a Pallas Mosaic GPU kernel (the second
launch of a split-K tiling run from torch) against its jnp reference and a float64 oracle.

* CPU: the Mosaic GPU interpreter on ragged rows and columns, every output dtype, with and
  without a bias, many splits; race detection; cross-lowering for sm_90; input errors.
* GPU (``gpu`` mark): the compiled kernel, same checks, poisoned outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cross_lowering import cross_lower
from race_detection import RACES, races_found

from nvfp4_jax.kernels import split_k

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# (splits, rows, cols): ragged row blocks (13, 300), rows below 8 (1, 3), columns that are
# no multiple of 128 (200, 584), fewer than 128 columns (64: two-row blocks of 3 rows), many
# splits (17: 8-row blocks; 48: SMEM forces 4-row blocks).
CASES = [
    (4, 16, 256),
    (2, 1, 128),
    (3, 3, 64),
    (4, 13, 200),
    (17, 24, 128),
    (2, 300, 584),
    (48, 8, 128),
]


def _inputs(rng, splits, rows, cols, bias_dtype):
    p = jnp.asarray(rng.standard_normal((splits, rows, cols)) * 8, jnp.float32)
    ts = jnp.asarray([rng.uniform(0.1, 2.0)], jnp.float32)
    bias = None
    if bias_dtype is not None:
        bias = jnp.asarray(rng.standard_normal(cols), bias_dtype)
    return p, ts, bias


def _oracle(p, ts, bias):
    out = np.asarray(p, np.float64).sum(axis=0) * float(ts[0])
    if bias is not None:
        out = out + np.asarray(bias.astype(jnp.float32), np.float64)
    return out


def _check(got, p, ts, bias, out_dtype):
    """Within one rounding of ``out_dtype`` (plus float32 summation error) of the float64
    sum, and within one unit in the last place of the jnp reference (the scale and the bias
    may fuse into one FMA)."""
    assert got.shape == p.shape[1:] and got.dtype == out_dtype
    exact = _oracle(p, ts, bias)
    g = np.asarray(got.astype(jnp.float32), np.float64)
    eps = float(jnp.finfo(out_dtype).eps)
    magnitude = np.abs(np.asarray(p, np.float64)).sum(axis=0) * float(ts[0])
    if bias is not None:
        magnitude = magnitude + np.abs(np.asarray(bias.astype(jnp.float32), np.float64))
    f32_error = (p.shape[0] + 2) * 2.0**-24 * magnitude  # float32 sum, scale and bias
    assert np.all(np.abs(g - exact) <= eps * np.abs(exact) + f32_error + 1e-30)
    ref = split_k.add_partials_reference(p, ts, bias, out_dtype=out_dtype)
    r = np.asarray(ref.astype(jnp.float32), np.float64)
    terms = np.abs(r)  # an FMA rounds once: up to an ulp of the product and of the bias
    if bias is not None:
        b = np.abs(np.asarray(bias.astype(jnp.float32), np.float64))
        terms = terms + np.abs(exact - np.asarray(bias.astype(jnp.float32), np.float64)) + b
    assert np.all(np.abs(g - r) <= eps * terms + 1e-30)


@pytest.mark.parametrize("splits,rows,cols", CASES)
@pytest.mark.parametrize(
    "out_dtype,bias_dtype",
    [(jnp.bfloat16, jnp.bfloat16), (jnp.float16, None), (jnp.float32, jnp.float32)],
)
def test_interpret_matches_reference(rng, splits, rows, cols, out_dtype, bias_dtype):
    p, ts, bias = _inputs(rng, splits, rows, cols, bias_dtype)
    got = split_k.add_partials(p, ts, bias, out_dtype=out_dtype, interpret=True)
    _check(got, p, ts, bias, out_dtype)


def test_interpreter_finds_no_races(rng):
    p, ts, bias = _inputs(rng, 3, 13, 200, jnp.bfloat16)
    got = split_k.add_partials(p, ts, bias, out_dtype=jnp.bfloat16, interpret=RACES)
    assert not races_found()
    _check(got, p, ts, bias, jnp.bfloat16)


@pytest.mark.parametrize("splits,rows,cols", CASES)
def test_block_shape(splits, rows, cols):
    rb, cb = split_k.block_shape(splits, rows, cols)
    assert 1 <= rb <= min(rows, 8) and cb == min(cols, 128)
    assert (rb * cb) % 128 == 0 and splits * rb * cb * 4 <= 160 * 1024


def test_cross_lowers_for_sm90():
    """The compiled lowering (layouts, TMA boxes, SMEM) for an abstract H100 on the CPU."""
    for splits, rows, cols in CASES:
        p = jax.ShapeDtypeStruct((splits, rows, cols), jnp.float32)
        ts = jax.ShapeDtypeStruct((1,), jnp.float32)
        bias = jax.ShapeDtypeStruct((cols,), jnp.bfloat16)
        text = cross_lower(
            lambda p, ts, b: split_k.add_partials(p, ts, b, out_dtype=jnp.bfloat16), p, ts, bias
        )
        assert "mosaic_gpu" in text


def test_errors():
    p = jnp.ones((2, 4, 128), jnp.float32)
    ts = jnp.ones((1,), jnp.float32)
    with pytest.raises(ValueError, match=r"partials must be float32 \[splits, rows, cols\]"):
        split_k.add_partials(p.astype(jnp.bfloat16), ts, out_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="partials must be float32"):
        split_k.add_partials(p[0], ts, out_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="cols must be a multiple of 8"):
        split_k.add_partials(p[:, :, :100], ts, out_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"tensor_scale must be float32 \[1\]"):
        split_k.add_partials(p, ts[0], out_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"bias must be a float \[128\]"):
        split_k.add_partials(p, ts, jnp.ones(64), out_dtype=jnp.bfloat16)
    with pytest.raises(TypeError, match="out_dtype must be bfloat16, float16 or float32"):
        split_k.add_partials(p, ts, out_dtype=jnp.int8)
    with pytest.raises(ValueError, match="no block of partials"):
        split_k.block_shape(2, 1, 64)
    with pytest.raises(ValueError, match="rows must be an int >= 1, got 0"):
        split_k.add_partials(p[:, :0], ts, out_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="splits must be an int >= 1, got 0"):
        split_k.block_shape(0, 8, 128)
    with pytest.raises(ValueError, match="at most 256 splits"):
        split_k.block_shape(257, 1, 128)
    assert split_k.block_shape(256, 8, 128) == (1, 128)
    assert split_k.block_shape(3, 5, 64) == (4, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("splits,rows,cols", CASES + [(4, 64, 4096), (8, 16, 14336)])
@pytest.mark.parametrize("out_dtype,bias_dtype", [(jnp.bfloat16, jnp.float32), (jnp.float16, None)])
def test_gpu_matches_reference(rng, splits, rows, cols, out_dtype, bias_dtype):
    p, ts, bias = _inputs(rng, splits, rows, cols, bias_dtype)
    for _ in range(2):  # output buffers likely reuse a freed NaN one: unwritten = NaN
        poison = jnp.full((rows, cols), jnp.nan, out_dtype).block_until_ready()
        poison.delete()
        got = split_k.add_partials(p, ts, bias, out_dtype=out_dtype)
        _check(got, p, ts, bias, out_dtype)
