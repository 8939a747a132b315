"""PyTorch interop for nvfp4-jax (needs ``torch``: ``pip install 'nvfp4-jax[torch]'``).

* :func:`to_jax` / :func:`to_torch`: zero-copy DLPack bridge for CPU and CUDA tensors,
  stream-ordered on CUDA (see :mod:`interop.dlpack` for the full contract).
* :class:`NVFP4Linear`: an inference ``torch.nn.Module`` holding an NVFP4 weight in the
  ModelOpt/Quark checkpoint layout (``weight`` uint8 ``[out, in/2]``, ``weight_scale`` E4M3
  ``[out, in/16]``, ``weight_scale_2`` f32), running ``nvfp4_jax.linear``.
* :func:`quantize_model_`: replace a model's ``nn.Linear`` layers in place.
"""

from interop.dlpack import SUPPORTED_DTYPES, to_jax, to_torch
from interop.modules import NVFP4Linear, QuantizeReport, quantize_model_

__all__ = [
    "SUPPORTED_DTYPES",
    "NVFP4Linear",
    "QuantizeReport",
    "quantize_model_",
    "to_jax",
    "to_torch",
]
