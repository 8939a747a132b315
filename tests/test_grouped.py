"""grouped_matmul (MoE) and the moe block: both backends, the tile schedule, the kernel.

Tolerance policy: relative Frobenius error vs float64 per-expert products of the dequantized
weights <= 1e-2 (bf16), plus an element-wise bound so an unwritten row cannot hide; rows past
``sum(group_sizes)`` must be exactly zero. CPU runs the kernel's SMEM variant in the Mosaic GPU
interpreter and cross-lowers the register variant for sm_90; ``gpu`` tests compile it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cross_lowering import cross_lower
from hypothesis import given
from hypothesis import strategies as st
from race_detection import RACES, races_found

import nvfp4_jax as nv
from nvfp4_jax import backends
from nvfp4_jax.kernels import gemm

gpu = pytest.mark.gpu
G = gemm.GemmConfig


def _experts(rng, e, k, n, per_expert_scale=True, dtype=jnp.float32):
    w = rng.standard_normal((e, k, n)) * 10.0 ** rng.uniform(-2, 1, size=(e, 1, 1))
    w = jnp.asarray(w, dtype)
    if per_expert_scale:
        return jax.vmap(lambda a: nv.quantize(a, axis=0))(w)
    return nv.quantize(w, axis=1)  # one tensor scale for all experts


def _reference64(x, w, group_sizes):
    wd = np.asarray(nv.dequantize(w, jnp.float32), np.float64)
    xs = np.asarray(x.astype(jnp.float32), np.float64)
    ref = np.zeros((x.shape[0], wd.shape[2]))
    start = 0
    for e, g in enumerate(np.asarray(group_sizes)):
        ref[start : start + g] = xs[start : start + g] @ wd[e]
        start += g
    return ref, start


def _check(y, x, w, group_sizes, tol=1e-2):
    ref, used = _reference64(x, w, group_sizes)
    y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
    assert y.shape == ref.shape
    assert np.isfinite(y).all()
    assert (y[used:] == 0).all(), "rows past sum(group_sizes) must be zero"
    if used:
        err = np.linalg.norm(y[:used] - ref[:used]) / np.linalg.norm(ref[:used])
        assert err <= tol, err
        np.testing.assert_allclose(y, ref, atol=0.05 * np.abs(ref).max(), rtol=0.05)


# Group sizes: zeros, one expert taking everything, a sum below T, groups longer than a
# token tile, T not a multiple of any tile.
GROUPS = {
    "mixed": ([5, 0, 9, 3], 20),
    "one_expert_all": ([0, 0, 13, 0], 13),
    "all_empty": ([0, 0, 0, 0], 6),
    "singletons": ([1, 1, 0, 1], 3),
    "long_group": ([2, 37, 0, 1], 41),
}


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("case", sorted(GROUPS))
def test_grouped_matmul_matches_float64(rng, backend, case):
    sizes, t = GROUPS[case]
    e, k, n = len(sizes), 48, 72
    w = _experts(rng, e, k, n, per_expert_scale=case != "singletons")
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    with backends.record() as log:
        y = nv.grouped_matmul(x, w, gs, backend=backend)
    assert [d.backend for d in log] == [backend]
    assert y.dtype == jnp.bfloat16
    _check(y, x, w, gs)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_fp16_prepared_and_jit_with_dynamic_group_sizes(rng, backend):
    e, k, n, t = 3, 80, 64, 17
    w = nv.prepare(_experts(rng, e, k, n, dtype=jnp.float16), jnp.float16)
    assert "prepared with float16-widened scales, k-group 64" in repr(w)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.float16)
    traces = []

    @jax.jit
    def f(x, w, gs):
        traces.append(1)
        return nv.grouped_matmul(x, w, gs, backend=backend)

    for i, sizes in enumerate(([3, 10, 4], [0, 0, 17], [6, 0, 2])):
        gs = jnp.asarray(sizes, jnp.int32)
        y = f(x, w, gs)
        assert y.dtype == jnp.float16
        _check(y, x, w, gs, tol=2e-3)
        if i == 0:
            # The first Pallas call may import (and register config flags of) the Mosaic
            # GPU interpreter, which changes JAX's tracing context once.
            first = len(traces)
    assert len(traces) == first, "changing the routing must not retrace"


@pytest.mark.parametrize(
    "cfg",
    [
        G(tile_n=128, tile_m=8, tile_k=128, stages=2, split_k=2, a_operand="smem"),
        G(tile_n=64, tile_m=16, tile_k=128, stages=2, a_operand="smem"),
        # the output tile stored 8 tokens at a time (the prefill default stores 32)
        G(tile_n=128, tile_m=24, tile_k=128, stages=2, out_chunk=8, a_operand="smem"),
    ],
    ids=["split_k2_tile8", "tile16_k128", "out_chunk8"],
)
def test_kernel_configs_in_interpreter(rng, cfg):
    sizes, t = [19, 0, 4, 9], 35
    k, n = 256, 136
    w = _experts(rng, len(sizes), k, n)
    prep = gemm.prepare_weight(w.data, w.scales, w.tensor_scale)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    y = gemm.nvfp4_grouped_matmul(x, prep, gs, n=n, k=k, config=cfg, interpret=True)
    _check(y, x, w, gs)


def test_grouped_kernel_has_no_races(rng):
    """Expert tiles (and unused tiles that exit at once) under the interpreter's race detector."""
    sizes, t, k, n = [9, 0, 3], 15, 128, 72
    w = _experts(rng, len(sizes), k, n)
    prep = gemm.prepare_weight(w.data, w.scales, w.tensor_scale)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    cfg = G(tile_n=128, tile_m=8, tile_k=128, stages=2, a_operand="smem")
    y = gemm.nvfp4_grouped_matmul(x, prep, gs, n=n, k=k, config=cfg, interpret=RACES)
    assert not races_found()
    _check(y, x, w, gs)


