"""Real-data checks against the ``compressed-tensors`` package (llm-compressor's format).

* Checkpoints quantized and saved by compressed-tensors' own NVFP4 compressor load, and
  dequantize to what its own ``decompress`` returns.
* Checkpoints written by ``save_checkpoint`` are read back by compressed-tensors' model-free
  loaders: its dequantizer (compressed-tensors format) and its ModelOpt NVFP4 converter
  (ModelOpt format).

The one numerical difference, accounted for exactly: compressed-tensors dequantizes with
``bf16(e2m1 · f32(scale / weight_global_scale))``; we store ``tensor_scale =
f32(1 / weight_global_scale)`` and compute ``bf16(e2m1 · f32(scale · tensor_scale))``. The two
block factors differ by at most one float32 ulp, which changes the bf16 result only when it
moves a value across a bf16 rounding boundary. Each test computes both float32 formulas in
numpy and asserts that our output equals compressed-tensors' output everywhere except at the
elements where the two formulas themselves round to different bf16 values.
"""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest

import nvfp4_jax as nv
from nvfp4_jax import checkpoint as ckpt

pytest.importorskip("compressed_tensors", reason="needs compressed-tensors and torch (test extra)")

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
    CompressedTensorsDequantizer,
)
from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from safetensors.torch import load_file, save_file

F32 = np.float32
BF16 = ml_dtypes.bfloat16

HIDDEN, KV, INTER = 64, 32, 96
PROJ = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


class _Block(torch.nn.Module):
    """A decoder-layer-shaped tree of Linears (names as in Llama checkpoints)."""

    def __init__(self):
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.mlp = torch.nn.Module()
        for name, (n, k) in PROJ.items():
            parent, child = name.split(".")
            setattr(getattr(self, parent), child, torch.nn.Linear(k, n, bias=child == "o_proj"))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([_Block(), _Block()])
        self.lm_head = torch.nn.Linear(HIDDEN, 10, bias=False)


def _ct_checkpoint(directory, scheme, seed):
    """Quantize a small bf16 model with compressed-tensors' NVFP4 / NVFP4A16 preset and save
    it the way llm-compressor does (static min-max calibration of the global and block
    scales with compressed-tensors' own qparam helpers, then ModelCompressor)."""
    torch.manual_seed(seed)
    model = _Model().to(torch.bfloat16)
    with torch.no_grad():  # layers with very different ranges and some outliers
        for i, m in enumerate(model.modules()):
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(10.0 ** (i % 4 - 2))
                m.weight[0, :5] *= 20
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[scheme])},
        ignore=["lm_head"],
    )
    apply_quantization_config(model, config)
    with torch.no_grad():
        for m in model.modules():
            if not hasattr(m, "quantization_scheme"):
                continue
            w = m.weight
            gs = generate_gparam(w.amin(), w.amax())
            m.weight_global_scale.copy_(gs)
            groups = w.unflatten(-1, (-1, 16))
            scale, _ = calculate_qparams(
                groups.amin(-1), groups.amax(-1), m.quantization_scheme.weights, global_scale=gs
            )
            m.weight_scale.copy_(scale)
            if hasattr(m, "input_global_scale"):  # activation amax as seen in calibration
                amax = torch.tensor(float(torch.rand(()) * 8 + 0.5))
                m.input_global_scale.copy_(generate_gparam(-amax, amax))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (directory / "config.json").write_text(
        json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"})
    )
    compressor.update_config(str(directory))
    return directory


def _ct_decompress(directory):
    """compressed-tensors' own model-free decompression of a checkpoint directory."""
    tensors = load_file(str(directory / "model.safetensors"))
    return CompressedTensorsDequantizer(str(directory), dtype=torch.bfloat16).process(dict(tensors))


def _bits(t):
    return t.contiguous().view(torch.int16).numpy()


def _assert_matches_ct(ours, ct_bf16, packed, scales_e4m3, inverse_scale):
    """``ours`` (bf16) equals compressed-tensors' ``ct_bf16`` except exactly where the two
    float32 formulas (divide by the inverse scale vs multiply by its reciprocal) round to
    different bf16 values. Returns the number of such elements."""
    vals = oracle.decode_codes(oracle.unpack(packed)).astype(F32)
    n, k = vals.shape
    s = np.asarray(scales_e4m3).astype(F32)
    g = F32(inverse_scale)
    ct_formula = (vals.reshape(n, -1, 16) * (s / g)[..., None]).reshape(n, k).astype(BF16)
    our_formula = (
        (vals.reshape(n, -1, 16) * (s * (F32(1) / g))[..., None]).reshape(n, k).astype(BF16)
    )
    ours = np.asarray(ours)
    np.testing.assert_array_equal(
        ct_bf16.view(np.int16), ct_formula.view(np.int16)
    )  # we model CT right
    np.testing.assert_array_equal(ours.view(np.int16), our_formula.view(np.int16))
    differ = ct_formula.view(np.int16) != our_formula.view(np.int16)
    np.testing.assert_array_equal(ours.view(np.int16)[~differ], ct_bf16.view(np.int16)[~differ])
    # Where they differ it is by one bf16 ulp.
    assert np.all(
        np.abs(ours.view(np.int16)[differ].astype(np.int32) - ct_bf16.view(np.int16)[differ]) == 1
    )
    return int(differ.sum())


