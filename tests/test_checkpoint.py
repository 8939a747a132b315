"""nvfp4_jax.checkpoint: ModelOpt / compressed-tensors / Quark layouts built from their
documented tensor names, format detection, sharding, errors, fusion and writing.

The real compressed-tensors package is exercised in ``test_checkpoint_ct.py``.
"""

import json
import warnings

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest
from safetensors.numpy import save_file

import nvfp4_jax as nv
from nvfp4_jax import checkpoint as ckpt

F32 = np.float32
E4M3 = ml_dtypes.float8_e4m3fn

# layer -> (out_features N, in_features K)
LAYERS = {
    "model.layers.0.self_attn.q_proj": (64, 64),
    "model.layers.0.self_attn.k_proj": (32, 64),
    "model.layers.0.self_attn.v_proj": (32, 64),
    "model.layers.0.mlp.down_proj": (64, 96),
}

CONFIGS = {
    "modelopt": {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "group_size": 16,
        "exclude_modules": ["lm_head"],
    },
    "compressed-tensors": {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": "nvfp4-pack-quantized",
                "weights": {
                    "num_bits": 4,
                    "type": "float",
                    "group_size": 16,
                    "strategy": "tensor_group",
                },
            }
        },
        "ignore": ["lm_head"],
    },
    "quark": {
        "quant_method": "quark",
        "exclude": ["lm_head"],
        "export": {"pack_method": "reorder", "kv_cache_group": []},
        "global_quant_config": {
            "weight": [
                {"dtype": "fp4", "qscheme": "per_group", "group_size": 16, "is_dynamic": False},
                {"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": False},
            ],
            "input_tensors": [
                {"dtype": "fp4", "qscheme": "per_group", "group_size": 16, "is_dynamic": True},
                {"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": False},
            ],
        },
    },
}


def _quantized(rng):
    """Per layer: (codes uint8 [N, K], scales E4M3 [N, K/16], tensor scale, input scale),
    quantized by the independent numpy oracle. Tensor and input scales are float32
    reciprocals (1/gs), so the inverse (compressed-tensors) layout stores them exactly."""
    out = {}
    for i, (layer, (n, k)) in enumerate(LAYERS.items()):
        w = rng.standard_normal((n, k)).astype(F32) * 10.0 ** rng.uniform(-3, 1)
        gs, ts = oracle.default_global_scale(w)
        codes, scale_bytes = oracle.quantize(w, gs)
        input_scale = F32(1) / (F32(2688) / F32(rng.uniform(1, 20)))
        out[layer] = (codes, scale_bytes.view(E4M3), ts, input_scale)
    return out


def _dense(rng):
    return {
        "model.embed_tokens.weight": rng.standard_normal((10, 64)).astype(ml_dtypes.bfloat16),
        "model.norm.weight": rng.standard_normal(64).astype(F32),
        "model.layers.0.mlp.down_proj.bias": rng.standard_normal(64).astype(F32),
        "lm_head.weight": rng.standard_normal((10, 64)).astype(ml_dtypes.bfloat16),
    }


def _tensors(fmt, quantized, dense, *, w4a4=True, scalar_dtype=F32):
    """Raw checkpoint tensors named as each producer documents them."""
    spec = ckpt.SPECS[fmt]
    t = dict(dense)
    for layer, (codes, scales, ts, input_scale) in quantized.items():
        t[f"{layer}.{spec.weight}"] = oracle.pack(codes)
        t[f"{layer}.weight_scale"] = scales
        if fmt == "compressed-tensors":  # quantize-direction, shape [1]
            t[f"{layer}.weight_global_scale"] = np.array([F32(1) / ts], F32)
            if w4a4:
                t[f"{layer}.input_global_scale"] = np.array([F32(1) / input_scale], F32)
        else:  # dequantize-direction scalars
            t[f"{layer}.{spec.weight_scalar}"] = np.array(ts, scalar_dtype)
            if w4a4:
                t[f"{layer}.{spec.input_scalar}"] = np.array(input_scale, scalar_dtype)
    return t


def _write(directory, tensors, *, config=None, hf_quant_config=None, name="model.safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(directory / name),
        metadata={"format": "pt"},
    )
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    if hf_quant_config is not None:
        (directory / "hf_quant_config.json").write_text(json.dumps(hf_quant_config))
    return directory