@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=9),
    extra=st.integers(0, 5),
    tile_m=st.sampled_from([8, 16, 64]),
)
def test_tile_schedule_round_trip(sizes, extra, tile_m):
    rows = sum(sizes) + extra
    if rows == 0:
        return
    max_tiles = gemm.max_token_tiles(rows, len(sizes), tile_m)
    assert max_tiles >= sum(-(-g // tile_m) for g in sizes)
    tile_expert, gather, scatter = jax.jit(gemm._tile_schedule, static_argnums=(1, 2, 3))(
        jnp.asarray(sizes, jnp.int32), rows, tile_m, max_tiles
    )
    tile_expert, gather, scatter = map(np.asarray, (tile_expert, gather, scatter))
    used = sum(sizes)
    # Every real row sits in a tile of its own expert, and the gather undoes the scatter.
    expert_of_row = np.repeat(np.arange(len(sizes)), sizes)
    np.testing.assert_array_equal(scatter[used:], -1)
    np.testing.assert_array_equal(gather[scatter[:used]], np.arange(used))
    np.testing.assert_array_equal(tile_expert[scatter[:used] // tile_m], expert_of_row)
    # Padding rows gather nothing; unused tiles hold no rows.
    assert ((gather == rows) | np.isin(np.arange(gather.size), scatter[:used])).all()
    assert (gather[np.repeat(tile_expert < 0, tile_m)] == rows).all()


def test_prepared_stack_is_per_expert_prepare(rng):
    """The stacked layout is the per-expert layout: no scale factor is shared or folded."""
    w = _experts(rng, 3, 64, 48)
    stacked = nv.prepare(w).prepared
    for e in range(3):
        one = gemm.prepare_weight(w.data[e], w.scales[e], w.tensor_scale[e])
        for a, b in zip(one, stacked):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b[e]).reshape(np.shape(a)))


def test_marlin_shared_scale_factor_equals_per_expert_dequantization(rng):
    """Marlin's S0E5M3 scales need one factor for all experts (vLLM's
    prepare_moe_fp4_layer_for_marlin); with it, every expert decodes exactly."""
    w = _experts(rng, 4, 64, 32)
    scales = [w.scales[e] for e in range(4)]
    shared = nv.marlin_compute_scale_factor(jnp.concatenate(scales))
    for e in range(4):
        proc, sf = nv.marlin_process_scales(scales[e], scale_factor=shared)
        assert float(sf) == float(shared)
        decoded = np.asarray(nv.marlin_decode_scales(proc, jnp.bfloat16).astype(jnp.float32))
        gscale = float(nv.marlin_process_global_scale(w.tensor_scale[e], jnp.bfloat16, sf))
        # Marlin's bf16 decode gives e2m1 * 2^-126 times scale * 2^7 * sf times gscale.
        per_block = decoded.astype(np.float64) * 2.0**-126 * gscale
        want = np.asarray(w.scales[e].astype(jnp.float32), np.float64) * float(w.tensor_scale[e])
        np.testing.assert_allclose(per_block, want, rtol=1e-6)


def test_bad_inputs(rng):
    w = _experts(rng, 2, 32, 16)
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.bfloat16)
    gs = jnp.asarray([1, 3], jnp.int32)
    with pytest.raises(TypeError, match="w must be an NVFP4Array"):
        nv.grouped_matmul(x, jnp.ones((2, 32, 16)), gs)
    with pytest.raises(TypeError, match="x must be bfloat16 or float16"):
        nv.grouped_matmul(x.astype(jnp.float32), w, gs)
    with pytest.raises(ValueError, match=r"x must have shape \[T, 32\]"):
        nv.grouped_matmul(x[:, :16], w, gs)
    with pytest.raises(ValueError, match=r"logical shape \[E, K, N\]"):
        nv.grouped_matmul(x, nv.quantize(jnp.ones((32, 16)), axis=0), gs)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        nv.grouped_matmul(x, w, jnp.asarray([4], jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        nv.grouped_matmul(x, w, jnp.asarray([1.0, 3.0]))
    with pytest.raises(ValueError, match="sum to at most the 4 rows"):
        nv.grouped_matmul(x, w, jnp.asarray([2, 3], jnp.int32))
    with pytest.raises(ValueError, match=">= 0"):
        nv.grouped_matmul(x, w, jnp.asarray([-1, 3], jnp.int32))
    assert nv.grouped_matmul(x[:0], w, jnp.zeros(2, jnp.int32)).shape == (0, 16)
    stream = gemm.GemmConfig(tile_n=64, tile_m=8, tile_k=64, stream_k=4, a_operand="smem")
    with pytest.raises(ValueError, match="runs neither stream-K nor k_fold"):
        nv.grouped_matmul(x, w, gs, backend="pallas", config=stream)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("top_k,renormalize", [(2, True), (1, False)])
def test_moe_block_matches_dense_reference(rng, backend, top_k, renormalize):
    e, h, inter, t = 4, 64, 48, 13
    w13 = _experts(rng, e, h, 2 * inter)
    w2 = _experts(rng, e, inter, h)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((t, e)) * 2, jnp.float32)
    y = nv.moe.moe(x, logits, w13, w2, top_k=top_k, renormalize=renormalize, backend=backend)
    ref = nv.moe.moe_reference(x, logits, w13, w2, top_k=top_k, renormalize=renormalize)
    y64, r64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (y, ref))
    assert y.shape == (t, h) and y.dtype == jnp.bfloat16
    assert np.linalg.norm(y64 - r64) / np.linalg.norm(r64) <= 1e-2


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_grouped_input_gradient(rng, backend):
    """grad_x row t of expert e = g[t] @ W_eᵀ; rows past sum(group_sizes) get zero."""
    e, k, n, sizes = 4, 64, 40, [5, 0, 9, 3]
    w = _experts(rng, e, k, n)
    t = sum(sizes) + 3
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((t, n)), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    loss = lambda x: jnp.vdot(nv.grouped_matmul(x, w, gs, backend=backend).astype(jnp.float32), g)
    dx = jax.jit(jax.grad(loss))(x)
    assert dx.dtype == jnp.bfloat16
    wd = np.asarray(nv.dequantize(w, jnp.float32), np.float64)  # [E, K, N]
    experts = np.repeat(np.arange(e), sizes)
    ref = np.zeros((t, k))
    for row, ex in enumerate(experts):
        ref[row] = np.asarray(g[row], np.float64) @ wd[ex].T
    got = np.asarray(dx.astype(jnp.float32), np.float64)
    assert (got[len(experts) :] == 0).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-2


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_moe_block_gradients_match_dense_reference(rng, backend):
    """Gradients of the moe block in x and in the router logits (through the routing
    weights) against those of the dense reference."""
    e, h, inter, t = 4, 64, 32, 9
    w13 = _experts(rng, e, h, 2 * inter)
    w2 = _experts(rng, e, inter, h)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((t, e)) * 2, jnp.float32)
    g = jnp.asarray(rng.standard_normal((t, h)), jnp.float32)
    moe = lambda *a, **kw: nv.moe.moe(*a, **kw, backend=backend)
    _check_moe_grads(moe, x, logits, w13, w2, g)


