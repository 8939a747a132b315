"""nvfp4_jax.matmul / linear / prepare through the public API, both backends.

Tolerance policy: relative Frobenius error vs a float64 product of the dequantized operands
<= 1e-2, plus an element-wise bound so an unwritten output element cannot hide.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cross_lowering import cross_lower

import nvfp4_jax as nv
from nvfp4_jax import backends
from nvfp4_jax.kernels import gemm


def _weight(rng, k, n, dtype=jnp.bfloat16):
    w = rng.standard_normal((k, n)) * 10.0 ** rng.uniform(-3, 1)
    return nv.quantize(jnp.asarray(w, dtype), axis=0)


def _check(y, x, w, bias=None, transpose=False):
    wd = np.asarray(nv.dequantize(w, jnp.float32), np.float64)
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ (wd.T if transpose else wd)
    if bias is not None:
        ref = ref + np.asarray(bias, np.float64)
    _close(y, ref)


def _close(got, ref):
    """The tolerance policy: relative Frobenius error <= 1e-2 against the float64 ``ref``,
    plus an element-wise bound so an unwritten element cannot hide."""
    got = np.asarray(got.astype(jnp.float32), np.float64)
    assert got.shape == ref.shape and np.isfinite(got).all()
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err <= 1e-2, err
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max(), rtol=0.05)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("m,n,k", [(1, 64, 48), (3, 200, 48), (16, 64, 256), (70, 200, 208)])
def test_matmul_small_grid(rng, backend, m, n, k):
    w = _weight(rng, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    with backends.record() as log:
        y = nv.matmul(x, w, bias=bias, backend=backend)
    assert log[0].backend == backend
    _check(y, x, w, bias)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_leading_dims_fp16_linear_prepared_jit_vmap(rng, backend):
    k, n = 80, 64
    w_nk = nv.quantize(jnp.asarray(rng.standard_normal((n, k)), jnp.float16))  # F.linear layout
    x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.float16)
    y = nv.linear(x, w_nk, backend=backend)
    assert y.shape == (2, 3, n) and y.dtype == jnp.float16
    _check(y.reshape(6, n), x.reshape(6, k), w_nk, transpose=True)
    w_kn = _weight(rng, k, n, jnp.float16)
    prepared = nv.prepare(w_kn, jnp.float16)
    f = jax.jit(lambda x, w: nv.matmul(x, w, backend=backend))
    y = f(x, prepared)
    _check(y.reshape(6, n), x.reshape(6, k), w_kn)
    yv = jax.vmap(lambda xi: nv.matmul(xi, prepared, backend=backend))(x)
    _check(yv.reshape(6, n), x.reshape(6, k), w_kn)
    ws = jax.vmap(lambda e: nv.quantize(e, axis=0))(
        jnp.asarray(rng.standard_normal((2, k, n)), jnp.float16)
    )
    yw = jax.vmap(lambda wi: nv.matmul(x[0], wi, backend=backend))(ws)
    for i in range(2):
        _check(yw[i], x[0], jax.tree_util.tree_map(lambda v, i=i: v[i], ws))


@pytest.mark.parametrize("k_group", [64, 256])
def test_prepare_k_group(rng, k_group):
    """Every prepared k-group gives the product; the default config follows the layout."""
    m, k, n = 5, 320, 72  # K pads to a whole k-group of 256 (K % 64 == 0, as 256 needs)
    w = _weight(rng, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    prepared = nv.prepare(w, k_group=k_group)
    assert prepared.prepared.k_group == k_group
    assert prepared.prepared.data.shape[0] * k_group == -(-k // k_group) * k_group
    _check(nv.matmul(x, prepared, backend="pallas"), x, w)
    with pytest.raises(ValueError, match="k_group must be 64, 128 or 256"):
        nv.prepare(w, k_group=32)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16, jnp.float16])
def test_prepared_layout_serves_either_activation_dtype(rng, dtype):
    """A layout (compact or widened scales) serves bf16 and f16 activations as it is: a
    matmul never rebuilds it (a tile_k 64 config runs on a k-group 64 layout and is
    rejected on the default k-group 128 one)."""
    from nvfp4_jax.kernels import gemm

    w = _weight(rng, 128, 64)
    cfg = gemm.GemmConfig(tile_n=64, tile_m=8, tile_k=64, stages=2, a_operand="smem")
    for x_dtype in (jnp.bfloat16, jnp.float16):
        x = jnp.asarray(rng.standard_normal((3, 128)), x_dtype)
        y = nv.matmul(x, nv.prepare(w, dtype, k_group=64), backend="pallas", config=cfg)
        assert y.dtype == x_dtype
        _check(y, x, w)
        with pytest.raises(ValueError, match="tile_k=64 must be a multiple of k_group=128"):
            nv.matmul(x, nv.prepare(w, dtype), backend="pallas", config=cfg)
    with pytest.raises(TypeError, match="dtype must be None"):
        nv.prepare(w, jnp.float32)


def test_float32_output_falls_back_to_xla_unless_pallas_is_named(rng, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    w = _weight(rng, 32, 64)
    x = jnp.asarray(rng.standard_normal((2, 32)), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="writes bfloat16/float16"):
        nv.matmul(x, w, out_dtype=jnp.float32, backend="pallas")
    real_select = backends.select
    monkeypatch.setattr(
        backends,
        "select",
        lambda op, backend=None: (
            backends.Backend.PALLAS if op == "matmul" else real_select(op, backend)
        ),
    )
    with backends.record() as log:
        y = nv.matmul(x, w, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    assert [d.backend for d in log] == ["pallas", "xla"] and "fallback" in log[1].detail
    _check(y, x, w)


@pytest.mark.parametrize(
    "dtype,out_dtype,with_bias",
    [(jnp.bfloat16, None, False), (jnp.bfloat16, jnp.float16, True), (jnp.float16, None, True)],
)
def test_dequantize_route(rng, monkeypatch, dtype, out_dtype, with_bias):
    """The prefill route (dequantize kernel + XLA dot), by name and by shape."""
    m, n, k = 37, 200, 16 * 13
    w = nv.prepare(_weight(rng, k, n, dtype), dtype)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if with_bias else None
    with backends.record() as log:
        y = nv.matmul(x, w, bias=bias, out_dtype=out_dtype, backend="pallas", config="dequantize")
    assert log[-1].detail == "dequantize"
    assert y.dtype == (out_dtype or dtype)
    _check(y, x, w, bias)
    if dtype == jnp.bfloat16 and not with_bias:  # exactly x @ dequantize(w, bf16), f32 sums
        wd = nv.dequantize(w, jnp.bfloat16).astype(jnp.float32)
        want = jnp.dot(x.astype(jnp.float32), wd, precision="highest")
        np.testing.assert_allclose(
            np.asarray(y, np.float32),
            np.asarray(want.astype(dtype), np.float32),
            rtol=2e-2,
            atol=1e-2 * float(jnp.abs(want).max()),
        )
    monkeypatch.setattr(importlib.import_module("nvfp4_jax.matmul"), "DEQUANTIZE_DOT_MIN_M", m)
    with backends.record() as log:
        y_auto = jax.jit(
            lambda x, w: nv.matmul(x, w, bias=bias, out_dtype=out_dtype, backend="pallas")
        )(x, w)
    assert [d.detail for d in log if d.op == "matmul"][-1] == "dequantize"
    _check(y_auto, x, w, bias)
    # jit may fuse the f32 epilogue differently from eager: equal up to output roundings.
    eps, y32 = float(jnp.finfo(y.dtype).eps), np.asarray(y, np.float32)
    np.testing.assert_allclose(
        np.asarray(y_auto, np.float32), y32, rtol=2 * eps, atol=2e-3 * eps * np.abs(y32).max()
    )
    with backends.record() as log:
        nv.matmul(x[: m - 1], w, backend="pallas")  # below the threshold: the fused kernel
    assert all(d.detail != "dequantize" for d in log)


def test_pallas_plan():
    from nvfp4_jax.kernels import gemm
    from nvfp4_jax.matmul import pallas_plan

    assert pallas_plan(4096, 4096, 4096) == "dequantize"
    assert isinstance(pallas_plan(1024, 4096, 4096), gemm.GemmConfig)
    cfg = gemm.GemmConfig(tile_n=128, tile_m=64, tile_k=128)
    assert pallas_plan(4096, 4096, 4096, config=cfg) is cfg
    with pytest.raises(TypeError, match="config must be a kernels.gemm.GemmConfig"):
        pallas_plan(8, 64, 64, config="fused")


def test_closed_over_weight_and_prepared_cache(rng):
    w = nv.prepare(_weight(rng, 64, 64))
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    f = jax.jit(lambda x: nv.matmul(x, w, backend="pallas"))
    _check(f(x), x, w)
    assert "prepared with compact scales, k-group 128" in repr(w)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_empty_rows(rng, backend):
    """M = 0 (an empty batch): an empty result and an empty gradient, no kernel launch."""
    w = nv.prepare(_weight(rng, 64, 40))
    x = jnp.zeros((2, 0, 64), jnp.bfloat16)
    y = jax.jit(lambda x: nv.matmul(x, w, backend=backend))(x)
    assert y.shape == (2, 0, 40) and y.dtype == jnp.bfloat16
    g = jax.grad(lambda x: nv.matmul(x, w, backend=backend).astype(jnp.float32).sum())(x)
    assert g.shape == x.shape
    assert gemm.default_config(0, 40, 64) == gemm.default_config(1, 40, 64)


def test_bad_inputs(rng):
    w = _weight(rng, 32, 16)
    x = jnp.ones((2, 32), jnp.bfloat16)
    with pytest.raises(TypeError, match="w must be an NVFP4Array"):
        nv.matmul(x, jnp.ones((32, 16)))
    with pytest.raises(TypeError, match="x must be bfloat16 or float16, got float32"):
        nv.matmul(x.astype(jnp.float32), w)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 32\]"):
        nv.matmul(jnp.ones((2, 48), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="quantized along K"):
        nv.linear(x, w)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        nv.matmul(x, w, bias=jnp.ones(17))
    with pytest.raises(ValueError, match="2-D weight"):
        nv.matmul(x, jax.vmap(lambda e: nv.quantize(e, axis=0))(jnp.ones((2, 32, 16))))
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        nv.matmul(x, w, out_dtype=jnp.int8)
    with pytest.raises(TypeError, match="config must be a kernels.gemm.GemmConfig"):
        nv.matmul(x, w, backend="pallas", config="fused")
    with pytest.raises(ValueError, match="unknown NVFP4 backend"):
        nv.matmul(x, w, backend="marlin")
    with pytest.raises(TypeError, match="activation dtype"):
        nv.prepare(w, jnp.float32)


def _input_grad64(g, w, transpose=False):
    """float64 ``g @ Wᵀ`` for ``matmul`` (``W [K, N]``), ``g @ W`` for ``linear``."""
    wd = np.asarray(nv.dequantize(w, jnp.float32), np.float64)
    return np.asarray(g.astype(jnp.float32), np.float64) @ (wd if transpose else wd.T)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_gradients_wrt_activations_and_bias(rng, backend):
    """vjp: grad_x = g @ Wᵀ (x's dtype), grad_bias = sum of g (bias's dtype), leading dims,
    ragged N; the weight's cotangent is zero (a frozen quantized weight)."""
    k, n = 96, 40
    w = _weight(rng, k, n)
    x = jnp.asarray(rng.standard_normal((2, 5, k)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 5, n)), jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, b, w: nv.matmul(x, w, bias=b, backend=backend), x, bias, w)
    _check(y.reshape(10, n), x.reshape(10, k), w, bias)
    dx, db, dw = vjp(g)
    assert dx.dtype == jnp.bfloat16 and db.dtype == jnp.float32
    _close(dx.reshape(10, k), _input_grad64(g.reshape(10, n), w))
    np.testing.assert_allclose(
        np.asarray(db, np.float64), np.asarray(g, np.float64).sum((0, 1)), rtol=1e-6, atol=1e-5
    )
    assert not np.asarray(dw.scales.astype(jnp.float32)).any()
    assert not np.asarray(dw.tensor_scale).any()
    assert dw.data.dtype == jax.dtypes.float0
    # jvp: the tangent is the product of the tangent input (the map is linear).
    t = jnp.asarray(rng.standard_normal((2, 5, k)), jnp.bfloat16)
    _, y_dot = jax.jvp(lambda x: nv.matmul(x, w, bias=bias, backend=backend), (x,), (t,))
    _check(y_dot.reshape(10, n), t.reshape(10, k), w)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_gradients_linear_fp16_prepared_jit_vmap(rng, backend):
    k, n = 64, 48
    w_nk = nv.prepare(nv.quantize(jnp.asarray(rng.standard_normal((n, k)), jnp.float16)))
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.float16)
    g = jnp.asarray(rng.standard_normal((3, n)), jnp.float16)
    loss = lambda x: jnp.vdot(nv.linear(x, w_nk, backend=backend).astype(jnp.float32), g)
    dx = jax.jit(jax.grad(loss))(x)
    assert dx.dtype == jnp.float16
    _close(dx, _input_grad64(g, w_nk, transpose=True))
    # per-example gradients: vmap over the rows
    dxs = jax.vmap(jax.grad(lambda xi, gi: jnp.vdot(nv.linear(xi, w_nk).astype(jnp.float32), gi)))(
        x, g
    )
    _close(dxs, _input_grad64(g, w_nk, transpose=True))