def _write_format(directory, fmt, quantized, dense, **kw):
    config = {"model_type": "llama", "torch_dtype": "bfloat16", "quantization_config": CONFIGS[fmt]}
    return _write(directory, _tensors(fmt, quantized, dense, **kw), config=config)


@pytest.fixture
def data(rng):
    return _quantized(rng), _dense(rng)


# -- the mapping table ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ckpt.FORMATS)
def test_formats_load_to_the_documented_values(tmp_path, data, fmt):
    quantized, dense = data
    ck = ckpt.load_checkpoint(_write_format(tmp_path, fmt, quantized, dense), progress=False)
    assert ck.format == fmt
    assert set(ck.weights) == set(LAYERS)
    for layer, (codes, scales, ts, input_scale) in quantized.items():
        a = ck.weights[layer]
        assert a.shape == LAYERS[layer] and a.axis == -1 and a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a.data), oracle.pack(codes))
        np.testing.assert_array_equal(np.asarray(a.scales).view(np.uint8), scales.view(np.uint8))
        assert np.asarray(a.tensor_scale) == ts
        # ModelOpt's documented dequantization: e2m1 * f32(weight_scale) * weight_scale_2.
        want = oracle.dequantize(codes, scales.view(np.uint8), ts, F32)
        np.testing.assert_array_equal(np.asarray(nv.dequantize(a, jnp.float32)), want)
        assert np.asarray(ck.input_scales[layer]) == input_scale
    assert set(ck.dense) == set(dense)
    for name, v in dense.items():
        assert ck.dense[name].dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(ck.dense[name]), v)
    assert ck["model.norm.weight"] is ck.dense["model.norm.weight"]
    assert ck["model.layers.0.mlp.down_proj"] is ck.weights["model.layers.0.mlp.down_proj"]


def test_quark_bf16_scalars_and_weight_only(tmp_path, data):
    quantized, dense = data
    path = _write_format(
        tmp_path, "quark", quantized, dense, w4a4=False, scalar_dtype=ml_dtypes.bfloat16
    )
    ck = ckpt.load_checkpoint(path, progress=False)
    assert ck.input_scales == {}
    for layer, (_, _, ts, _) in quantized.items():
        assert np.asarray(ck.weights[layer].tensor_scale) == F32(ml_dtypes.bfloat16(ts))


def test_zero_weight_scale_2_loads_as_zeros(tmp_path, data):
    quantized, dense = data
    t = _tensors("modelopt", quantized, dense)
    t["model.layers.0.mlp.down_proj.weight_scale_2"] = np.array(0.0, F32)
    ck = ckpt.load_checkpoint(
        _write(tmp_path, t, hf_quant_config={"quantization": {"quant_algo": "NVFP4"}}),
        progress=False,
    )
    assert not np.any(
        np.asarray(nv.dequantize(ck.weights["model.layers.0.mlp.down_proj"], jnp.float32))
    )


# -- detection ---------------------------------------------------------------------------


def test_detect_from_hf_quant_config_and_from_names(tmp_path, data):
    quantized, dense = data
    legacy = {
        "producer": {"name": "modelopt", "version": "0.29"},
        "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]},
    }
    p = _write(tmp_path / "legacy", _tensors("modelopt", quantized, dense), hf_quant_config=legacy)
    r = ckpt.CheckpointReader(p)
    assert r.format == "modelopt" and r.quantization_config == legacy
    for fmt in ckpt.FORMATS:  # no config at all: the tensor names decide
        r = ckpt.CheckpointReader(_write(tmp_path / fmt, _tensors(fmt, quantized, dense)))
        assert r.format == fmt and r.quantization_config is None


@pytest.mark.parametrize(
    "config, error",
    [
        ({"quant_method": "fp8"}, "not an NVFP4 format"),
        ({"quant_method": "modelopt", "quant_algo": "FP8"}, "only 'NVFP4'"),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {
                    "g": {"weights": {"num_bits": 4, "type": "float", "group_size": 16}}
                },
            },
            "nvfp4-pack",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "config_groups": {
                    "g": {"weights": {"num_bits": 8, "type": "int", "group_size": 128}}
                },
            },
            "not NVFP4",
        ),
        (
            {"quant_method": "quark", "global_quant_config": {"weight": {"dtype": "fp8_e4m3"}}},
            "not NVFP4",
        ),
    ],
)
def test_non_nvfp4_configs_are_not_implemented(config, error):
    with pytest.raises(NotImplementedError, match=error):
        ckpt.detect_format(config)