def _check_moe_grads(moe, x, logits, w13, w2, g):
    """Gradients of ``vdot(moe(x, logits), g)`` in x and logits (jitted) against those of
    ``moe_reference``: relative Frobenius error <= 2e-2 (bf16 intermediates)."""

    def grads(fn):
        loss = lambda x, lg: jnp.vdot(fn(x, lg, w13, w2, top_k=2).astype(jnp.float32), g)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, logits)

    for a, b in zip(grads(moe), grads(nv.moe.moe_reference)):
        a64, b64 = (np.asarray(v.astype(jnp.float32), np.float64) for v in (a, b))
        assert a.dtype == b.dtype and np.isfinite(a64).all()
        assert np.linalg.norm(a64 - b64) / np.linalg.norm(b64) <= 2e-2


def test_route_and_moe_errors(rng):
    w, p = nv.moe.route(jnp.asarray([[0.0, 1.0, 2.0]]), 2)
    np.testing.assert_array_equal(np.asarray(p), [[2, 1]])
    np.testing.assert_allclose(float(w.sum()), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="top_k must be an int in"):
        nv.moe.route(jnp.zeros((2, 3)), 4)
    w13 = _experts(rng, 2, 32, 64)
    w2 = _experts(rng, 2, 16, 32)  # I = 16 does not match 2I = 64
    with pytest.raises(ValueError, match="do not match"):
        nv.moe.moe(jnp.ones((2, 32), jnp.bfloat16), jnp.zeros((2, 2)), w13, w2, top_k=1)
    w2 = _experts(rng, 2, 32, 32)
    with pytest.raises(ValueError, match="expert_axis='ep' is not a mesh axis bound here"):
        nv.moe.moe(
            jnp.ones((2, 32), jnp.bfloat16), jnp.zeros((2, 2)), w13, w2, top_k=1, expert_axis="ep"
        )
    with pytest.raises(ValueError, match=r"router_logits must be \[T, E\] = \[2, 2\]"):
        nv.moe.moe(jnp.ones((2, 32), jnp.bfloat16), jnp.zeros((2, 3)), w13, w2, top_k=1)


