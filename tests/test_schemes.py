"""nvfp4_jax.schemes.NVFP4Linear: W4A16 = nvfp4_jax.linear, W4A4 = vLLM's emulation path
(``run_nvfp4_emulations``, re-implemented here in torch from vLLM's reference code), and
building layers from checkpoints (single, fused partitions, errors)."""

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import nvfp4_jax as nv
from nvfp4_jax import checkpoint as ckpt
from nvfp4_jax.schemes import NVFP4Linear

try:
    import torch
except ImportError:  # only the comparison with vLLM's torch code needs it
    torch = None

F32 = np.float32
BF16 = ml_dtypes.bfloat16
needs_torch = pytest.mark.skipif(
    torch is None, reason="needs torch (test extra): vLLM's emulation is torch code"
)


# -- vLLM's emulation path, in torch (nvfp4_emulation_utils, post-2026 convention) ----------


def _cast_to_fp4(x):
    sign = torch.sign(x)
    x = torch.abs(x)
    x[(x >= 0.0) & (x <= 0.25)] = 0.0
    x[(x > 0.25) & (x < 0.75)] = 0.5
    x[(x >= 0.75) & (x <= 1.25)] = 1.0
    x[(x > 1.25) & (x < 1.75)] = 1.5
    x[(x >= 1.75) & (x <= 2.5)] = 2.0
    x[(x > 2.5) & (x < 3.5)] = 3.0
    x[(x >= 3.5) & (x <= 5.0)] = 4.0
    x[x > 5.0] = 6.0
    return x * sign


def _reciprocal(x):
    return 1.0 / (x + (x == 0) * 1e8)