def test_undetectable_and_forced_format(tmp_path, data):
    _, dense = data
    with pytest.raises(ValueError, match="cannot detect"):
        ckpt.CheckpointReader(_write(tmp_path / "dense", dense))
    with pytest.raises(ValueError, match="format must be one of"):
        ckpt.CheckpointReader(_write(tmp_path / "dense2", dense), format="gguf")
    r = ckpt.CheckpointReader(tmp_path / "dense", format="modelopt")  # nothing quantized: all dense
    assert r.layers == () and set(r.dense_names) == set(dense)


def test_dtype_from_config_or_argument(tmp_path, data):
    quantized, dense = data
    p = _write(
        tmp_path,
        _tensors("modelopt", quantized, dense),
        config={"torch_dtype": "float16", "quantization_config": CONFIGS["modelopt"]},
    )
    assert (
        ckpt.load_checkpoint(p, progress=False).weights["model.layers.0.self_attn.q_proj"].dtype
        == jnp.float16
    )
    a = ckpt.CheckpointReader(p, dtype=jnp.float32).weight("model.layers.0.self_attn.q_proj")
    assert a.dtype == jnp.float32


# -- sharding and laziness -----------------------------------------------------------------


def _write_sharded(directory, tensors, config):
    names = sorted(tensors)
    half = {
        n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
        for i, n in enumerate(names)
    }
    for fname in set(half.values()):
        _write(directory, {n: tensors[n] for n in names if half[n] == fname}, name=fname)
    (directory / "config.json").write_text(json.dumps(config))
    index = {"metadata": {"total_size": 0}, "weight_map": half}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


@pytest.mark.parametrize("fmt", ["compressed-tensors", "quark"])
def test_sharded_with_index(tmp_path, data, fmt):
    quantized, dense = data
    tensors = _tensors(fmt, quantized, dense)
    _write_sharded(tmp_path, tensors, {"quantization_config": CONFIGS[fmt]})
    single = ckpt.load_checkpoint(
        _write_format(tmp_path / "single", fmt, quantized, dense), progress=False
    )
    for path in (tmp_path, tmp_path / "model.safetensors.index.json"):
        ck = ckpt.load_checkpoint(path, progress=True)
        for layer in LAYERS:
            np.testing.assert_array_equal(
                np.asarray(ck.weights[layer].data), np.asarray(single.weights[layer].data)
            )
            assert ck.weights[layer].tensor_scale == single.weights[layer].tensor_scale


def test_shards_disagreeing_with_the_index(tmp_path, data):
    quantized, dense = data
    tensors = _tensors("modelopt", quantized, dense)
    index = _write_sharded(tmp_path, tensors, {"quantization_config": CONFIGS["modelopt"]})
    bad = dict(
        index,
        weight_map=dict(
            index["weight_map"], **{"extra.tensor": "model-00001-of-00002.safetensors"}
        ),
    )
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'extra.tensor' is listed in the index .* missing"):
        ckpt.CheckpointReader(tmp_path)
    wm = dict(index["weight_map"])
    wm.pop("model.norm.weight")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(dict(index, weight_map=wm)))
    with pytest.raises(
        ValueError, match="extra tensor 'model.norm.weight' in .*not listed in the index"
    ):
        ckpt.CheckpointReader(tmp_path)


def test_reader_is_lazy(tmp_path, data):
    quantized, dense = data
    r = ckpt.CheckpointReader(_write_format(tmp_path, "modelopt", quantized, dense))
    (f,) = r._files.values()
    assert f._mmap is None  # names, dtypes and shapes only: no tensor bytes mapped yet
    assert set(r.layers) == set(LAYERS)
    a = r.weight("model.layers.0.self_attn.k_proj")
    assert f._mmap is not None and a.shape == (32, 64)
    assert r.input_scale("model.layers.0.self_attn.k_proj") is not None
    assert r.tensor("model.norm.weight").shape == (64,)
    with pytest.raises(KeyError, match="no quantized layer 'nope'"):
        r.weight("nope")
    with pytest.raises(KeyError, match="no dense tensor"):
        r.tensor("model.layers.0.self_attn.k_proj.weight")


# -- errors ------------------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj"


