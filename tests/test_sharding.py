"""Sharding: tensor parallelism inside ``jax.shard_map`` with ``sharding.shard_specs`` (column
and row parallel); under an explicit mesh (``jax.make_mesh``'s default) matmul/linear run data
parallel over the rows of x, and sharded weights, a sharded contraction dim and sharded
grouped inputs raise clear errors.

The execution test runs in a subprocess with 4 virtual CPU devices (the device count is fixed
when jax starts) on the XLA backend: the Mosaic GPU interpreter does not run under a
multi-device shard_map. The Pallas path is cross-lowered for two abstract H100s instead.
"""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cross_lowering import H100
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nvfp4_jax as nv
from nvfp4_jax import backends

_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import nvfp4_jax as nv

    seed = int(sys.argv[1])
    mesh = jax.make_mesh((2, 2), ("dp", "mp"))  # explicit axes (the default)
    keys = jax.random.split(jax.random.key(seed), 4)
    w = nv.prepare(nv.quantize(jax.random.normal(keys[0], (256, 200), jnp.bfloat16), axis=0))
    w_nk = nv.quantize(jax.random.normal(keys[1], (200, 256), jnp.bfloat16))
    bias = jax.random.normal(keys[2], (200,), jnp.float32)
    x0 = jax.random.normal(keys[3], (4, 6, 256), jnp.bfloat16)
    ref = nv.matmul(x0, w, bias=bias, backend="xla")
    ref_nk = nv.linear(x0, w_nk, backend="xla")
    loss = lambda x: nv.matmul(x, w, bias=bias).astype(jnp.float32).sum()
    grad_ref = jax.grad(loss)(x0)
    f32 = lambda a: np.asarray(a.astype(jnp.float32))

    def same(a, b):  # up to one bf16 rounding: XLA:CPU may sum a shard's rows in another order
        a, b = f32(a), f32(b)
        np.testing.assert_allclose(a, b, rtol=2**-7, atol=1e-5 * float(np.abs(b).max()))

    def moe_case(key, e, h, inter, t):
        k = jax.random.split(key, 4)
        stack = lambda k, shape: jax.vmap(lambda a: nv.quantize(a, axis=0))(
            jax.random.normal(k, shape, jnp.bfloat16))
        return (stack(k[0], (e, h, 2 * inter)), stack(k[1], (e, inter, h)),
                jax.random.normal(k[2], (t, h), jnp.bfloat16),
                jax.random.normal(k[3], (t, e), jnp.float32))

    def check_moe(y, x, logits, w13, w2, top_k):
        ref = nv.moe.moe_reference(x, logits, w13, w2, top_k=top_k)
        y64, r64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (y, ref))
        assert np.linalg.norm(y64 - r64) / np.linalg.norm(r64) <= 1e-2
    for spec in (P("dp"), P("dp", "mp"), P(("dp", "mp"))):
        x = jax.device_put(x0, NamedSharding(mesh, spec))
        with jax.set_mesh(mesh):
            y = jax.jit(lambda x: nv.matmul(x, w, bias=bias, backend="xla"))(x)
            y_eager = nv.linear(x, w_nk, backend="xla")
            g = jax.jit(jax.grad(loss))(x)
        want = tuple(spec) + (None,) * (3 - len(spec))
        assert tuple(y.sharding.spec) == want, (y.sharding.spec, want)
        assert tuple(g.sharding.spec) == want, (g.sharding.spec, want)
        same(y, ref)
        same(y_eager, ref_nk)
        same(g, grad_ref)
    # moe: tokens sharded along rows (the logits resharded to match), experts replicated
    w13d, w2d, xd, lg = moe_case(keys[0], 4, 64, 32, 8)
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x, lg: nv.moe.moe(x, lg, w13d, w2d, top_k=2, backend="xla"))(
            jax.device_put(xd, NamedSharding(mesh, P("dp"))), lg)
    assert tuple(y.sharding.spec) == ("dp", None), y.sharding.spec
    check_moe(y, xd, lg, w13d, w2d, 2)
    errors = {
        "x_k": lambda: nv.matmul(jax.device_put(x0, NamedSharding(mesh, P(None, None, "mp"))), w),
        "w": lambda: nv.linear(x0, nv.NVFP4Array(
            jax.device_put(w_nk.data, NamedSharding(mesh, P("mp"))), w_nk.scales,
            w_nk.tensor_scale)),
        "bias": lambda: nv.matmul(x0, w, bias=jax.device_put(bias, NamedSharding(mesh, P("mp")))),
        "moe_w": lambda: nv.moe.moe(
            jax.device_put(xd, NamedSharding(mesh, P("dp"))), lg,
            jax.device_put(w13d, NamedSharding(mesh, P("mp"))), w2d, top_k=2),
        "grouped": lambda: nv.grouped_matmul(
            jax.device_put(x0[0], NamedSharding(mesh, P("dp"))),
            jax.vmap(lambda a: nv.quantize(a, axis=0))(jnp.ones((2, 256, 64))),
            jnp.array([2, 2])),
    }
    # Tensor parallelism inside shard_map (the README recipe), a prepared weight.
    from nvfp4_jax.sharding import shard_specs, shard_weight
    tp = jax.make_mesh((4,), ("tp",))
    k1 = jax.random.split(keys[3], 3)
    wp = nv.prepare(nv.quantize(jax.random.normal(k1[0], (512, 256), jnp.bfloat16), axis=0))
    x1 = jax.random.normal(k1[1], (24, 512), jnp.bfloat16)
    b1 = jax.random.normal(k1[2], (256,), jnp.float32)
    wd = np.asarray(nv.dequantize(wp, jnp.float32), np.float64)
    ref64 = np.asarray(x1.astype(jnp.float32), np.float64) @ wd + np.asarray(b1, np.float64)
    col_specs, row_specs = shard_specs(wp, tp, n="tp"), shard_specs(wp, tp, k="tp")
    col = jax.jit(jax.shard_map(
        lambda x, w, b: nv.matmul(x, w, bias=b, backend="xla"), mesh=tp,
        in_specs=(P(), col_specs, P("tp")), out_specs=P(None, "tp")))
    row = jax.jit(jax.shard_map(
        lambda x, w: jax.lax.psum(nv.matmul(x, w, backend="xla"), "tp"), mesh=tp,
        in_specs=(P(None, "tp"), row_specs), out_specs=P()))
    with jax.set_mesh(tp):
        w_col, w_row = shard_weight(wp, tp, n="tp"), shard_weight(wp, tp, k="tp")
        assert w_col.prepared.data.sharding.spec == P(None, "tp", None)
        assert w_row.data.sharding.spec == P(None, "tp")
        b_col = jax.device_put(b1, NamedSharding(tp, P("tp")))
        x_row = jax.device_put(x1, NamedSharding(tp, P(None, "tp")))
        outs = {"column": col(x1, w_col, b_col), "row": row(x_row, w_row) + b1.astype(jnp.bfloat16)}
    for name, y in outs.items():
        y = np.asarray(y.astype(jnp.float32), np.float64)
        err = np.linalg.norm(y - ref64) / np.linalg.norm(ref64)
        assert err <= 1e-2, (name, err)
    # MoE tensor parallelism: w13 split along its (interleaved) outputs, w2 along K.
    from nvfp4_jax.sharding import interleave_gate_up
    w13, w2, xm, logits = moe_case(keys[2], 4, 256, 512, 9)
    w13p, w2p = nv.prepare(interleave_gate_up(w13, 4)), nv.prepare(w2)
    s13, s2 = shard_specs(w13p, tp, n="tp"), shard_specs(w2p, tp, k="tp")
    moe_tp = jax.jit(jax.shard_map(
        lambda x, lg, a, b: jax.lax.psum(nv.moe.moe(x, lg, a, b, top_k=2, backend="xla"), "tp"),
        mesh=tp, in_specs=(P(), P(), s13, s2), out_specs=P()))
    y = moe_tp(xm, logits, shard_weight(w13p, tp, n="tp"), shard_weight(w2p, tp, k="tp"))
    check_moe(y, xm, logits, w13, w2, 2)
    # MoE expert parallelism: 8 experts, 2 per device.
    w13, w2, xm, logits = moe_case(keys[1], 8, 64, 32, 11)
    w13p, w2p = nv.prepare(w13), nv.prepare(w2)
    s13, s2 = shard_specs(w13p, tp, e="tp"), shard_specs(w2p, tp, e="tp")
    assert s13.prepared.tensor_scale == P("tp") and s13.data == P("tp", None, None)
    moe_ep = jax.jit(jax.shard_map(
        lambda x, lg, a, b: nv.moe.moe(x, lg, a, b, top_k=3, backend="xla", expert_axis="tp"),
        mesh=tp, in_specs=(P(), P(), s13, s2), out_specs=P()))
    y = moe_ep(xm, logits, shard_weight(w13p, tp, e="tp"), shard_weight(w2p, tp, e="tp"))
    check_moe(y, xm, logits, w13, w2, 3)
    try:
        shard_specs(w, tp, n="tp")
    except ValueError as e:
        print("specs", "|", e)
    for name, call in errors.items():
        try:
            with jax.set_mesh(mesh):
                call()
        except ValueError as e:
            print(name, "|", e)
        else:
            raise AssertionError(name + " did not raise")
    print("OK")
    """
)


def test_data_parallel_rows_on_an_explicit_mesh(rng):
    """Rows sharded over one or two mesh axes: the unsharded values (up to one bf16 rounding),
    output and gradient sharded like x; clear errors for what is not data parallelism."""
    seed = int(rng.integers(2**31))
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(seed)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = dict(ln.split(" | ", 1) for ln in run.stdout.splitlines() if " | " in ln)
    assert "sharded along its last (contraction) dim" in lines["x_k"]
    assert "w is sharded (P('mp', None)" in lines["w"] and "jax.shard_map" in lines["w"]
    assert "bias is sharded" in lines["bias"]
    assert "grouped_matmul: x is sharded" in lines["grouped"]
    assert "moe: w13 is sharded" in lines["moe_w"]
    assert "N (output features) = 200 must be a multiple of 16 x 4" in lines["specs"]
    assert run.stdout.strip().endswith("OK")


def test_data_parallel_pallas_cross_lowers_for_two_h100s(rng, monkeypatch):
    """On GPUs the kernel runs per device on the local rows: lowered for a 2-device explicit
    mesh, the Mosaic GPU call makes 8 of the 16 rows (from 8 rows of x, here K-folded into
    the view [16, 128])."""
    monkeypatch.setattr(backends, "interpret_pallas", lambda: False)
    mesh = AbstractMesh((2,), ("dp",), axis_types=(AxisType.Explicit,), abstract_device=H100)
    w = nv.prepare(nv.quantize(jnp.asarray(rng.standard_normal((256, 512)), jnp.bfloat16), axis=0))
    with jax.sharding.use_abstract_mesh(mesh):
        x = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("dp")))
        fn = jax.jit(lambda x: nv.matmul(x, w, backend="pallas"))
        text = fn.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    calls = [ln for ln in text.splitlines() if "@mosaic_gpu" in ln]
    assert len(calls) == 1 and "-> tensor<8x512xbf16>" in calls[0], calls


def test_column_parallel_pallas_cross_lowers_for_two_h100s(rng, monkeypatch):
    """Tensor parallelism with the kernel: each device's Mosaic GPU call reads half of the
    prepared codes and scales (column parallel, shard_specs' in_specs)."""
    monkeypatch.setattr(backends, "interpret_pallas", lambda: False)
    mesh = AbstractMesh((2,), ("tp",), axis_types=(AxisType.Explicit,), abstract_device=H100)
    w = nv.prepare(nv.quantize(jnp.asarray(rng.standard_normal((256, 512)), jnp.bfloat16), axis=0))
    specs = nv.sharding.shard_specs(w, mesh, n="tp")
    with jax.sharding.use_abstract_mesh(mesh):
        x = jax.ShapeDtypeStruct((16, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
        w_tp = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
            w,
            specs,
        )
        fn = jax.shard_map(
            lambda x, w: nv.matmul(x, w, backend="pallas"),
            mesh=mesh,
            in_specs=(P(), specs),
            out_specs=P(None, "tp"),
        )
        text = jax.jit(fn).trace(x, w_tp).lower(lowering_platforms=("cuda",)).as_text()
    calls = [ln for ln in text.splitlines() if "@mosaic_gpu" in ln]
    assert len(calls) == 1 and "tensor<2x256x32xui16>, tensor<2x16x128xui8>" in calls[0], calls


def test_shard_specs_bad_input(rng):
    mesh = AbstractMesh((4,), ("tp",), axis_types=(AxisType.Explicit,))
    w = nv.quantize(jnp.asarray(rng.standard_normal((256, 128)), jnp.bfloat16), axis=0)
    specs = nv.sharding.shard_specs(w, mesh, n="tp")
    assert (specs.data, specs.scales, specs.tensor_scale) == (P("tp", None), P("tp", None), P())
    with pytest.raises(TypeError, match="w must be an NVFP4Array, got ArrayImpl"):
        nv.sharding.shard_specs(w.data, mesh, n="tp")
    stacked_nk = nv.quantize(jnp.ones((2, 32, 64)))  # blocked on the last logical axis
    with pytest.raises(ValueError, match=r"2-D weight .* logical shape \(2, 32, 64\)"):
        nv.sharding.shard_specs(stacked_nk, mesh, n="tp")
    experts = jax.vmap(lambda a: nv.quantize(a, axis=0))(jnp.ones((2, 32, 64)))
    assert nv.sharding.shard_specs(experts, mesh, n="tp").data == P(None, "tp", None)
    with pytest.raises(ValueError, match=r"E \(experts\) = 2 must be a multiple of 1 x 4"):
        nv.sharding.shard_specs(experts, mesh, e="tp")
    with pytest.raises(ValueError, match="e='tp' splits experts, but w is a 2-D weight"):
        nv.sharding.shard_specs(w, mesh, e="tp")
    with pytest.raises(ValueError, match=r"k='dp' names no axis of the mesh \(axes \('tp',\)\)"):
        nv.sharding.shard_specs(w, mesh, k="dp")
    with pytest.raises(
        ValueError, match=r"K \(contraction dim\) = 256 must be a multiple of 128 x 4"
    ):
        nv.sharding.shard_specs(nv.prepare(w), mesh, k="tp")


def test_interleave_gate_up_permutes_outputs(rng):
    """Device p's contiguous slice of the interleaved outputs is [gate_p; up_p]; a prepared
    layout is permuted like preparing the permuted weight."""
    e, h, inter, parts = 2, 128, 64, 4
    w13 = jax.vmap(lambda a: nv.quantize(a, axis=0))(
        jnp.asarray(rng.standard_normal((e, h, 2 * inter)), jnp.bfloat16)
    )
    dense = np.asarray(nv.dequantize(w13, jnp.float32))  # [E, H, 2I]
    got = np.asarray(nv.dequantize(nv.sharding.interleave_gate_up(w13, parts), jnp.float32))
    chunk = inter // parts
    for p in range(parts):
        local = got[..., 2 * chunk * p : 2 * chunk * (p + 1)]
        np.testing.assert_array_equal(local[..., :chunk], dense[..., p * chunk : (p + 1) * chunk])
        np.testing.assert_array_equal(
            local[..., chunk:], dense[..., inter + p * chunk : inter + (p + 1) * chunk]
        )
    moved = nv.sharding.interleave_gate_up(nv.prepare(w13), parts).prepared
    want = nv.prepare(nv.sharding.interleave_gate_up(w13, parts)).prepared
    for a, b in zip(moved, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"2I = 128 outputs must be a multiple of 16 x 16"):
        nv.sharding.interleave_gate_up(w13, 16)
    with pytest.raises(ValueError, match="stack of expert weights"):
        nv.sharding.interleave_gate_up(nv.quantize(jnp.ones((32, 64)), axis=0), 2)
    with pytest.raises(ValueError, match="parts must be a positive int"):
        nv.sharding.interleave_gate_up(w13, 0)