def _ref_nvfp4_quant(x, global_scale, block_size=16):
    m, n = x.shape
    x = torch.reshape(x, (m, n // block_size, block_size))
    vec_max = torch.max(torch.abs(x), dim=-1, keepdim=True)[0].to(torch.float32)
    scale = global_scale * (vec_max * (1 / 6.0))
    scale = torch.clamp(scale, max=448, min=-448)
    scale = scale.to(torch.float8_e4m3fn).to(torch.float32)
    output_scale = _reciprocal(scale * _reciprocal(global_scale))
    scaled_x = x.to(torch.float32) * output_scale
    clipped_x = torch.clamp(scaled_x, -6.0, 6.0).reshape(m, n)
    return _cast_to_fp4(clipped_x), scale.squeeze(-1)


def _ref_nvfp4_quant_dequant(x, global_scale, block_size=16):
    m, n = x.shape
    fp4, scale = _ref_nvfp4_quant(x, global_scale, block_size)
    out = fp4.reshape(m, n // block_size, block_size) * (scale / global_scale).unsqueeze(-1)
    return out.reshape(m, n).to(x.dtype)


def _dequantize_to_dtype(packed, scale, global_scale, dtype, block_size=16):
    m, k2 = packed.shape
    low, high = packed & 0xF, packed >> 4
    codes = torch.stack((low, high), dim=-1).reshape(m, 2 * k2)
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    vals = table[(codes & 7).long()] * torch.where((codes & 8) != 0, -1.0, 1.0)
    sf = scale.to(torch.float32) * global_scale
    out = vals.reshape(m, -1, block_size) * sf.unsqueeze(-1)
    return out.reshape(m, 2 * k2).to(dtype)


def _run_nvfp4_emulations(x, input_global_scale, weight, weight_scale, weight_global_scale):
    x_dq = _ref_nvfp4_quant_dequant(x, input_global_scale, 16)
    w_dq = _dequantize_to_dtype(weight, weight_scale, weight_global_scale, x.dtype, 16)
    return torch.matmul(x_dq, w_dq.t()), x_dq, w_dq


def _t(a):
    a = np.array(a)  # a writable copy
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if a.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(np.array(a))


def _np(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def _layer(rng, n=96, k=128, bias=True):
    w = nv.quantize(jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.bfloat16))
    b = jnp.asarray(rng.standard_normal(n), jnp.bfloat16) if bias else None
    return w, b


# -- W4A16 --------------------------------------------------------------------------------


def test_w4a16_is_nvfp4_linear(rng):
    w, b = _layer(rng)
    x = jnp.asarray(rng.standard_normal((2, 5, 128)), jnp.bfloat16)
    layer = NVFP4Linear(w, b)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(nv.linear(x, w, b)))
    # Under jit against jitted nv.linear: XLA:CPU may order the f32 sums of one fused program
    # differently from the op-by-op one (one bf16 ulp in 1 of 960 outputs was seen).
    jitted = jax.jit(lambda layer, x: layer(x))(layer, x)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(jax.jit(nv.linear)(x, w, b)))


# -- W4A4 emulation vs vLLM ------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("bias", [True, False])
def test_w4a4_matches_vllm_emulation(rng, bias):
    w, b = _layer(rng, bias=bias)
    m, k = 24, 128
    x = jnp.asarray(rng.standard_normal((m, k)) * np.exp(rng.uniform(-2, 2, (m, 1))), jnp.bfloat16)
    input_scale = jnp.float32(
        np.abs(np.asarray(x, F32)).max() / 2688 * 0.7
    )  # some clipping, as static scales do
    layer = NVFP4Linear(w, b, input_scale, "w4a4")
    assert layer.alpha == input_scale * w.tensor_scale
    out = np.asarray(layer(x))

    # vLLM: input_global_scale_inv = (1 / input_global_scale).to(f32); weight_global_scale = weight_scale_2.
    gs = torch.tensor(1.0, dtype=torch.float32) / _t(np.float32(input_scale))
    assert gs.item() == np.float32(layer.activation_global_scale)
    ref, x_dq, w_dq = _run_nvfp4_emulations(
        _t(np.asarray(x)), gs, _t(w.data), _t(w.scales), _t(np.float32(w.tensor_scale))
    )
    if bias:
        ref = ref + _t(np.asarray(b))

    # Weights: vLLM's dequantize_to_dtype is ours, bit for bit.
    np.testing.assert_array_equal(
        _np(w_dq).view(np.int16), np.asarray(nv.dequantize(w, jnp.bfloat16)).view(np.int16)
    )
    # Activations: same codes and block scales as vLLM's ref_nvfp4_quant ...
    fp4, scale = _ref_nvfp4_quant(_t(np.asarray(x)), gs)
    xq = nv.quantize(x, global_scale=layer.activation_global_scale)
    np.testing.assert_array_equal(np.asarray(xq.scales).astype(F32), scale.numpy())
    np.testing.assert_array_equal(np.asarray(nv.e2m1_to_float(nv.unpack_fp4(xq.data))), fp4.numpy())
    # ... dequantized with scale * (1/gs) instead of scale / gs: equal after the bf16 cast
    # except where those two float32 factors round to different bf16 values.
    ours_dq = np.asarray(nv.quant_dequant(x, global_scale=layer.activation_global_scale))
    vals = fp4.numpy().reshape(m, -1, 16)
    s, g = scale.numpy(), F32(gs.item())
    div = (vals * (s / g)[..., None]).reshape(m, k).astype(BF16)
    mul = (vals * (s * (F32(1) / g))[..., None]).reshape(m, k).astype(BF16)
    np.testing.assert_array_equal(_np(x_dq).view(np.int16), div.view(np.int16))
    np.testing.assert_array_equal(ours_dq.view(np.int16), mul.view(np.int16))
    # GEMM: float32 accumulation in a different order, one bf16 rounding: within one bf16 ulp
    # (plus the bias add in bf16). Recompute ours from vLLM's x_dq to isolate the GEMM.
    same_in = np.asarray(
        jnp.dot(
            jnp.asarray(_np(x_dq)),
            nv.dequantize(w, jnp.bfloat16).T,
            preferred_element_type=jnp.float32,
        ).astype(jnp.bfloat16)
    )
    ref_nb = _np(torch.matmul(x_dq, w_dq.t())).astype(F32)
    # One bf16 ulp is at most 2^-7 relative (at the bottom of a binade); the two float32 sums
    # differ by at most ~k * 2^-24 * sum|x_i w_i| each, which matters only under cancellation.
    xf, wf = _np(x_dq).astype(np.float64), _np(w_dq).astype(np.float64)
    accumulation = 2 * k * 2.0**-24 * (np.abs(xf) @ np.abs(wf).T)
    diff = np.abs(same_in.astype(np.float64) - ref_nb)
    bound = 2.0**-7 * np.abs(ref_nb.astype(np.float64)) + accumulation
    assert np.all(diff <= bound), np.max(diff - bound)
    # And end to end (including the rare x_dq ulp differences).
    err = np.linalg.norm(out.astype(F32) - _np(ref).astype(F32)) / np.linalg.norm(
        _np(ref).astype(F32)
    )
    assert err < 4e-3, err


def test_w4a4_under_jit_and_errors(rng):
    w, b = _layer(rng)
    layer = NVFP4Linear(w, b, jnp.float32(0.002), "w4a4")
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda l, x: l(x))(layer, x)), np.asarray(layer(x))
    )
    with pytest.raises(TypeError, match="x must be bfloat16 or float16, got float32"):
        layer(x.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 128\]"):
        layer(x[:, :64])
    with pytest.raises(ValueError, match="'w4a4' needs input_scale"):
        NVFP4Linear(w, b, None, "w4a4")(x)
    with pytest.raises(ValueError, match="alpha needs an input_scale"):
        _ = NVFP4Linear(w).alpha