@pytest.fixture(scope="module", params=["NVFP4", "NVFP4A16"])
def ct_dir(request, tmp_path_factory):
    return _ct_checkpoint(
        tmp_path_factory.mktemp(request.param), request.param, seed=len(request.param)
    )


def test_compressed_tensors_checkpoint_loads_and_dequantizes_like_compressed_tensors(ct_dir):
    qc = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    ck = ckpt.load_checkpoint(ct_dir, progress=False)
    assert ck.format == "compressed-tensors" and ck.quantization_config == qc
    layers = {f"model.layers.{i}.{p}" for i in range(2) for p in PROJ}
    assert set(ck.weights) == layers
    assert set(ck.dense) == {
        "lm_head.weight",
        "model.layers.0.self_attn.o_proj.bias",
        "model.layers.1.self_attn.o_proj.bias",
    }
    raw = load_file(str(ct_dir / "model.safetensors"))
    ref = _ct_decompress(ct_dir)
    w4a4 = qc["config_groups"]["group_0"]["input_activations"] is not None
    differ = 0
    for layer, a in ck.weights.items():
        assert a.shape == PROJ[layer.split(".", 3)[3]] and a.dtype == jnp.bfloat16
        packed = raw[f"{layer}.weight_packed"].numpy()
        scales = (
            raw[f"{layer}.weight_scale"].view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        )
        gs = raw[f"{layer}.weight_global_scale"].item()
        np.testing.assert_array_equal(np.asarray(a.data), packed)
        np.testing.assert_array_equal(np.asarray(a.scales).view(np.uint8), scales.view(np.uint8))
        assert np.asarray(a.tensor_scale) == F32(1) / F32(gs)
        ct_w = ref[f"{layer}.weight"].view(torch.int16).numpy().view(BF16)
        differ += _assert_matches_ct(nv.dequantize(a, jnp.bfloat16), ct_w, packed, scales, gs)
        if w4a4:
            igs = raw[f"{layer}.input_global_scale"].item()
            assert np.asarray(ck.input_scales[layer]) == F32(1) / F32(igs)
        else:
            assert layer not in ck.input_scales
    print(f"{differ} of {sum(a.size for a in ck.weights.values())} weights differ by one bf16 ulp")
    np.testing.assert_array_equal(
        np.asarray(ck.dense["lm_head.weight"]).view(np.int16), _bits(raw["lm_head.weight"])
    )


def test_fused_qkv_of_a_compressed_tensors_checkpoint(ct_dir):
    """compressed-tensors (without llm-compressor's fused-scale step) leaves q/k/v with
    different global scales: 'max' reproduces vLLM, 'rescale' keeps the values."""
    ck = ckpt.load_checkpoint(ct_dir, progress=False)
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    parts = [ck.weights[n] for n in names]
    assert len({float(a.tensor_scale) for a in parts}) == 3
    with pytest.raises(ValueError, match="not representable at the shared tensor scale"):
        ckpt.fuse(parts, mode="rescale", names=names)
    with pytest.warns(UserWarning, match="re-rounded to E4M3"):
        fused = ckpt.fuse(parts, mode="rescale", strict=False, names=names)
    want = np.concatenate([np.asarray(nv.dequantize(a, jnp.float32)) for a in parts])
    got = np.asarray(nv.dequantize(fused, jnp.float32))
    reports = [ckpt.rescale(a, fused.tensor_scale, name=n)[1] for a, n in zip(parts, names)]
    bad = max(r.max_rel_error for r in reports)
    assert bad <= 2.0**-4 or any(r.zeroed for r in reports)
    keep = got != 0
    np.testing.assert_allclose(got[keep], want[keep], rtol=bad * 1.001)


def _our_arrays(seed):
    rng = np.random.default_rng(seed)
    weights, input_scales = {}, {}
    for i in range(2):
        for p, (n, k) in PROJ.items():
            w = rng.standard_normal((n, k)) * 10.0 ** rng.uniform(-3, 1)
            weights[f"model.layers.{i}.{p}"] = nv.quantize(jnp.asarray(w, jnp.bfloat16))
            input_scales[f"model.layers.{i}.{p}"] = jnp.float32(rng.uniform(1e-4, 1e-2))
    dense = {"lm_head.weight": jnp.asarray(rng.standard_normal((10, HIDDEN)), jnp.bfloat16)}
    return weights, input_scales, dense


