"""Load and save NVFP4 checkpoints: NVIDIA ModelOpt, compressed-tensors (llm-compressor), AMD Quark.

Every producer stores the same three things per quantized ``Linear`` (out-features N,
in-features K): packed E2M1 codes ``[N, K/2]`` (element ``2i`` in the low nibble), one E4M3
block scale per 16 inputs ``[N, K/16]`` (plain row-major, not swizzled), and one float32
per-tensor scalar -- plus, for W4A4 checkpoints, one activation scalar. They differ in the
tensor names and in the *direction* of the scalars:

+---------------------------+----------------------------------+---------------------------------------+----------------------------------+
|                           | ModelOpt                         | compressed-tensors                    | Quark                            |
+===========================+==================================+=======================================+==================================+
| detected from             | hf_quant_config.json: quant_algo | config.json quant_method:             | config.json quant_method: quark, |
|                           | NVFP4; or config.json            | compressed-tensors, format            | weight [fp4 per_group 16,        |
|                           | quant_method: modelopt           | nvfp4-pack-quantized                  | fp8_e4m3 per_tensor]             |
+---------------------------+----------------------------------+---------------------------------------+----------------------------------+
| codes U8 [N, K/2] -> data | {L}.weight                       | {L}.weight_packed                     | {L}.weight                       |
+---------------------------+----------------------------------+---------------------------------------+----------------------------------+
| block scales F8_E4M3      | {L}.weight_scale                 | {L}.weight_scale                      | {L}.weight_scale                 |
| [N, K/16] -> scales       |                                  |                                       |                                  |
+---------------------------+----------------------------------+---------------------------------------+----------------------------------+
| weight scalar             | {L}.weight_scale_2 F32 []        | {L}.weight_global_scale F32 [1]       | {L}.weight_scale_2 BF16/F32 []   |
| -> tensor_scale           | = amax/(6*448), as is            | = 6*448/amax: 1/value                 | = amax/(6*448), as is            |
+---------------------------+----------------------------------+---------------------------------------+----------------------------------+
| activation scalar (W4A4)  | {L}.input_scale F32 []           | {L}.input_global_scale F32 [1]        | {L}.input_scale_2 BF16/F32 []    |
| -> input_scale            | as is                            | 1/value                               | as is                            |
+---------------------------+----------------------------------+---------------------------------------+----------------------------------+
| producer's dequantization | e2m1 * f32(s) * weight_scale_2   | e2m1 * (f32(s) / weight_global_scale) | e2m1 * f32(s) * weight_scale_2   |
+---------------------------+----------------------------------+---------------------------------------+----------------------------------+
| fused q/k/v, gate/up      | one scalar (exporter shares)     | shared by newer llm-compressor        | may differ (vLLM warns)          |
+---------------------------+----------------------------------+---------------------------------------+----------------------------------+

``{L}`` is the layer (module) name, e.g. ``model.layers.0.self_attn.q_proj``. Our
``NVFP4Array.tensor_scale`` and the activation ``input_scale`` are always the *multiplier*
(``x ≈ e2m1 · block_scale · tensor_scale``, i.e. ``amax / (6·448)``), so

* ModelOpt / Quark: ``W = e2m1 · f32(weight_scale) · weight_scale_2``
  (ModelOpt's own dequantization, bit for bit);
* compressed-tensors: ``W = e2m1 · f32(weight_scale) · f32(1 / weight_global_scale)``
  (compressed-tensors divides, ``e2m1 · (weight_scale / weight_global_scale)``: the two agree
  to one float32 ulp of the block factor, and after rounding to bf16 almost always bit for
  bit -- see ``tests/test_checkpoint_ct.py`` for the exact accounting);
* W4A4 activations are quantized with ``global_scale = 1 / input_scale`` and the GEMM
  epilogue is ``alpha = input_scale · tensor_scale`` (vLLM's names: ``input_global_scale``,
  ``weight_global_scale``, ``alpha``).

Scalars may be stored as F32, BF16 or F16 (converted exactly to float32) with shape ``[]`` or
``[1]``. A weight scalar of exactly 0 (ModelOpt's export of an all-zero weight) loads as zero
block scales with ``tensor_scale = 1`` (the same all-zero values); negative, NaN or infinite
scalars are an error.

Which layers are quantized is read from the tensors (a layer is NVFP4 when its block scales
are present), so ``ignore``/``exclude`` lists in the config need not be interpreted; the
config is used to detect the format. Everything else (embeddings, norms, biases,
unquantized layers, KV-cache scales) is returned as dense arrays under its tensor name.

Reading is lazy and memory-mapped: ``safetensors.safe_open`` validates each file (header,
offsets, size) and lists its tensors; the bytes of a tensor are read through a read-only
``numpy.memmap`` view only when that tensor is requested (safetensors' numpy backend cannot
return bfloat16 or float8 arrays, numpy has no such types), and converted to a ``jax.Array``
one tensor at a time.

Fused layers (q/k/v, gate/up) are stored as separate partitions, each with its own tensor
scale. :func:`fuse` concatenates them along N with one shared tensor scale, either the way
vLLM does it (``mode="max"``: take the largest scale, keep the block scales, warn once -- the
smaller partitions are then scaled up by ``max/own``) or exactly (``mode="rescale"``:
re-round each block scale to ``scale · own / max`` in E4M3, check that every dequantized value
is unchanged, and raise -- or warn -- where one is not representable).

Writing (:func:`save_checkpoint`) produces ModelOpt-style (``hf_quant_config.json``) or
compressed-tensors (``config.json`` ``quantization_config``) checkpoints, single-file or
sharded with a ``model.safetensors.index.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from nvfp4_jax._exact import div_rn
from nvfp4_jax.array import NVFP4Array
from nvfp4_jax.formats import BLOCK_SIZE, round_to_e4m3

FORMATS = ("modelopt", "compressed-tensors", "quark")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MODELOPT_CONFIG_FILE = "hf_quant_config.json"
CONFIG_FILE = "config.json"

# safetensors dtype names <-> numpy dtypes (bfloat16 / float8 via ml_dtypes).
_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_SCALAR_DTYPES = ("F32", "BF16", "F16")


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """Tensor names (suffixes after ``{layer}.``) and scalar direction of one format."""

    name: str
    weight: str  # packed E2M1 codes, U8 [N, K/2]
    weight_scale: str  # block scales, F8_E4M3 [N, K/16]
    weight_scalar: str  # per-tensor weight scalar
    input_scalar: str  # per-tensor activation scalar (W4A4 checkpoints only)
    inverse: bool  # scalars are quantize-direction (6*448/amax): tensor_scale = 1/value

    @property
    def names(self) -> tuple[str, str, str, str]:
        return (self.weight, self.weight_scale, self.weight_scalar, self.input_scalar)


SPECS = {
    "modelopt": FormatSpec(
        "modelopt", "weight", "weight_scale", "weight_scale_2", "input_scale", False
    ),
    "compressed-tensors": FormatSpec(
        "compressed-tensors",
        "weight_packed",
        "weight_scale",
        "weight_global_scale",
        "input_global_scale",
        True,
    ),
    "quark": FormatSpec(
        "quark", "weight", "weight_scale", "weight_scale_2", "input_scale_2", False
    ),
}

# Per-layer quantization parameter names of any format: in a quantized layer, those that do
# not belong to the detected format are an error; elsewhere they are orphans (also an error).
_QPARAMS = frozenset(
    {
        "weight_packed",
        "weight_scale",
        "weight_scale_2",
        "weight_global_scale",
        "weight_zero_point",
        "weight_scale_inv",
        "weight_shape",
        "input_scale",
        "input_scale_2",
        "input_global_scale",
        "input_zero_point",
    }
)


# ---------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, safetensors dtype name, shape, byte range in the data."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _SafetensorsFile:
    """One ``.safetensors`` file, validated on open and read through ``numpy.memmap``."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="numpy") as f:  # validates header and size
                names = list(f.keys())
        except SafetensorError as e:
            raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e})") from None
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        self._data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name in names:
            h = header[name]
            begin, end = h["data_offsets"]
            self.tensors[name] = TensorInfo(path, h["dtype"], tuple(h["shape"]), begin, end)
        self._mmap: np.memmap | None = None

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the mapped file (no copy)."""
        info = self.tensors[name]
        if info.dtype not in _DTYPES:
            raise ValueError(
                f"tensor {name!r} in {self.path}: dtype {info.dtype} is not supported "
                f"(supported: {', '.join(_DTYPES)})"
            )
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self._data_start + info.begin : self._data_start + info.end]
        return raw.view(_DTYPES[info.dtype]).reshape(info.shape)


def _checkpoint_files(path: Path) -> tuple[Path, list[Path], dict[str, str] | None]:
    """(directory, safetensors files, index weight map or None) for a directory, a
    ``.safetensors`` file or an index JSON."""
    if path.is_dir():
        directory = path
        if (path / INDEX_FILE).is_file():
            path = path / INDEX_FILE
        elif (path / SINGLE_FILE).is_file():
            return directory, [path / SINGLE_FILE], None
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{directory}: no {INDEX_FILE} and no *.safetensors file")
            return directory, files, None
    elif not path.is_file():
        raise ValueError(f"checkpoint path {path} does not exist")
    directory = path.parent
    if path.name.endswith(".json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: not a safetensors index (needs a 'weight_map' object): {e}"
            ) from None
        files = sorted({directory / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ValueError(f"{path}: lists shard {f.name}, which does not exist")
        return directory, files, weight_map
    return directory, [path], None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


# ---------------------------------------------------------------------------------------
# format detection
# ---------------------------------------------------------------------------------------


def detect_format(
    quantization_config: Mapping[str, Any] | None,
    modelopt_config: Mapping[str, Any] | None = None,
    tensor_names: Iterable[str] = (),
) -> str:
    """The NVFP4 format of a checkpoint: one of :data:`FORMATS`.

    Args:
      quantization_config: ``config.json``'s ``quantization_config`` (or ``None``).
      modelopt_config: the contents of ModelOpt's ``hf_quant_config.json`` (or ``None``).
      tensor_names: used only when neither config says anything: ``*.weight_packed`` means
        compressed-tensors, ``*.input_scale_2`` Quark, ``*.weight_scale_2`` ModelOpt.

    Raises:
      NotImplementedError: the config names a quantization that is not NVFP4.
      ValueError: nothing identifies an NVFP4 checkpoint.
    """
    qc = dict(quantization_config or {})
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        _check_ct_config(qc)
        return "compressed-tensors"
    if method in ("modelopt", "modelopt_fp4"):
        algo = qc.get("quant_algo", qc.get("quantization", {}).get("quant_algo"))
        if str(algo).upper() != "NVFP4":
            raise NotImplementedError(
                f"ModelOpt checkpoint with quant_algo {algo!r}: only 'NVFP4' is supported"
            )
        return "modelopt"
    if method == "quark":
        _check_quark_config(qc)
        return "quark"
    if method:
        raise NotImplementedError(
            f"quantization_config.quant_method {method!r} is not an NVFP4 format "
            f"(supported: modelopt, compressed-tensors, quark)"
        )
    if modelopt_config is not None:
        algo = modelopt_config.get("quantization", {}).get("quant_algo")
        if str(algo).upper() != "NVFP4":
            raise NotImplementedError(
                f"{MODELOPT_CONFIG_FILE}: quant_algo {algo!r}: only 'NVFP4' is supported"
            )
        return "modelopt"
    suffixes = {n.rpartition(".")[2] for n in tensor_names}
    if "weight_packed" in suffixes:
        return "compressed-tensors"
    if "input_scale_2" in suffixes:
        return "quark"
    if "weight_scale_2" in suffixes:
        return "modelopt"
    raise ValueError(
        "cannot detect the checkpoint format: no quantization_config in config.json, no "
        f"{MODELOPT_CONFIG_FILE}, and no NVFP4 tensors (*.weight_packed, *.weight_scale_2); "
        f"pass format= one of {FORMATS}"
    )


def _check_ct_config(qc: Mapping[str, Any]) -> None:
    groups = qc.get("config_groups") or {}
    fmt = qc.get("format")
    formats = set(fmt if isinstance(fmt, list) else [fmt]) - {None}
    for name, group in groups.items():
        weights = group.get("weights") or {}
        if group.get("format"):
            formats.add(group["format"])
        nvfp4 = (
            weights.get("num_bits") == 4
            and weights.get("type") == "float"
            and weights.get("group_size") == BLOCK_SIZE
        )
        if not nvfp4:
            raise NotImplementedError(
                f"compressed-tensors config group {name!r} is not NVFP4 (weights num_bits=4, "
                f"type=float, group_size=16), got {weights}"
            )
    if formats and "nvfp4-pack-quantized" not in formats:
        raise NotImplementedError(
            f"compressed-tensors format {sorted(formats)} is not 'nvfp4-pack-quantized'"
        )


def _check_quark_config(qc: Mapping[str, Any]) -> None:
    weight = (qc.get("global_quant_config") or {}).get("weight")
    ok = (
        isinstance(weight, list)
        and len(weight) == 2
        and weight[0].get("dtype") == "fp4"
        and weight[0].get("qscheme") == "per_group"
        and weight[0].get("group_size") == BLOCK_SIZE
        and weight[1].get("dtype") == "fp8_e4m3"
        and weight[1].get("qscheme") == "per_tensor"
    )
    if not ok:
        raise NotImplementedError(
            "Quark checkpoint is not NVFP4: global_quant_config.weight must be "
            f"[fp4 per_group group_size=16, fp8_e4m3 per_tensor], got {weight}"
        )


# ---------------------------------------------------------------------------------------
# the lazy reader
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Checkpoint:
    """A loaded NVFP4 checkpoint.

    Attributes:
      format: one of :data:`FORMATS`.
      weights: layer name -> ``NVFP4Array`` of logical shape ``[N, K]`` (out, in), blocked
        along K, stored ``data [N, K/2]``, ``scales [N, K/16]``, scalar ``tensor_scale``.
      input_scales: layer name -> float32 scalar activation tensor scale (the multiplier,
        ``amax_x / (6·448)``), for the layers of a W4A4 checkpoint that have one.
      dense: tensor name -> ``jax.Array`` for every other tensor (embeddings, norms, biases
        such as ``{layer}.bias``, unquantized layers), in its stored dtype.
      quantization_config: the config the format was detected from (``config.json``'s
        ``quantization_config`` or ``hf_quant_config.json``), or ``None``.
    """

    format: str
    weights: dict[str, NVFP4Array]
    input_scales: dict[str, jax.Array]
    dense: dict[str, jax.Array]
    quantization_config: dict | None = None

    def weight(self, layer: str) -> NVFP4Array:
        if layer not in self.weights:
            raise KeyError(
                f"no quantized layer {layer!r} in the checkpoint ({len(self.weights)} layers)"
            )
        return self.weights[layer]

    def input_scale(self, layer: str) -> jax.Array | None:
        self.weight(layer)
        return self.input_scales.get(layer)

    def tensor(self, name: str) -> jax.Array:
        if name not in self.dense:
            raise KeyError(f"no dense tensor {name!r} in the checkpoint")
        return self.dense[name]

    def bias(self, layer: str) -> jax.Array | None:
        """``{layer}.bias`` if the checkpoint has it."""
        return self.dense.get(f"{layer}.bias")

    def __getitem__(self, name: str) -> NVFP4Array | jax.Array:
        """A quantized layer's weight by layer name, or a dense tensor by tensor name."""
        if name in self.weights:
            return self.weights[name]
        return self.tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self.weights or name in self.dense