def _broken(tmp_path, data, fmt="modelopt", **changes):
    quantized, dense = data
    t = _tensors(fmt, quantized, dense)
    for name, value in changes.items():
        name = name.replace("Q__", Q + ".")
        if value is None:
            del t[name]
        else:
            t[name] = value
    return _write(tmp_path, t, config={"quantization_config": CONFIGS[fmt]})


@pytest.mark.parametrize(
    "changes, error",
    [
        (
            {"Q__weight_scale_2": None},
            r"missing tensor model\.layers\.0\.self_attn\.q_proj\.weight_scale_2",
        ),
        ({"Q__weight_scale": None}, r"missing tensor .*q_proj\.weight_scale:"),
        (
            {"Q__weight_global_scale": np.array([1.0], F32)},
            r"unexpected tensor .*q_proj\.weight_global_scale in a modelopt",
        ),
        (
            {"other.input_scale": np.array(1.0, F32)},
            r"missing tensor other\.weight: .* \(found other\.input_scale\)",
        ),
        (
            {"other.weight_global_scale": np.array([1.0], F32)},
            r"unexpected tensor other\.weight_global_scale: a modelopt",
        ),
        (
            {"Q__weight": np.zeros((64, 32), np.int8)},
            r"q_proj\.weight must have dtype U8 .* got I8",
        ),
        (
            {"Q__weight_scale": np.ones((64, 4), F32)},
            r"q_proj\.weight_scale must have dtype F8_E4M3, got F32",
        ),
        (
            {"Q__weight_scale": np.ones((64, 5), E4M3)},
            r"q_proj\.weight_scale must have shape \[64, 4\] .* got \[64, 5\]",
        ),
        (
            {"Q__weight": np.zeros((64, 12), np.uint8), "Q__weight_scale": np.ones((64, 1), E4M3)},
            r"q_proj\.weight: in-features 24 .* multiple of 16",
        ),
        ({"Q__weight": np.zeros((64, 32, 1), np.uint8)}, r"q_proj\.weight must be 2-D"),
        (
            {"Q__weight_scale_2": np.ones(3, F32)},
            r"q_proj\.weight_scale_2 must be a scalar .* got shape \[3\]",
        ),
        (
            {"Q__input_scale": np.array(1, np.int32)},
            r"q_proj\.input_scale must have dtype F32 or BF16 or F16, got I32",
        ),
    ],
)
def test_structural_errors_name_the_tensor(tmp_path, data, changes, error):
    with pytest.raises(ValueError, match=error):
        ckpt.CheckpointReader(_broken(tmp_path, data, **changes))


def test_value_errors_name_the_tensor(tmp_path, data):
    r = ckpt.CheckpointReader(_broken(tmp_path / "a", data, Q__weight_scale_2=np.array(-1.0, F32)))
    with pytest.raises(ValueError, match=r"q_proj\.weight_scale_2 must be finite and >= 0, got -1"):
        r.load(progress=False)
    r = ckpt.CheckpointReader(
        _broken(
            tmp_path / "b",
            data,
            "compressed-tensors",
            Q__weight_global_scale=np.array([np.inf], F32),
        )
    )
    with pytest.raises(ValueError, match=r"q_proj\.weight_global_scale must be finite and > 0"):
        r.weight(Q)
    r = ckpt.CheckpointReader(_broken(tmp_path / "c", data, Q__input_scale=np.array(0.0, F32)))
    with pytest.raises(ValueError, match=r"q_proj\.input_scale must be > 0"):
        r.input_scale(Q)


def test_fp8_layers_are_not_implemented(tmp_path, data):
    p = _broken(
        tmp_path, data, Q__weight=np.zeros((64, 64), E4M3), Q__weight_scale=np.ones((64, 4), E4M3)
    )
    with pytest.raises(NotImplementedError, match=r"layer .*q_proj is not NVFP4: .*F8_E4M3"):
        ckpt.CheckpointReader(p)


