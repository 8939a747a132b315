"""Linear-layer schemes: how one NVFP4 checkpoint layer runs, in JAX.

vLLM's ``QuarkNVFP4`` scheme (and its ModelOpt / compressed-tensors siblings) has three
steps; here they are one frozen dataclass:

=====================================  ===================================================
vLLM                                   nvfp4_jax
=====================================  ===================================================
``create_weights(output_partition_     ``NVFP4Linear.from_checkpoint(ckpt, layer or
sizes, input_size_per_partition)``     [partitions])``: reads the tensors (any format)
``process_weights_after_loading``      fuses partitions (``checkpoint.fuse``: max tensor
                                       scale + warning, or exact re-scaling), takes the
                                       max activation scale, ``alpha = input_scale ·
                                       weight_scale_2``
``apply_weights(layer, x, bias)``      ``layer(x)``
=====================================  ===================================================

Two schemes:

* ``"w4a16"`` (default; weight-only, vLLM's Marlin semantics): ``nvfp4_jax.linear(x, W)``,
  i.e. ``x @ (e2m1 · scale)ᵀ`` accumulated in float32, times ``tensor_scale``, plus bias,
  one rounding to ``x.dtype``. The checkpoint's activation scale is ignored.
* ``"w4a4"`` (emulated W4A4, vLLM's ``run_nvfp4_emulations``): the activations are
  fake-quantized with the checkpoint's static activation scale -- quantize with
  ``global_scale = 1 / input_scale`` (vLLM's ``input_global_scale_inv``), dequantize to
  ``x.dtype`` -- the weight is dequantized to ``x.dtype``, ``out = x_dq @ w_dqᵀ`` with float32
  accumulation rounded once to ``x.dtype``, then ``+ bias`` in ``x.dtype`` (vLLM adds the bias
  after the GEMM). This is what a Blackwell W4A4 kernel computes up to accumulation order:
  ``alpha · (A_fp4 · SFA) @ (B_fp4 · SFB)ᵀ`` with ``alpha = input_scale · tensor_scale``.
  Codes and block scales of ``x`` are bit-identical to vLLM's ``ref_nvfp4_quant``; vLLM
  dequantizes them with ``scale / global_scale`` and we with ``scale · (1/global_scale)``
  (at most one float32 ulp apart before the cast to ``x.dtype``).

``NVFP4Linear`` is a pytree (weight, bias and activation scale are leaves), so it can be
passed through ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from nvfp4_jax import _checks
from nvfp4_jax._exact import div_rn
from nvfp4_jax.api import dequantize, quant_dequant
from nvfp4_jax.array import NVFP4Array
from nvfp4_jax.checkpoint import fuse
from nvfp4_jax.matmul import ACTIVATION_DTYPES, linear

SCHEMES = ("w4a16", "w4a4")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["weight", "bias", "input_scale"],
    meta_fields=["scheme", "partition_sizes", "backend"],
)
@dataclasses.dataclass(frozen=True)
class NVFP4Linear:
    """A linear layer with an NVFP4 weight: ``y = x @ Wᵀ + b``.

    Attributes:
      weight: ``NVFP4Array`` of logical shape ``[N, K]`` (out, in) blocked along K, stored
        ``data uint8 [N, K/2]``, ``scales float8_e4m3fn [N, K/16]``, scalar float32
        ``tensor_scale`` (ModelOpt/Quark ``weight_scale_2``; vLLM's ``weight_global_scale``).
      bias: optional ``[N]``.
      input_scale: float32 scalar activation tensor scale, the multiplier ``amax_x/(6·448)``
        (ModelOpt ``input_scale``, Quark ``input_scale_2``, compressed-tensors
        ``1/input_global_scale``; vLLM's ``input_global_scale``). Needed by ``"w4a4"``.
      scheme: ``"w4a16"`` or ``"w4a4"`` (see the module docstring).
      partition_sizes: output sizes of fused partitions (vLLM's ``logical_widths``), e.g.
        ``(q, k, v)``; ``(N,)`` for a single layer.
      backend: passed to the NVFP4 operations (``"xla"``, ``"pallas"`` or ``None``).
    """

    weight: NVFP4Array
    bias: jax.Array | None = None
    input_scale: jax.Array | None = None
    scheme: str = "w4a16"
    partition_sizes: tuple[int, ...] = ()
    backend: str | None = None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Any,
        layer: str | Sequence[str],
        *,
        scheme: str = "w4a16",
        fuse_mode: str = "max",
        strict: bool = True,
        backend: str | None = None,
    ) -> NVFP4Linear:
        """Build the layer from a ``checkpoint.Checkpoint`` or ``checkpoint.CheckpointReader``.

        Args:
          checkpoint: a loaded ``Checkpoint`` or a lazy ``CheckpointReader`` (reads only
            this layer's tensors).
          layer: a layer name, or the names of the partitions of a fused layer in output
            order (``[q_proj, k_proj, v_proj]``, ``[gate_proj, up_proj]``).
          scheme: ``"w4a16"`` or ``"w4a4"``.
          fuse_mode, strict: how partitions with different tensor scales are fused
            (``checkpoint.fuse``): ``"max"`` as vLLM (warns once), or ``"rescale"`` (exact;
            ``strict`` raises where a block scale is not representable).
          backend: see :class:`NVFP4Linear`.

        The fused activation scale is the largest of the partitions' (vLLM:
        ``input_scale_2.max()``); biases are concatenated (a partition without one
        contributes zeros).
        """
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        names = [layer] if isinstance(layer, str) else list(layer)
        if not names:
            raise ValueError("layer must be a layer name or a non-empty list of partition names")
        weights = [checkpoint.weight(n) for n in names]
        weight = (
            weights[0]
            if len(weights) == 1
            else fuse(weights, mode=fuse_mode, strict=strict, names=names)
        )
        input_scales = [checkpoint.input_scale(n) for n in names]
        if any(s is None for s in input_scales):
            if scheme == "w4a4":
                missing = names[[s is None for s in input_scales].index(True)]
                raise ValueError(
                    f"scheme 'w4a4' needs the checkpoint's activation scale of {missing}, which has none "
                    f"(a weight-only checkpoint); use scheme='w4a16'"
                )
            input_scale = None
        else:
            input_scale = jnp.max(jnp.stack([jnp.float32(s) for s in input_scales]))
        biases = [checkpoint.bias(n) for n in names]
        bias = None
        if any(b is not None for b in biases):
            dtype = next(b for b in biases if b is not None).dtype
            bias = jnp.concatenate(
                [
                    b.astype(dtype) if b is not None else jnp.zeros((w.shape[0],), dtype)
                    for b, w in zip(biases, weights)
                ]
            )
        return cls(weight, bias, input_scale, scheme, tuple(w.shape[0] for w in weights), backend)

    @property
    def alpha(self) -> jax.Array:
        """The W4A4 GEMM epilogue scale ``input_scale · tensor_scale`` (vLLM's ``alpha``)."""
        if self.input_scale is None:
            raise ValueError("alpha needs an input_scale (this layer is weight-only)")
        return jnp.float32(self.input_scale) * jnp.float32(self.weight.tensor_scale)

    @property
    def activation_global_scale(self) -> jax.Array:
        """The quantize-direction activation scale ``1 / input_scale`` (vLLM's
        ``input_global_scale_inv``, what ``scaled_fp4_quant`` takes)."""
        if self.input_scale is None:
            raise ValueError(
                "activation_global_scale needs an input_scale (this layer is weight-only)"
            )
        return div_rn(jnp.float32(1.0), jnp.float32(self.input_scale))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., K]`` (bf16 or fp16) -> ``[..., N]`` in ``x.dtype``."""
        if self.scheme == "w4a16":
            return linear(x, self.weight, self.bias, backend=self.backend)
        if self.scheme != "w4a4":
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        return self._emulated_w4a4(x)

    def _emulated_w4a4(self, x: jax.Array) -> jax.Array:
        """vLLM's ``run_nvfp4_emulations`` + the caller's bias add."""
        if self.input_scale is None:
            raise ValueError("scheme 'w4a4' needs input_scale (the checkpoint's activation scale)")
        x = _checks.as_array(x, "x")
        if x.dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"NVFP4Linear(w4a4): x must be bfloat16 or float16, got {x.dtype}")
        k = self.weight.shape[-1]
        if x.ndim == 0 or x.shape[-1] != k:
            raise ValueError(
                f"NVFP4Linear(w4a4): x must have shape [..., {k}] to match the weight "
                f"{self.weight.shape}, got {x.shape}"
            )
        x_dq = quant_dequant(x, global_scale=self.activation_global_scale, backend=self.backend)
        w_dq = dequantize(self.weight, x.dtype, backend=self.backend)  # [N, K]
        out = lax.dot_general(
            x_dq, w_dq, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        ).astype(x.dtype)
        if self.bias is not None:
            out = out + self.bias.astype(x.dtype)
        return out
