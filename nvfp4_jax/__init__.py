"""nvfp4-jax: NVIDIA's NVFP4 format (E2M1 codes, per-16 E4M3 block scales, a float32
tensor scale) for JAX, with Pallas Mosaic GPU kernels for Hopper."""

from nvfp4_jax import checkpoint, moe, schemes, sharding
from nvfp4_jax.api import (
    dequantize,
    dequantize_to_dtype,
    quant_dequant,
    quantize,
    scaled_fp4_quant,
)
from nvfp4_jax.array import NVFP4Array
from nvfp4_jax.checkpoint import CheckpointReader, load_checkpoint, save_checkpoint
from nvfp4_jax.formats import (
    BLOCK_SIZE,
    e2m1_to_float,
    float_to_e2m1,
    pack_fp4,
    unpack_fp4,
)
from nvfp4_jax.grouped import grouped_matmul
from nvfp4_jax.layouts import (
    pad_activation_for_cutlass,
    pad_weight_for_cutlass,
    slice_output,
    swizzle_scales,
    unswizzle_scales,
)
from nvfp4_jax.matmul import linear, matmul, prepare
from nvfp4_jax.scales import (
    global_scale_from_tensor_scale,
    marlin_compute_scale_factor,
    marlin_decode_scales,
    marlin_process_global_scale,
    marlin_process_scales,
    tensor_scale_from_global_scale,
)

__version__ = "0.1.0"

__all__ = [
    "BLOCK_SIZE",
    "CheckpointReader",
    "NVFP4Array",
    "checkpoint",
    "dequantize",
    "dequantize_to_dtype",
    "e2m1_to_float",
    "float_to_e2m1",
    "global_scale_from_tensor_scale",
    "grouped_matmul",
    "linear",
    "load_checkpoint",
    "marlin_compute_scale_factor",
    "marlin_decode_scales",
    "marlin_process_global_scale",
    "marlin_process_scales",
    "matmul",
    "moe",
    "pack_fp4",
    "pad_activation_for_cutlass",
    "pad_weight_for_cutlass",
    "prepare",
    "quant_dequant",
    "quantize",
    "save_checkpoint",
    "scaled_fp4_quant",
    "schemes",
    "sharding",
    "slice_output",
    "swizzle_scales",
    "tensor_scale_from_global_scale",
    "unpack_fp4",
    "unswizzle_scales",
]