def test_corrupt_and_missing_files(tmp_path, data):
    quantized, dense = data
    p = _write_format(tmp_path / "ok", "modelopt", quantized, dense)
    raw = (p / "model.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[:-7])
    with pytest.raises(ValueError, match=r"trunc\.safetensors: not a valid safetensors file"):
        ckpt.CheckpointReader(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a valid safetensors file"):
        ckpt.CheckpointReader(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.CheckpointReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model.safetensors.index.json and no"):
        ckpt.CheckpointReader(tmp_path / "empty")
    (p / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"config\.json: invalid JSON"):
        ckpt.CheckpointReader(p)


# -- fused partitions -------------------------------------------------------------------------


def _parts(rng, ratios=(1.0, 0.5, 0.25)):
    """q/k/v-like parts of K=64 whose tensor scales are base * ratio."""
    parts = []
    for i, r in enumerate(ratios):
        w = jnp.asarray(rng.standard_normal((16 * (i + 1), 64)), jnp.float32)
        a = nv.quantize(w, tensor_scale=0.01 * r)
        parts.append(a)
    return parts


def test_fuse_max_follows_vllm_and_warns_once(rng, monkeypatch):
    monkeypatch.setattr(ckpt, "_WARNED", set())
    parts = _parts(rng)
    with pytest.warns(UserWarning, match="global scale for weight are different"):
        fused = ckpt.fuse(parts, mode="max")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.fuse(parts, mode="max")  # once per process
    assert fused.shape == (16 + 32 + 48, 64) and float(fused.tensor_scale) == F32(0.01)
    # vLLM keeps every block scale, so partition i comes out multiplied by max / own.
    got = np.asarray(nv.dequantize(fused, jnp.float32))
    rows = 0
    for a, r in zip(parts, (1.0, 2.0, 4.0)):
        want = np.asarray(nv.dequantize(a, jnp.float32)) * F32(r)
        np.testing.assert_allclose(got[rows : rows + a.shape[0]], want, rtol=1e-6)
        rows += a.shape[0]


def test_fuse_equal_scales_is_silent_and_exact(rng):
    parts = _parts(rng, (1.0, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for mode in ("max", "rescale"):
            fused = ckpt.fuse(parts, mode=mode)
            want = np.concatenate([np.asarray(nv.dequantize(a, jnp.float32)) for a in parts])
            np.testing.assert_array_equal(np.asarray(nv.dequantize(fused, jnp.float32)), want)


def test_fuse_rescale_is_exact_where_representable(rng):
    parts = _parts(rng)  # power-of-two ratios: block scales shift by whole exponents
    # Keep every block scale >= 2^-4 so scale * 1/4 stays a normal E4M3 (exact).
    parts = [
        nv.NVFP4Array(
            a.data,
            jnp.maximum(a.scales.astype(jnp.float32), 2.0**-4).astype(jnp.float8_e4m3fn),
            a.tensor_scale,
        )
        for a in parts
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = ckpt.fuse(parts, mode="rescale", names=["q_proj", "k_proj", "v_proj"])
    want = np.concatenate([np.asarray(nv.dequantize(a, jnp.float32)) for a in parts])
    np.testing.assert_array_equal(np.asarray(nv.dequantize(fused, jnp.float32)), want)
    assert float(fused.tensor_scale) == F32(0.01)


def test_fuse_rescale_reports_what_is_not_representable(rng):
    parts = _parts(rng, (1.0, 0.3))
    with pytest.raises(
        ValueError, match=r"k_proj: \d+ of 128 block scales are not representable .*\(ratio 0\.3\)"
    ):
        ckpt.fuse(parts, mode="rescale", names=["q_proj", "k_proj"])
    with pytest.warns(UserWarning, match="k_proj: .* re-rounded to E4M3"):
        fused = ckpt.fuse(parts, mode="rescale", strict=False, names=["q_proj", "k_proj"])
    _, report = ckpt.rescale(parts[1], parts[0].tensor_scale, name="k_proj")
    assert 0 < report.inexact <= report.blocks == 128 and not report.exact
    assert (
        report.max_rel_error <= 2.0**-4 + 1e-7 or report.zeroed
    )  # half an E4M3 step (normal range)
    # Where a block is inexact its values move by at most that relative error.
    got = np.asarray(nv.dequantize(fused, jnp.float32))[16:]
    want = np.asarray(nv.dequantize(parts[1], jnp.float32))
    np.testing.assert_allclose(got, want, rtol=report.max_rel_error * 1.0001, atol=1e-30)


def test_fuse_validates_parts(rng):
    a = nv.quantize(jnp.ones((16, 64), jnp.float32))
    b = nv.quantize(jnp.ones((16, 32), jnp.float32))
    with pytest.raises(ValueError, match="k has in-features 32, q has 64"):
        ckpt.fuse([a, b], names=["q", "k"])
    with pytest.raises(ValueError, match="mode must be"):
        ckpt.fuse([a], mode="mean")
    with pytest.raises(ValueError, match=r"must be a 2-D \[N, K\] NVFP4Array blocked along K"):
        ckpt.fuse([nv.quantize(jnp.ones((64, 16), jnp.float32), axis=0)])
    with pytest.raises(ValueError, match="must be >= the current"):
        ckpt.rescale(a, 0.5 * a.tensor_scale)


# -- writing ---------------------------------------------------------------------------------


def _arrays(rng):
    weights, input_scales = {}, {}
    for layer, (n, k) in LAYERS.items():
        weights[layer] = nv.quantize(jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16))
        input_scales[layer] = jnp.float32(1) / jnp.float32(2688 / rng.uniform(1, 10))
    return weights, input_scales


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("shard", [None, 3000])
def test_save_then_load_round_trips(tmp_path, rng, fmt, shard):
    weights, input_scales = _arrays(rng)
    dense = {k: jnp.asarray(v) for k, v in _dense(rng).items()}
    ckpt.save_checkpoint(
        tmp_path,
        weights,
        format=fmt,
        input_scales=input_scales,
        dense=dense,
        model_config={"model_type": "llama", "torch_dtype": "bfloat16"},
        max_shard_bytes=shard,
    )
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)
    ck = ckpt.load_checkpoint(tmp_path, progress=False)
    assert ck.format == fmt
    for layer, a in weights.items():
        b = ck.weights[layer]
        np.testing.assert_array_equal(np.asarray(b.data), np.asarray(a.data))
        np.testing.assert_array_equal(
            np.asarray(b.scales).view(np.uint8), np.asarray(a.scales).view(np.uint8)
        )
        assert b.tensor_scale == a.tensor_scale  # exact: quantize's scale is a float32 reciprocal
        assert ck.input_scales[layer] == input_scales[layer]
    for name, v in dense.items():
        np.testing.assert_array_equal(np.asarray(ck.dense[name]), np.asarray(v))
    if fmt == "modelopt":
        hq = json.loads((tmp_path / "hf_quant_config.json").read_text())
        assert hq["quantization"]["quant_algo"] == "NVFP4"
        assert hq["quantization"]["exclude_modules"] == ["lm_head", "model.embed_tokens"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" in config


def test_save_weight_only_and_errors(tmp_path, rng):
    weights, input_scales = _arrays(rng)
    ckpt.save_checkpoint(tmp_path / "a16", weights, format="compressed-tensors")
    qc = json.loads((tmp_path / "a16" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"] is None
    assert ckpt.load_checkpoint(tmp_path / "a16", progress=False).input_scales == {}
    with pytest.raises(ValueError, match="input_scales must cover exactly"):
        ckpt.save_checkpoint(tmp_path / "b", weights, input_scales={Q: input_scales[Q]})
    with pytest.raises(ValueError, match="format must be 'modelopt' or 'compressed-tensors'"):
        ckpt.save_checkpoint(tmp_path / "c", weights, format="quark")
    with pytest.raises(ValueError, match=r"weights\['w'\] must be a 2-D \[N, K\] NVFP4Array"):
        ckpt.save_checkpoint(
            tmp_path / "d", {"w": nv.quantize(jnp.ones((64, 16), jnp.float32), axis=0)}
        )
    with pytest.raises(TypeError, match=r"weights\['w'\] must be an NVFP4Array"):
        ckpt.save_checkpoint(tmp_path / "e", {"w": jnp.ones((4, 16))})
    with pytest.raises(ValueError, match="collides"):
        ckpt.save_checkpoint(tmp_path / "f", weights, dense={Q + ".weight": jnp.ones(3)})


# -- MoE experts ----------------------------------------------------------------------------
MOE = "model.layers.0.mlp.experts"


def _expert_layers(rng, names, e=4, h=64, inter=32):
    """Per-expert gate/up/down layers; expert 1's up has half of gate's tensor scale (an
    exporter that does not share them), the others share it."""
    layers = {"model.layers.0.self_attn.q_proj": nv.quantize(jnp.ones((16, 64)))}
    for i in range(e):
        gate = nv.quantize(jnp.asarray(rng.standard_normal((inter, h)), jnp.bfloat16))
        scale = gate.tensor_scale * (0.5 if i == 1 else 1.0)
        up = nv.quantize(
            jnp.asarray(rng.standard_normal((inter, h)), jnp.bfloat16), tensor_scale=scale
        )
        down = nv.quantize(jnp.asarray(rng.standard_normal((h, inter)), jnp.bfloat16))
        for proj, a in zip(names, (gate, up, down)):
            layers[f"{MOE}.{i}.{proj}"] = a
    return layers


@pytest.mark.parametrize("names", ckpt.EXPERT_PROJECTIONS, ids=lambda p: p[0])
@pytest.mark.parametrize("lazy", [False, True], ids=["loaded", "reader"])
def test_stack_experts_feeds_moe(tmp_path, rng, names, lazy):
    e, h, inter = 4, 64, 32
    layers = _expert_layers(rng, names, e, h, inter)
    ckpt.save_checkpoint(tmp_path, layers)
    source = (
        ckpt.CheckpointReader(tmp_path) if lazy else ckpt.load_checkpoint(tmp_path, progress=False)
    )
    w13, w2 = ckpt.stack_experts(source, MOE + ".")  # projection names detected
    assert w13.shape == (e, h, 2 * inter) and w2.shape == (e, inter, h)
    assert w13.tensor_scale.shape == w2.tensor_scale.shape == (e,)
    deq = lambda a: np.asarray(nv.dequantize(a, jnp.float32))
    w13d, w2d = deq(w13), deq(w2)
    for i in range(e):
        gate, up, down = (deq(layers[f"{MOE}.{i}.{p}"]) for p in names)
        # exact: expert 1's up block scales are re-scaled by a power of two
        np.testing.assert_array_equal(w13d[i], np.concatenate([gate, up]).T)
        np.testing.assert_array_equal(w2d[i], down.T)
    x = jnp.asarray(rng.standard_normal((7, h)), jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((7, e)), jnp.float32)
    y = nv.moe.moe(x, logits, nv.prepare(w13), nv.prepare(w2), top_k=2)
    ref = nv.moe.moe_reference(x, logits, w13, w2, top_k=2)
    y64, r64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (y, ref))
    assert np.linalg.norm(y64 - r64) / np.linalg.norm(r64) <= 1e-2


def test_stack_experts_errors(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(ckpt, "_WARNED", set())
    layers = _expert_layers(rng, ckpt.EXPERT_PROJECTIONS[0])
    ck = ckpt.Checkpoint("modelopt", dict(layers), {}, {})
    with pytest.raises(TypeError, match="checkpoint must be a Checkpoint or CheckpointReader"):
        ckpt.stack_experts(layers, MOE)
    with pytest.raises(ValueError, match=r"no expert layers model.layers.1.mlp.experts.<e>"):
        ckpt.stack_experts(ck, "model.layers.1.mlp.experts")
    with pytest.raises(ValueError, match=r"none of the known .* pass names=\(gate, up, down\)"):
        renamed = {k.replace("gate_proj", "g"): v for k, v in layers.items()}
        ckpt.stack_experts(ckpt.Checkpoint("modelopt", renamed, {}, {}), MOE)
    del ck.weights[f"{MOE}.2.down_proj"]
    with pytest.raises(ValueError, match=r"1 expert layers missing .*experts.2.down_proj"):
        ckpt.stack_experts(ck, MOE)
    ck.weights[f"{MOE}.2.down_proj"] = nv.quantize(jnp.ones((64, 48)))
    with pytest.raises(ValueError, match=r"experts' weights differ in shape"):
        ckpt.stack_experts(ck, MOE)
    with pytest.raises(ValueError, match=r"names must be \(gate, up, down\)"):
        ckpt.stack_experts(ck, MOE, names=("gate_proj", "up_proj"))
    # gate/up scales whose ratio is not representable: strict rescale refuses, "max" keeps
    ck.weights[f"{MOE}.2.down_proj"] = layers[f"{MOE}.2.down_proj"]
    up = ck.weights[f"{MOE}.0.up_proj"]
    ck.weights[f"{MOE}.0.up_proj"] = nv.NVFP4Array(
        up.data, up.scales, up.tensor_scale * 0.3, axis=-1
    )
    with pytest.raises(ValueError, match="not representable at the shared tensor scale"):
        ckpt.stack_experts(ck, MOE)
    with pytest.warns(UserWarning, match="global scale for weight are different"):
        w13, _ = ckpt.stack_experts(ck, MOE, fuse_mode="max")
    assert w13.tensor_scale[0] == ck.weights[f"{MOE}.0.gate_proj"].tensor_scale