@pytest.mark.parametrize("w4a4", [True, False])
def test_saved_compressed_tensors_checkpoint_reads_back_in_compressed_tensors(tmp_path, w4a4):
    weights, input_scales, dense = _our_arrays(seed=1)
    ckpt.save_checkpoint(
        tmp_path,
        weights,
        format="compressed-tensors",
        dense=dense,
        input_scales=input_scales if w4a4 else None,
        max_shard_bytes=20_000,
        model_config={"model_type": "llama", "torch_dtype": "bfloat16"},
    )
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # compressed-tensors accepts our config
    scheme = parsed.config_groups["group_0"]
    assert scheme.weights.num_bits == 4 and scheme.weights.group_size == 16
    assert (scheme.input_activations is not None) == w4a4
    assert parsed.ignore == ["lm_head"]
    tensors = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    # (.process, not .validate: compressed-tensors' own residual check flags input_global_scale,
    # which its NVFP4 compressor does not list as a compression param, on its own checkpoints too.)
    ref = CompressedTensorsDequantizer(str(tmp_path), dtype=torch.bfloat16).process(dict(tensors))
    for layer, a in weights.items():
        ct_w = ref[f"{layer}.weight"].view(torch.int16).numpy().view(BF16)
        gs = tensors[f"{layer}.weight_global_scale"].item()
        scales = np.asarray(a.scales)
        _assert_matches_ct(nv.dequantize(a, jnp.bfloat16), ct_w, np.asarray(a.data), scales, gs)
        if w4a4:
            assert tensors[f"{layer}.input_global_scale"].item() == F32(1) / F32(
                input_scales[layer]
            )
    np.testing.assert_array_equal(
        _bits(ref["lm_head.weight"]), np.asarray(dense["lm_head.weight"]).view(np.int16)
    )


def test_saved_modelopt_checkpoint_reads_in_compressed_tensors_modelopt_converter(tmp_path):
    """compressed-tensors ships a ModelOpt NVFP4 reader (its ModelOpt -> compressed-tensors
    converter): it validates our file's names, dtypes and dependencies, and its conversion
    decompresses to our values."""
    weights, input_scales, dense = _our_arrays(seed=2)
    ckpt.save_checkpoint(
        tmp_path, weights, format="modelopt", input_scales=input_scales, dense=dense
    )
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["model.layers.0.mlp.up_proj.weight_scale_2"].shape == ()
    converter = ModelOptNvfp4Converter(ignore=["lm_head"], targets=["re:.*_proj$"])
    for layer in weights:
        assert converter.get_dependencies(f"{layer}.weight") == {
            f"{layer}.input_scale",
            f"{layer}.weight_scale",
            f"{layer}.weight_scale_2",
        }
        assert set(converter.get_dependencies(f"{layer}.weight")) <= set(tensors)
    converted = converter.validate(dict(tensors))  # raises on orphans, wrong dtypes, missing scales
    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES["NVFP4"])
    for layer, a in weights.items():
        sd = {
            p: converted[f"{layer}.{p}"]
            for p in ("weight_packed", "weight_scale", "weight_global_scale")
        }
        np.testing.assert_array_equal(sd["weight_packed"].numpy(), np.asarray(a.data))
        np.testing.assert_array_equal(
            sd["weight_scale"].view(torch.uint8).numpy(), np.asarray(a.scales).view(np.uint8)
        )
        g = sd["weight_global_scale"]
        assert g.shape == () and g.item() == F32(1) / F32(a.tensor_scale)
        assert converted[f"{layer}.input_global_scale"].item() == F32(1) / F32(input_scales[layer])
        # ModelOpt's scalar is 0-d, so torch computes compressed-tensors' `bf16 scale / g` in
        # bf16 (a 0-d float32 operand does not promote): bf16(e2m1 * bf16(scale / g)).
        ct_w = (
            NVFP4PackedCompressor.decompress(sd, scheme)["weight"]
            .view(torch.int16)
            .numpy()
            .view(BF16)
        )
        vals = oracle.decode_codes(oracle.unpack(np.asarray(a.data))).astype(F32)
        n, k = vals.shape
        factor = (np.asarray(a.scales).astype(F32) / F32(g.item())).astype(BF16).astype(F32)
        want = (vals.reshape(n, -1, 16) * factor[..., None]).reshape(n, k).astype(BF16)
        np.testing.assert_array_equal(ct_w.view(np.int16), want.view(np.int16))
        # With a [1]-shaped scalar (compressed-tensors' own layout) it matches us as in the
        # other tests.
        sd["weight_global_scale"] = g.reshape(1)
        ct_w = (
            NVFP4PackedCompressor.decompress(sd, scheme)["weight"]
            .view(torch.int16)
            .numpy()
            .view(BF16)
        )
        _assert_matches_ct(
            nv.dequantize(a, jnp.bfloat16), ct_w, np.asarray(a.data), np.asarray(a.scales), g.item()
        )