# -- from_checkpoint -------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, rng):
    """A ModelOpt-style checkpoint with q/k/v of different tensor scales and a biased o_proj."""
    weights, input_scales, dense = {}, {}, {}
    for name, n, scale in [
        ("q_proj", 64, 1.0),
        ("k_proj", 32, 0.5),
        ("v_proj", 32, 0.25),
        ("o_proj", 64, 1.0),
    ]:
        w = jnp.asarray(rng.standard_normal((n, 64)) * scale, jnp.float32)
        layer = f"layers.0.self_attn.{name}"
        weights[layer] = nv.quantize(w, tensor_scale=0.002 * scale)
        input_scales[layer] = jnp.float32(0.003 * scale)
    dense["layers.0.self_attn.o_proj.bias"] = jnp.asarray(rng.standard_normal(64), jnp.bfloat16)
    ckpt.save_checkpoint(
        tmp_path, weights, format="modelopt", input_scales=input_scales, dense=dense
    )
    return tmp_path, weights, input_scales, dense


@pytest.mark.parametrize("lazy", [False, True])
def test_from_checkpoint_single_layer(saved, rng, lazy):
    path, weights, input_scales, dense = saved
    src = ckpt.CheckpointReader(path) if lazy else ckpt.load_checkpoint(path, progress=False)
    name = "layers.0.self_attn.o_proj"
    layer = NVFP4Linear.from_checkpoint(src, name, scheme="w4a4")
    assert layer.partition_sizes == (64,) and layer.input_scale == input_scales[name]
    np.testing.assert_array_equal(np.asarray(layer.bias), np.asarray(dense[name + ".bias"]))
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    want = NVFP4Linear(weights[name], dense[name + ".bias"], input_scales[name], "w4a4")(x)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(want))
    w4a16 = NVFP4Linear.from_checkpoint(src, name)
    np.testing.assert_array_equal(
        np.asarray(w4a16(x)), np.asarray(nv.linear(x, weights[name], dense[name + ".bias"]))
    )


def test_from_checkpoint_fused_qkv(saved, rng, monkeypatch):
    path, weights, input_scales, _ = saved
    ck = ckpt.load_checkpoint(path, progress=False)
    names = [f"layers.0.self_attn.{p}_proj" for p in "qkv"]
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.bfloat16)
    separate = [np.asarray(NVFP4Linear(weights[n])(x)).astype(F32) for n in names]

    monkeypatch.setattr(ckpt, "_WARNED", set())
    with pytest.warns(
        UserWarning, match="global scale for weight are different for parallel layers"
    ):
        qkv = NVFP4Linear.from_checkpoint(ck, names, scheme="w4a4")
    assert qkv.partition_sizes == (64, 32, 32) and qkv.bias is None
    assert qkv.input_scale == max(input_scales[n] for n in names)  # vLLM: input_scale_2.max()
    assert qkv.weight.tensor_scale == weights[names[0]].tensor_scale  # the max
    # vLLM's 'max' fusion scales k and v up by 2 and 4 (the accuracy warning).
    y = np.asarray(NVFP4Linear.from_checkpoint(ck, names)(x)).astype(F32)
    np.testing.assert_allclose(y[:, 64:96], 2 * separate[1], rtol=2**-7)
    np.testing.assert_allclose(y[:, 96:], 4 * separate[2], rtol=2**-7)

    # 'rescale' keeps every value where the block scales stay representable.
    small = [n for n in names if bool(jnp.min(ck.weights[n].scales.astype(jnp.float32)) < 2.0**-4)]
    if small:
        with pytest.raises(ValueError, match="not representable"):
            NVFP4Linear.from_checkpoint(ck, names, fuse_mode="rescale")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            exact = NVFP4Linear.from_checkpoint(ck, names, fuse_mode="rescale")
        np.testing.assert_array_equal(
            np.asarray(exact(x)).astype(F32), np.concatenate(separate, axis=1)
        )


def test_from_checkpoint_errors(saved, tmp_path, rng):
    path, weights, _, _ = saved
    with pytest.raises(ValueError, match="scheme must be one of"):
        NVFP4Linear.from_checkpoint(
            ckpt.load_checkpoint(path, progress=False), "layers.0.self_attn.q_proj", scheme="w8a8"
        )
    ckpt.save_checkpoint(tmp_path / "a16", weights, format="compressed-tensors")
    ck = ckpt.load_checkpoint(tmp_path / "a16", progress=False)
    with pytest.raises(
        ValueError,
        match=r"'w4a4' needs the checkpoint's activation scale of layers\.0\.self_attn\.q_proj",
    ):
        NVFP4Linear.from_checkpoint(ck, "layers.0.self_attn.q_proj", scheme="w4a4")
    with pytest.raises(KeyError, match="no quantized layer 'nope'"):
        NVFP4Linear.from_checkpoint(ck, "nope")
    layer = NVFP4Linear.from_checkpoint(ck, "layers.0.self_attn.q_proj")
    assert layer.input_scale is None and layer.scheme == "w4a16"