_LOWER = {
    "decode": (2, 8, 2048, 4096),
    "prefill": (1024, 8, 2048, 1024),
    # 136-token tiles in 4 stages next to a chunked output: fits SMEM with compact scales
    "prefill_compact_4_stages": (2048, 8, 28672, 4096),
}


@pytest.mark.parametrize("case", sorted(_LOWER))
def test_cross_lowers_for_sm90(case):
    t, e, n, k = _LOWER[case]
    data = jnp.zeros((e, n, k // 2), jnp.uint8)
    scales = jnp.ones((e, n, k // 16), jnp.float8_e4m3fn)
    prep = gemm.prepare_weight(data, scales, jnp.ones((e,), jnp.float32))
    cfg = gemm.default_grouped_config(
        t, e, n, k, num_sms=132, scale_itemsize=prep.scales.dtype.itemsize
    )
    assert cfg.a_operand == "registers"
    if case == "prefill_compact_4_stages":
        assert (cfg.tile_m, cfg.stages, cfg.out_chunk) == (136, 4, 32)
    text = cross_lower(
        lambda x, p, g: gemm.nvfp4_grouped_matmul(x, p, g, n=n, k=k, config=cfg),
        jnp.zeros((t, k), jnp.bfloat16),
        prep,
        jnp.zeros((e,), jnp.int32),
    )
    assert "mosaic_gpu" in text


# -----------------------------------------------------------------------------
# GPU (H100): the compiled register variant through the public API
# -----------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize(
    "e,k,n,sizes",
    [
        (8, 4096, 2048, [1, 0, 0, 1, 0, 0, 0, 0]),  # decode top-2
        (8, 1024, 1000, [40, 0, 300, 1, 0, 0, 155, 9]),  # ragged N, long groups
        (64, 1408, 2048, [3] * 20 + [0] * 44),  # many small experts
        (4, 208, 136, [0, 0, 77, 0]),  # one expert takes everything
    ],
)
def test_gpu_grouped_matmul(rng, e, k, n, sizes):
    w = nv.prepare(_experts(rng, e, k, n))
    t = sum(sizes) + 5
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    with backends.record() as log:
        y = jax.jit(nv.grouped_matmul)(x, w, gs)
    assert [d.backend for d in log] == ["pallas"]
    _check(y, x, w, gs)


@gpu
@pytest.mark.parametrize("split_k_reduce", ["xla", "cluster"])
def test_gpu_grouped_split_k(rng, split_k_reduce):
    """Split-K over expert tiles, unused tiles included."""
    sizes, k, n = [19, 0, 4, 9, 0, 1], 2048, 320
    w = _experts(rng, len(sizes), k, n)
    prep = gemm.prepare_weight(w.data, w.scales, w.tensor_scale)
    x = jnp.asarray(rng.standard_normal((sum(sizes) + 3, k)), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    cfg = G(tile_n=128, tile_m=16, tile_k=128, split_k=4, split_k_reduce=split_k_reduce)
    y = gemm.nvfp4_grouped_matmul(x, prep, gs, n=n, k=k, config=cfg)
    _check(y, x, w, gs)


@gpu
def test_gpu_grouped_prefill_chunked_tiles(rng):
    """The prefill tiling Mixtral's w13 gets at T = 1024 (136-token tiles, 4 stages,
    32-token output chunks, compact scales), over ragged groups, an idle expert and a
    ragged N."""
    e, k, n = 8, 4096, 1000
    sizes = [300, 0, 141, 260, 136, 250, 420, 541]
    w = _experts(rng, e, k, n)
    prep = gemm.prepare_weight(w.data, w.scales, w.tensor_scale)
    x = jnp.asarray(rng.standard_normal((sum(sizes), k)), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    cfg = G(tile_n=256, tile_m=136, tile_k=128, stages=4, out_chunk=32)
    y = gemm.nvfp4_grouped_matmul(x, prep, gs, n=n, k=k, config=cfg)
    _check(y, x, w, gs)


@gpu
def test_gpu_moe_block(rng):
    e, h, inter, t = 8, 1024, 768, 37
    w13 = nv.prepare(_experts(rng, e, h, 2 * inter))
    w2 = nv.prepare(_experts(rng, e, inter, h))
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    y = jax.jit(lambda *a: nv.moe.moe(*a, top_k=2))(x, logits, w13, w2)
    ref = nv.moe.moe_reference(x, logits, w13, w2, top_k=2)
    y64, r64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (y, ref))
    assert np.linalg.norm(y64 - r64) / np.linalg.norm(r64) <= 1e-2
    g = jnp.asarray(rng.standard_normal((t, h)), jnp.float32)
    _check_moe_grads(nv.moe.moe, x, logits, w13, w2, g)  # the backward pass on the GPU


def test_default_grouped_config_fits_smem():
    for rows, e, n, k in [
        (510, 8, 1000, 1024),
        (32, 8, 28672, 4096),
        (16384, 8, 4096, 14336),
        (96, 64, 2816, 2048),
        (2, 8, 4096, 14336),
        (1, 1, 64, 16),
    ]:
        cfg = gemm.default_grouped_config(rows, e, n, k, num_sms=132)
        assert gemm.smem_bytes(cfg, cfg.tile_m) <= gemm._SMEM_BYTES, cfg
        assert (-(-k // cfg.tile_k)) % cfg.split_k == 0
    # Prefill tiles: 4 stages next to an output in 32-token chunks where that fits (with
    # one-byte compact scales also for 136-token tiles), never a chunked output for fewer
    for rows, e, n, k, itemsize, want in [
        (2048, 8, 28672, 4096, 1, (136, 4, 32)),  # Mixtral w13, T = 1024
        (2048, 8, 28672, 4096, 2, (136, 2, 0)),  # widened scales: no room for 4 stages
        (6144, 64, 2816, 2048, 2, (128, 4, 32)),
        (8192, 8, 28672, 4096, 1, (176, 2, 0)),  # chunks would buy a third stage only
        (32, 8, 28672, 4096, 1, (16, 4, 0)),  # decode
    ]:
        cfg = gemm.default_grouped_config(rows, e, n, k, num_sms=132, scale_itemsize=itemsize)
        assert (cfg.tile_m, cfg.stages, cfg.out_chunk) == want, (rows, itemsize)
        assert gemm.smem_bytes(cfg, cfg.tile_m, scale_itemsize=itemsize) <= gemm._SMEM_BYTES
    for bad in (0, 4):
        with pytest.raises(ValueError, match=f"scale_itemsize must be 1 or 2 .* got {bad}"):
            gemm.default_grouped_config(2048, 8, 28672, 4096, scale_itemsize=bad)


def test_moe_example_runs(monkeypatch, capsys):
    import pathlib
    import runpy

    path = pathlib.Path(__file__).parents[1] / "examples" / "moe_nvfp4.py"
    argv = [str(path), "--tokens", "8", "--hidden", "64", "--intermediate", "96", "--experts", "4"]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    err = float(out.split("same NVFP4 weights: ")[1].split()[0])
    assert err < 1e-2, out
    assert "MiB NVFP4" in out


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_vmap_over_tokens_group_sizes_and_weights(rng, backend):
    e, k, n, t = 3, 32, 24, 7
    w = _experts(rng, e, k, n)
    x = jnp.asarray(rng.standard_normal((2, t, k)), jnp.bfloat16)
    gs = jnp.asarray([[2, 0, 5], [1, 4, 1]], jnp.int32)
    y = jax.vmap(lambda xi, gi: nv.grouped_matmul(xi, w, gi, backend=backend))(x, gs)
    assert y.shape == (2, t, n)
    for i in range(2):
        _check(y[i], x[i], w, gs[i])
    ws = jax.tree_util.tree_map(lambda a: jnp.stack([a, a[::-1]]), w)  # two stacks of experts
    y = jax.vmap(lambda wi: nv.grouped_matmul(x[0], wi, gs[0], backend=backend))(ws)
    for i in range(2):
        _check(y[i], x[0], jax.tree_util.tree_map(lambda a, i=i: a[i], ws), gs[0])