class CheckpointReader:
    """A lazy view of an NVFP4 checkpoint: names, dtypes and shapes are read (and every
    structural check made) on construction; tensor data only when asked for.

    Args:
      path: a checkpoint directory (``model.safetensors.index.json``, ``model.safetensors``
        or any ``*.safetensors``, next to ``config.json`` / ``hf_quant_config.json``), a
        single ``.safetensors`` file or an index JSON.
      format: force one of :data:`FORMATS` instead of detecting it.
      dtype: the ``dtype`` recorded on each ``NVFP4Array`` (the default dequantization
        target); default: ``config.json``'s ``torch_dtype``/``dtype`` when it is bf16, fp16
        or fp32, else bfloat16.

    Raises ``ValueError`` naming the tensor (and file) for missing or unexpected tensors,
    wrong dtypes or shapes, in-features that are not a multiple of 16, shards that disagree
    with the index, and corrupt files; ``NotImplementedError`` for valid checkpoints of
    another quantization (FP8 layers, non-NVFP4 configs).
    """

    def __init__(self, path: str | os.PathLike, *, format: str | None = None, dtype: Any = None):
        self.directory, files, weight_map = _checkpoint_files(Path(path))
        self._files = {f: _SafetensorsFile(f) for f in files}
        self._tensors = self._collect(list(self._files.values()), weight_map)
        config = _read_json(self.directory / CONFIG_FILE) or {}
        modelopt_config = _read_json(self.directory / MODELOPT_CONFIG_FILE)
        qc = config.get("quantization_config")
        if format is None:
            format = detect_format(qc, modelopt_config, self._tensors)
        elif format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.format: str = format
        self.spec: FormatSpec = SPECS[format]
        self.quantization_config: dict | None = qc if qc is not None else modelopt_config
        self.dtype = jnp.dtype(_default_dtype(config) if dtype is None else dtype)
        self.layers, self.dense_names = self._classify()
        self._layer_set, self._dense_set = frozenset(self.layers), frozenset(self.dense_names)

    # -- structure -------------------------------------------------------------------------
    @staticmethod
    def _collect(
        files: list[_SafetensorsFile], weight_map: dict[str, str] | None
    ) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in f.tensors.items():
                if name in tensors:
                    raise ValueError(
                        f"tensor {name!r} is stored twice: in {tensors[name].file} and {f.path}"
                    )
                if weight_map is not None and name not in weight_map:
                    raise ValueError(
                        f"extra tensor {name!r} in {f.path.name}: it is not listed in the index"
                    )
                if weight_map is not None and weight_map[name] != f.path.name:
                    raise ValueError(
                        f"tensor {name!r} found in {f.path.name} but the index lists it in {weight_map[name]}"
                    )
                tensors[name] = info
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in tensors:
                    raise ValueError(
                        f"tensor {name!r} is listed in the index (file {file}) but missing from that file"
                    )
        return tensors

    def _classify(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Split tensor names into quantized layers and dense tensors, checking each layer."""
        spec = self.spec
        params: dict[str, set[str]] = {}
        for name in self._tensors:
            layer, _, param = name.rpartition(".")
            params.setdefault(layer, set()).add(param)
        quant_markers = {spec.weight_scale, spec.weight_scalar, spec.input_scalar}
        if spec.weight != "weight":
            quant_markers.add(spec.weight)
        layers = []
        for layer, names in params.items():
            if names & quant_markers:
                self._check_layer(layer, names)
                layers.append(layer)
            else:
                orphans = sorted(names & _QPARAMS)
                if orphans:
                    raise ValueError(
                        f"unexpected tensor {layer}.{orphans[0]}: a {spec.name} checkpoint has no "
                        f"such tensor outside a quantized layer (no {layer}.{spec.weight_scale})"
                    )
        quantized = {f"{layer}.{p}" for layer in layers for p in spec.names}
        dense = tuple(n for n in self._tensors if n not in quantized)
        return tuple(layers), dense

    def _check_layer(self, layer: str, params: set[str]) -> None:
        spec = self.spec
        name = lambda p: f"{layer}.{p}"
        for p in (spec.weight, spec.weight_scale, spec.weight_scalar):
            if p not in params:
                raise ValueError(
                    f"missing tensor {name(p)}: a {spec.name} NVFP4 layer needs {name(spec.weight)}, "
                    f"{name(spec.weight_scale)} and {name(spec.weight_scalar)} (found "
                    f"{', '.join(name(q) for q in sorted(params))})"
                )
        extra = sorted((params & _QPARAMS) - set(spec.names))
        if extra:
            raise ValueError(
                f"unexpected tensor {name(extra[0])} in a {spec.name} checkpoint (its NVFP4 layers "
                f"hold only {', '.join(spec.names)}); is this another format? pass format="
            )
        w = self._tensors[name(spec.weight)]
        if w.dtype != "U8":
            if w.dtype.startswith("F8") or w.dtype.startswith("F4"):
                raise NotImplementedError(
                    f"layer {layer} is not NVFP4: {name(spec.weight)} has dtype {w.dtype} "
                    f"(an FP8 or other quantized layer); only NVFP4 layers are supported"
                )
            raise ValueError(
                f"{name(spec.weight)} must have dtype U8 (packed E2M1 codes), got {w.dtype}"
            )
        if len(w.shape) != 2:
            raise ValueError(
                f"{name(spec.weight)} must be 2-D [out_features, in_features/2], got shape {list(w.shape)}"
            )
        n, k = w.shape[0], 2 * w.shape[1]
        if k % BLOCK_SIZE:
            raise ValueError(
                f"{name(spec.weight)}: in-features {k} (2 x {w.shape[1]} packed bytes) must be a "
                f"multiple of 16 (one E4M3 block scale per 16 inputs)"
            )
        s = self._tensors[name(spec.weight_scale)]
        if s.dtype != "F8_E4M3":
            raise ValueError(f"{name(spec.weight_scale)} must have dtype F8_E4M3, got {s.dtype}")
        if s.shape != (n, k // BLOCK_SIZE):
            raise ValueError(
                f"{name(spec.weight_scale)} must have shape [{n}, {k // BLOCK_SIZE}] (one per 16 of the "
                f"{k} in-features of {name(spec.weight)} {list(w.shape)}), got {list(s.shape)}"
            )
        for p in (spec.weight_scalar, spec.input_scalar):
            if p in params:
                t = self._tensors[name(p)]
                if t.dtype not in _SCALAR_DTYPES:
                    raise ValueError(
                        f"{name(p)} must have dtype {' or '.join(_SCALAR_DTYPES)}, got {t.dtype}"
                    )
                if t.shape not in ((), (1,)):
                    raise ValueError(
                        f"{name(p)} must be a scalar (shape [] or [1]), got shape {list(t.shape)}"
                    )

    # -- data ------------------------------------------------------------------------------
    def _read(self, name: str) -> np.ndarray:
        return self._files[self._tensors[name].file].read(name)

    def _scalar(self, name: str) -> np.float32:
        v = np.float32(self._read(name).astype(np.float32).reshape(()))
        if self.spec.inverse:
            if not np.isfinite(v) or v <= 0:
                raise ValueError(
                    f"{name} must be finite and > 0 (it is the inverse scale 6*448/amax), got {v}"
                )
            v = np.float32(1.0) / v
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
        return v

    def weight(self, layer: str) -> NVFP4Array:
        """The layer's weight: an ``NVFP4Array`` of logical shape ``[N, K]``."""
        if layer not in self._layer_set:
            raise KeyError(
                f"no quantized layer {layer!r} in {self.directory} ({len(self.layers)} layers)"
            )
        spec = self.spec
        data = jnp.asarray(self._read(f"{layer}.{spec.weight}"))
        scales = jnp.asarray(self._read(f"{layer}.{spec.weight_scale}"))
        ts = self._scalar(f"{layer}.{spec.weight_scalar}")
        if ts == 0:  # an all-zero weight (ModelOpt exports amax 0 as scale 0): same values
            scales, ts = jnp.zeros_like(scales), np.float32(1.0)
        return NVFP4Array(data, scales, jnp.float32(ts), axis=-1, dtype=self.dtype)

    def input_scale(self, layer: str) -> jax.Array | None:
        """The activation tensor scale (multiplier) of ``layer``, or ``None`` (W4A16)."""
        if layer not in self._layer_set:
            raise KeyError(f"no quantized layer {layer!r} in {self.directory}")
        name = f"{layer}.{self.spec.input_scalar}"
        if name not in self._tensors:
            return None
        v = self._scalar(name)
        if v == 0:
            raise ValueError(f"{name} must be > 0, got 0")
        return jnp.float32(v)

    def tensor(self, name: str) -> jax.Array:
        """A dense tensor by its full name, in its stored dtype."""
        if name not in self._dense_set:
            raise KeyError(f"no dense tensor {name!r} in {self.directory}")
        return jnp.asarray(self._read(name))

    def bias(self, layer: str) -> jax.Array | None:
        """``{layer}.bias`` if the checkpoint has it."""
        name = f"{layer}.bias"
        return self.tensor(name) if name in self._dense_set else None

    def load(self, *, progress: bool = True) -> Checkpoint:
        """Read every tensor (one at a time) into a :class:`Checkpoint`."""
        weights: dict[str, NVFP4Array] = {}
        input_scales: dict[str, jax.Array] = {}
        dense: dict[str, jax.Array] = {}
        items = [(True, n) for n in self.layers] + [(False, n) for n in self.dense_names]
        for quantized, name in _progress(items, progress, f"loading {self.format} checkpoint"):
            if quantized:
                weights[name] = self.weight(name)
                s = self.input_scale(name)
                if s is not None:
                    input_scales[name] = s
            else:
                dense[name] = self.tensor(name)
        return Checkpoint(self.format, weights, input_scales, dense, self.quantization_config)


def load_checkpoint(
    path: str | os.PathLike, *, format: str | None = None, dtype: Any = None, progress: bool = True
) -> Checkpoint:
    """Load an NVFP4 checkpoint (ModelOpt, compressed-tensors or Quark) from ``path``.

    ``CheckpointReader(path, format=format, dtype=dtype).load(progress=progress)``; see
    :class:`CheckpointReader` for the arguments and errors and the module docstring for how
    each format maps to :class:`~nvfp4_jax.NVFP4Array`.
    """
    return CheckpointReader(path, format=format, dtype=dtype).load(progress=progress)


def _default_dtype(config: Mapping[str, Any]) -> Any:
    name = str(config.get("torch_dtype", config.get("dtype", ""))).removeprefix("torch.")
    return {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}.get(
        name, jnp.bfloat16
    )


def _progress(items: Sequence, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no progress bar without tqdm
        return items
    return tqdm(items, desc=desc, unit="tensor", leave=False)


# ---------------------------------------------------------------------------------------
# fused layers
# ---------------------------------------------------------------------------------------

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


FUSE_MAX_WARNING = (
    "In NVFP4 linear, the global scale for weight are different for parallel layers (e.g. "
    "q_proj, k_proj, v_proj). This will likely result in reduced accuracy. Please verify the "
    "model accuracy. Consider using a checkpoint with a shared global NVFP4 scale for fused "
    "layers, or nvfp4_jax.checkpoint.fuse(..., mode='rescale')."
)


@dataclasses.dataclass(frozen=True)
class RescaleReport:
    """How re-scaling one partition's block scales to a larger shared tensor scale went.

    ``inexact`` block scales could not represent ``scale · own / shared`` exactly in E4M3
    (re-rounded: their 16 values move by at most half an E4M3 step, relative error
    ``max_rel_error``); ``zeroed`` of them underflowed to 0 (their values are lost).
    """

    name: str
    ratio: float  # own tensor scale / shared tensor scale (<= 1)
    blocks: int
    inexact: int
    zeroed: int
    max_rel_error: float

    @property
    def exact(self) -> bool:
        return self.inexact == 0


def rescale(
    a: NVFP4Array, tensor_scale: Any, *, name: str = "weight"
) -> tuple[NVFP4Array, RescaleReport]:
    """Express ``a`` with a larger tensor scale by re-rounding its block scales.

    ``new_scale = e4m3_rne(min(f32(scale) · a.tensor_scale / tensor_scale, 448))``; codes are
    unchanged. A block is *exact* when ``f32(new_scale) · tensor_scale`` equals
    ``f32(scale) · a.tensor_scale`` in float32 -- then its dequantized values are bit-identical.

    Args:
      a: a 2-D ``NVFP4Array`` with a scalar tensor scale.
      tensor_scale: the new (shared) tensor scale, ``>= a.tensor_scale``.
      name: used in the report and in errors.

    Returns:
      ``(array with the new tensor scale, RescaleReport)``.
    """
    old = jnp.float32(a.tensor_scale)
    new = jnp.float32(tensor_scale)
    if not bool(new >= old):
        raise ValueError(
            f"{name}: the new tensor scale {float(new)} must be >= the current {float(old)}"
        )
    factor = a.scales.astype(jnp.float32) * old  # the block factor dequantize uses
    scales = round_to_e4m3(div_rn(factor, new))
    got = scales.astype(jnp.float32) * new
    exact = got == factor
    rel = jnp.where(factor > 0, jnp.abs(got - factor) / jnp.where(factor > 0, factor, 1.0), 0.0)
    report = RescaleReport(
        name=name,
        ratio=float(old / new),
        blocks=int(factor.size),
        inexact=int(jnp.sum(~exact)),
        zeroed=int(jnp.sum((got == 0) & (factor > 0))),
        max_rel_error=float(jnp.max(rel, initial=0.0)),
    )
    return NVFP4Array(a.data, scales, new, axis=a.axis, dtype=a.dtype), report


def fuse(
    parts: Sequence[NVFP4Array],
    *,
    mode: str = "max",
    strict: bool = True,
    names: Sequence[str] | None = None,
) -> NVFP4Array:
    """Concatenate partitions of a fused layer (q/k/v, gate/up) along the output axis.

    Each part is a 2-D ``NVFP4Array`` of logical shape ``[N_i, K]`` (same K) with its own
    scalar tensor scale; the result is ``[sum N_i, K]`` with one tensor scale, the largest.

    Args:
      parts: the partitions, in output order.
      mode: ``"max"`` -- vLLM's ``process_weights_after_loading``: take the largest tensor
        scale and keep every block scale; partitions whose own scale was smaller come out
        multiplied by ``max / own``. Warns once when the scales differ. ``"rescale"`` --
        exact where possible: re-round each partition's block scales to
        ``scale · own / max`` (:func:`rescale`), so values stay the same wherever that is
        representable in E4M3.
      strict: with ``mode="rescale"``, raise ``ValueError`` when a block scale is not
        representable (else warn with the same report and keep the re-rounded scales).
      names: partition names for messages (default ``part0``, ``part1``, ...).

    Returns:
      The fused ``NVFP4Array`` (``dtype`` of the first part).
    """
    if mode not in ("max", "rescale"):
        raise ValueError(f"mode must be 'max' or 'rescale', got {mode!r}")
    parts = list(parts)
    names = [f"part{i}" for i in range(len(parts))] if names is None else list(names)
    if not parts or len(names) != len(parts):
        raise ValueError(
            f"fuse needs at least one part and one name per part, got {len(parts)} parts, {len(names)} names"
        )
    for a, n in zip(parts, names):
        if not isinstance(a, NVFP4Array):
            raise TypeError(f"{n} must be an NVFP4Array, got {type(a).__name__}")
        if a.data.ndim != 2 or a.axis != -1 or np.ndim(a.tensor_scale) != 0:
            raise ValueError(
                f"{n} must be a 2-D [N, K] NVFP4Array blocked along K with a scalar tensor scale, got {a}"
            )
        if a.data.shape[1] != parts[0].data.shape[1]:
            raise ValueError(
                f"{n} has in-features {2 * a.data.shape[1]}, {names[0]} has {2 * parts[0].data.shape[1]}: "
                f"fused partitions must share K"
            )
    scales_ts = [jnp.float32(a.tensor_scale) for a in parts]
    shared = jnp.max(jnp.stack(scales_ts))
    if mode == "max":
        if any(bool(s != shared) for s in scales_ts):
            _warn_once(FUSE_MAX_WARNING)
        block_scales = [a.scales for a in parts]
    else:
        block_scales = []
        for a, n in zip(parts, names):
            b, report = rescale(a, shared, name=n)
            block_scales.append(b.scales)
            if not report.exact:
                msg = (
                    f"fuse(mode='rescale'): {n}: {report.inexact} of {report.blocks} block scales are not "
                    f"representable at the shared tensor scale (ratio {report.ratio:.6g}); re-rounded to "
                    f"E4M3 with max relative error {report.max_rel_error:.3g}, {report.zeroed} underflow to 0"
                )
                if strict:
                    raise ValueError(msg + "; pass strict=False to accept, or mode='max'")
                warnings.warn(msg, UserWarning, stacklevel=2)
    data = jnp.concatenate([a.data for a in parts], axis=0)
    return NVFP4Array(
        data, jnp.concatenate(block_scales, axis=0), shared, axis=-1, dtype=parts[0].dtype
    )


# Projection names of one expert, (gate, up, down), as stored by the common MoE families:
# Qwen-MoE / DeepSeek / Llama-4 style, and Mixtral's w1 (gate), w3 (up), w2 (down).
EXPERT_PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def stack_experts(
    checkpoint: Any,
    prefix: str,
    *,
    names: Sequence[str] | None = None,
    fuse_mode: str = "rescale",
    strict: bool = True,
) -> tuple[NVFP4Array, NVFP4Array]:
    """The experts of one MoE block as the stacked weights of :func:`nvfp4_jax.moe.moe`.

    Checkpoints store each expert's projections as separate layers
    ``{prefix}.{e}.{gate,up,down}`` (``[I, H]``, ``[I, H]``, ``[H, I]``, out x in), like vLLM
    reads them before fusing ``w13``. Each expert's gate and up become one ``[2I, H]`` layer
    (gate rows first, :func:`fuse`), and the experts are stacked with one tensor scale each.

    Args:
      checkpoint: a :class:`Checkpoint` or a lazy :class:`CheckpointReader` (reads only these
        layers).
      prefix: the experts' module path, e.g. ``"model.layers.3.mlp.experts"`` or Mixtral's
        ``"model.layers.3.block_sparse_moe.experts"``; experts are numbered ``0 .. E-1``.
      names: the ``(gate, up, down)`` projection names; default: whichever of
        :data:`EXPERT_PROJECTIONS` the checkpoint uses under ``prefix``.
      fuse_mode: how an expert's gate and up tensor scales become one (:func:`fuse`):
        ``"rescale"`` (default; exact wherever the re-scaled block scale is representable, as
        vLLM's ``reconcile_nvfp4_moe_w13_scales`` re-rounds) or ``"max"`` (vLLM's older
        behaviour: the larger scale, block scales unchanged).
      strict: with ``"rescale"``, raise where a block scale is not representable.

    Returns:
      ``(w13, w2)``: ``NVFP4Array`` of logical shapes ``[E, H, 2I]`` and ``[E, I, H]``, blocked
      along their K (``H`` resp. ``I``; stored ``[E, 2I, H/2]`` and ``[E, H, I/2]``), tensor
      scales ``[E]``; ready for ``nvfp4_jax.prepare`` and ``nvfp4_jax.moe.moe``.
    """
    if isinstance(checkpoint, Checkpoint):
        layers = checkpoint.weights.keys()
    elif isinstance(checkpoint, CheckpointReader):
        layers = checkpoint.layers
    else:
        raise TypeError(
            f"checkpoint must be a Checkpoint or CheckpointReader, got {type(checkpoint).__name__}"
        )
    head = prefix.rstrip(".") + "."
    found: dict[int, set[str]] = {}
    for layer in layers:
        index, dot, proj = (
            layer[len(head) :].partition(".") if layer.startswith(head) else ("", "", "")
        )
        if dot and index.isdigit() and "." not in proj:
            found.setdefault(int(index), set()).add(proj)
    if not found:
        raise ValueError(f"no expert layers {head}<e>.<projection> in the checkpoint")
    present = set().union(*found.values())
    if names is None:
        names = next((p for p in EXPERT_PROJECTIONS if set(p) <= present), None)
        if names is None:
            raise ValueError(
                f"the experts under {head} have projections {sorted(present)}; none of the known"
                f" (gate, up, down) sets {EXPERT_PROJECTIONS} -- pass names=(gate, up, down)"
            )
    if len(names) != 3:
        raise ValueError(f"names must be (gate, up, down), got {names!r}")
    count = max(found) + 1
    missing = [f"{head}{e}.{p}" for e in range(count) for p in names if p not in found.get(e, ())]
    if missing:
        raise ValueError(
            f"{len(missing)} expert layers missing for experts 0..{count - 1}: {missing[:4]}"
        )
    w13, w2 = [], []
    for e in range(count):
        gate, up, down = (checkpoint.weight(f"{head}{e}.{p}") for p in names)
        w13.append(
            fuse(
                [gate, up],
                mode=fuse_mode,
                strict=strict,
                names=[f"{head}{e}.{names[0]}", f"{head}{e}.{names[1]}"],
            )
        )
        w2.append(down)
    return _stack(w13, f"{head}*.{names[0]}+{names[1]}"), _stack(w2, f"{head}*.{names[2]}")


def _stack(experts: list[NVFP4Array], what: str) -> NVFP4Array:
    """``[N, K]`` expert weights -> one ``NVFP4Array`` of logical shape ``[E, K, N]``."""
    shapes = {a.data.shape for a in experts}
    if len(shapes) != 1:
        raise ValueError(f"{what}: the experts' weights differ in shape: {sorted(shapes)}")
    return NVFP4Array(
        jnp.stack([a.data for a in experts]),
        jnp.stack([a.scales for a in experts]),
        jnp.stack([jnp.float32(a.tensor_scale) for a in experts]),
        axis=-2,
        dtype=experts[0].dtype,
    )


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike,
    weights: Mapping[str, NVFP4Array],
    *,
    format: str = "modelopt",
    input_scales: Mapping[str, Any] | None = None,
    dense: Mapping[str, Any] | None = None,
    model_config: Mapping[str, Any] | None = None,
    ignore: Sequence[str] | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write NVFP4 weights as a ModelOpt or compressed-tensors checkpoint directory.

    Args:
      path: the output directory (created).
      weights: layer name -> 2-D ``NVFP4Array`` of logical shape ``[N, K]`` blocked along K
        (``quantize(w_nk)``) with a scalar tensor scale.
      format: ``"modelopt"`` (``{L}.weight``/``weight_scale``/``weight_scale_2`` F32 ``[]``,
        ``input_scale``; ``hf_quant_config.json``) or ``"compressed-tensors"``
        (``{L}.weight_packed``/``weight_scale``/``weight_global_scale`` F32 ``[1]`` =
        ``1/tensor_scale``, ``input_global_scale``; ``config.json`` ``quantization_config``,
        scheme NVFP4 when ``input_scales`` are given, NVFP4A16 otherwise).
      input_scales: layer name -> activation tensor scale (multiplier, ``amax/(6·448)``) for
        W4A4 checkpoints; every quantized layer needs one, or none may have one.
      dense: tensor name -> array for everything else (embeddings, norms, biases, ...).
      model_config: the model's ``config.json`` contents; written with the quantization
        config added (compressed-tensors always writes a ``config.json``).
      ignore: unquantized ``Linear`` modules for the config's ignore / exclude list;
        default: every module with a 2-D ``{module}.weight`` in ``dense``.
      max_shard_bytes: split into ``model-0000i-of-0000n.safetensors`` files of about this
        size (a layer's tensors stay in one file) plus ``model.safetensors.index.json``.

    compressed-tensors stores the inverse scale: reading back gives ``1/f32(1/tensor_scale)``,
    which is ``tensor_scale`` exactly when it is itself a float32 reciprocal (true for
    ``quantize``'s default scale and for arrays loaded from compressed-tensors), else within
    one float32 ulp.
    """
    if format not in ("modelopt", "compressed-tensors"):
        raise ValueError(f"format must be 'modelopt' or 'compressed-tensors', got {format!r}")
    spec = SPECS[format]
    input_scales = dict(input_scales or {})
    dense = dict(dense or {})
    if input_scales and set(input_scales) != set(weights):
        missing = sorted(set(weights) - set(input_scales)) or sorted(
            set(input_scales) - set(weights)
        )
        raise ValueError(
            f"input_scales must cover exactly the quantized layers (W4A4) or be empty (W4A16); "
            f"mismatch at {missing[0]!r}"
        )
    groups: list[dict[str, np.ndarray]] = []
    for layer, a in weights.items():
        groups.append(_layer_tensors(layer, a, input_scales.get(layer), spec))
    taken = {n for g in groups for n in g}
    for name, v in dense.items():
        if name in taken:
            raise ValueError(f"dense tensor {name!r} collides with a quantized layer's tensor")
        groups.append({name: np.ascontiguousarray(np.asarray(v))})
    if ignore is None:
        ignore = sorted(
            {
                n.removesuffix(".weight")
                for n, v in dense.items()
                if n.endswith(".weight") and np.ndim(v) == 2
            }
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(out, groups, max_shard_bytes)
    config = dict(model_config or {})
    if format == "modelopt":
        (out / MODELOPT_CONFIG_FILE).write_text(
            json.dumps(_modelopt_config(list(ignore)), indent=2)
        )
        if model_config is not None:
            config["quantization_config"] = _modelopt_config(list(ignore))["quantization"] | {
                "quant_method": "modelopt"
            }
            (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    else:
        config["quantization_config"] = _ct_config(list(ignore), w4a4=bool(input_scales))
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def _layer_tensors(
    layer: str, a: NVFP4Array, input_scale: Any, spec: FormatSpec
) -> dict[str, np.ndarray]:
    if not isinstance(a, NVFP4Array):
        raise TypeError(f"weights[{layer!r}] must be an NVFP4Array, got {type(a).__name__}")
    if a.data.ndim != 2 or a.axis != -1 or np.ndim(a.tensor_scale) != 0:
        raise ValueError(
            f"weights[{layer!r}] must be a 2-D [N, K] NVFP4Array blocked along K (quantize(w_nk)) with "
            f"a scalar tensor scale, got {a}; store experts as separate layers"
        )
    scalar_shape = (1,) if spec.inverse else ()

    def scalar(v: Any, what: str) -> np.ndarray:
        v = np.asarray(v, np.float32).reshape(())
        if not np.isfinite(v) or v <= 0:
            raise ValueError(f"{what} of layer {layer!r} must be finite and > 0, got {v}")
        return np.asarray(np.float32(1.0) / v if spec.inverse else v, np.float32).reshape(
            scalar_shape
        )

    t = {
        f"{layer}.{spec.weight}": np.ascontiguousarray(np.asarray(a.data)),
        f"{layer}.{spec.weight_scale}": np.ascontiguousarray(np.asarray(a.scales)),
        f"{layer}.{spec.weight_scalar}": scalar(a.tensor_scale, "tensor_scale"),
    }
    if input_scale is not None:
        t[f"{layer}.{spec.input_scalar}"] = scalar(input_scale, "input_scale")
    return t


def _write_shards(
    out: Path, groups: list[dict[str, np.ndarray]], max_shard_bytes: int | None
) -> None:
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for g in groups:
        g_size = sum(v.nbytes for v in g.values())
        if max_shard_bytes is not None and shards[-1] and size + g_size > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1].update(g)
        size += g_size
    metadata = {"format": "pt"}  # what transformers expects of a safetensors checkpoint
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=metadata)
        weight_map.update({n: fname for n in shard})
    total = sum(v.nbytes for s in shards for v in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _modelopt_config(exclude: list[str]) -> dict:
    return {
        "producer": {"name": "modelopt", "version": "nvfp4-jax"},
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": BLOCK_SIZE,
            "exclude_modules": exclude,
        },
    }


def _ct_args(dynamic: Any, observer: str | None) -> dict:
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": BLOCK_SIZE,
        "strategy": "tensor_group",
        "dynamic": dynamic,
        "observer": observer,
        "scale_dtype": "torch.float8_e4m3fn",
    }


def _ct_config(ignore: list[str], *, w4a4: bool) -> dict:
    """compressed-tensors' quantization_config for the NVFP4 / NVFP4A16 preset schemes."""
    group = {
        "targets": ["Linear"],
        "weights": _ct_args(False, None),
        "input_activations": _ct_args("local", "static_minmax") if w4a4 else None,
        "output_activations": None,
        "format": "nvfp4-pack-quantized",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