def test_backward_keeps_the_quantized_weight_not_a_dense_copy(rng):
    """The residuals between forward and backward are the NVFP4 weight (and no [N, K] dense
    weight): the dense e2m1 · scale is rebuilt in the backward pass."""
    k, n = 256, 128
    w = nv.prepare(_weight(rng, k, n))
    x = jnp.asarray(rng.standard_normal((4, k)), jnp.bfloat16)
    for backend in ("xla", "pallas"):
        _, vjp = jax.vjp(lambda x, backend=backend: nv.matmul(x, w, backend=backend), x)
        big = [
            (r.shape, r.dtype)
            for r in jax.tree_util.tree_leaves(vjp)
            if r.size >= n * k and jnp.issubdtype(r.dtype, jnp.floating)
        ]
        assert not big, big


def test_gradients_cross_lower_for_sm90(rng, monkeypatch):
    """The compiled (not interpreted) gradient path lowers for an H100 on this CPU: the fused
    kernel or the dequantize route forward, the Pallas dequantize kernel rematerialized in
    the backward pass. (grouped_matmul's backward adds lax.ragged_dot, which does not lower
    under the abstract mesh of a cross-lowering.)"""
    monkeypatch.setattr(backends, "interpret_pallas", lambda: False)
    w = nv.prepare(_weight(rng, 256, 128))
    for m in (8, 2048):
        x = jnp.asarray(rng.standard_normal((m, 256)), jnp.bfloat16)
        loss = lambda x: nv.matmul(x, w, backend="pallas").astype(jnp.float32).sum()
        calls = [ln for ln in cross_lower(jax.grad(loss), x).splitlines() if "@mosaic_gpu" in ln]
        # the dequantize kernel reads the NVFP4 codes and scales (the forward is dead code)
        assert calls and all("x128x16xf8E4M3FN>" in ln for ln in calls), calls


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 64, 200, 1024])
@pytest.mark.parametrize("n", [64, 200, 4096])
@pytest.mark.parametrize("k", [16 * 25, 4096])
def test_matmul_grid_gpu(rng, m, n, k):
    w = nv.prepare(_weight(rng, k, n))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
    with backends.record() as log:
        y = jax.jit(lambda x, w, b: nv.matmul(x, w, bias=b))(x, w, bias)
    assert log[0] == backends.Dispatch("matmul", "pallas", "")
    _check(y, x, w, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("n,k", [(200, 16 * 25), (4096, 4096)])
def test_matmul_prefill_gpu(rng, dtype, n, k):
    """M >= 2048 takes the dequantize route (ragged M, odd N, bias)."""
    m = 2048 + 37
    w = nv.prepare(_weight(rng, k, n, dtype), dtype)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    with backends.record() as log:
        y = jax.jit(lambda x, w, b: nv.matmul(x, w, bias=b))(x, w, bias)
    assert log[-1] == backends.Dispatch("matmul", "pallas", "dequantize")
    _check(y, x, w, bias)


@pytest.mark.gpu
def test_matmul_fp16_batch_gpu(rng):
    w = _weight(rng, 4096, 4096, jnp.float16)
    x = jnp.asarray(rng.standard_normal((2, 7, 4096)), jnp.float16)
    y = nv.matmul(x, w)
    _check(y.reshape(14, 4096), x.reshape(14, 4096), w)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 37, 2100])
def test_gradients_gpu(rng, m):
    """The backward pass on the GPU: the Pallas dequantize kernel (rematerialized) and XLA's
    dot, after the fused kernel (or the dequantize route) in the forward pass."""
    k, n = 1040, 520
    w = nv.prepare(_weight(rng, k, n))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    loss = lambda x, b: jnp.vdot(nv.matmul(x, w, bias=b).astype(jnp.float32), g)
    dx, db = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, bias)
    assert dx.dtype == jnp.bfloat16 and db.dtype == jnp.bfloat16
    _close(dx, _input_grad64(g, w))
    _close(db, np.asarray(g, np.float64).sum(0))
