"""``torch.nn`` wrappers that run nvfp4-jax: :class:`NVFP4Linear` and :func:`quantize_model_`.

W4A16: the weight is NVFP4 (frozen buffers), activations stay bf16/fp16 and get gradients
(``grad_x = grad_y @ W`` through ``nvfp4_jax.linear``'s VJP), so adapters or earlier layers
train through a quantized layer as in QLoRA. On Hopper GPUs the
product is the Pallas GEMM kernel launched directly from torch (:mod:`interop.torch_kernel`),
except for prefill-sized inputs (``nvfp4_jax.matmul.DEQUANTIZE_DOT_MIN_M`` rows or more), which
take the JAX path below for ``nvfp4_jax.linear``'s dequantize route. Elsewhere (CPU tensors,
other GPUs, ``$NVFP4_JAX_TORCH_LAUNCH=0``) it is ``nvfp4_jax.linear`` called through one
cached ``jax.jit`` and the zero-copy bridge of :mod:`interop.dlpack`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import operator
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import torch
from torch import nn

import nvfp4_jax
from interop.dlpack import _export, _to_jax_fast, to_jax, to_torch
from interop.torch_kernel import TorchGemm
from nvfp4_jax import NVFP4Array, backends
from nvfp4_jax.backends import Backend
from nvfp4_jax.matmul import DEQUANTIZE_DOT_MIN_M

__all__ = ["NVFP4Linear", "QuantizeReport", "quantize_model_"]

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
_DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FORMAT_BUFFERS = ("weight", "weight_scale", "weight_scale_2", "input_scale")


@functools.cache
def _linear_fn(backend: str | None) -> Callable:
    """The one jitted ``x2d [M, K] -> [M, N]`` product shared by every layer (XLA caches
    one executable per input shape/dtype)."""

    def fn(x2d, data, scales, tensor_scale, bias):
        w = NVFP4Array(data, scales, tensor_scale, axis=-1, dtype=x2d.dtype)
        return nvfp4_jax.linear(x2d, w, bias, backend=backend)

    return jax.jit(fn)


@functools.cache
def _input_grad_fn(backend: str | None) -> Callable:
    """The jitted input gradient of :func:`_linear_fn`: ``grad_y [M, N] -> grad_x [M, K]``,
    the vector-Jacobian product ``nvfp4_jax.linear`` defines (``grad_y @ (e2m1 · scale) ·
    tensor_scale``, float32 accumulation). Its forward product is dead code that XLA drops."""

    def fn(grad_y, data, scales, tensor_scale):
        w = NVFP4Array(data, scales, tensor_scale, axis=-1, dtype=grad_y.dtype)
        x = jnp.zeros((grad_y.shape[0], 2 * data.shape[1]), grad_y.dtype)
        _, vjp = jax.vjp(lambda x: nvfp4_jax.linear(x, w, backend=backend), x)
        return vjp(grad_y)[0]

    return jax.jit(fn)


class _InputGrad(torch.autograd.Function):
    """Attaches the input gradient to an ``NVFP4Linear`` product: forward runs the layer's
    product of ``x2d`` (no graph), backward maps ``grad_y`` to ``grad_x`` through
    :func:`_input_grad_fn` on the weight the forward used. The weight and bias are buffers
    (frozen): they get no gradient."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, layer: NVFP4Linear, state: tuple) -> torch.Tensor:
        sources, device, _, args, _ = state
        ctx.device, ctx.weight = device, args[:3]  # JAX views of the buffers
        ctx.backend = _backend_for(layer.backend, device)
        # Saved for torch's version check: an in-place write to a buffer before backward
        # (e.g. load_state_dict) raises there instead of giving the new weight's gradient.
        ctx.save_for_backward(*sources[:3])
        return layer._product_2d(x2d.detach(), state)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        ctx.saved_tensors  # noqa: B018 (raises if a buffer was modified in place)
        grad_x = _input_grad_fn(ctx.backend)(_to_jax_fast(grad_y), *ctx.weight)
        return _export(grad_x, ctx.device), None, None


@functools.cache
def _quantize_fn(backend: str | None) -> Callable:
    return jax.jit(lambda w: nvfp4_jax.quantize(w, backend=backend))


def _backend_for(backend: str | None, device: torch.device) -> str | None:
    """nvfp4_jax picks its backend from JAX's default device. Tensors on the CPU of a GPU
    machine get ``"xla"`` (Pallas on CPU arrays would be the slow Mosaic GPU interpreter)."""
    if backend is None and device.type == "cpu" and jax.default_backend() != "cpu":
        return "xla"
    return backend


def _launches_from_torch(backend: str | None) -> bool:
    """Whether CUDA layers launch the Pallas kernel directly from torch
    (``interop.torch_kernel``): when nvfp4_jax would pick the compiled Pallas GEMM and
    ``$NVFP4_JAX_TORCH_LAUNCH`` is not ``0``."""
    if os.environ.get("NVFP4_JAX_TORCH_LAUNCH", "1") == "0":
        return False
    try:
        chosen = backends.select("matmul", backend)
    except ValueError:
        return False
    return chosen is Backend.PALLAS and not backends.interpret_pallas()


def _check_backend(backend: Any) -> str | None:
    if backend is None:
        return None
    try:
        return Backend(str(backend).lower()).value
    except ValueError:
        raise ValueError(
            f"backend must be None or one of {[b.value for b in Backend]}, got {backend!r}"
        ) from None


def _scalar(value: Any, name: str, device: torch.device) -> torch.Tensor:
    """A checkpoint scalar (``[]`` or ``[1]``, or equal values of fused partitions) as a
    float32 0-d tensor on ``device``; must be finite and > 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = torch.tensor(float(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a float, got {type(value).__name__}")
    if not value.is_floating_point() or value.dtype not in _DENSE_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {value.dtype}")
    flat = value.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    if flat.numel() == 0 or not bool(torch.all(flat == flat[0])):
        raise ValueError(
            f"{name} must hold one value (shape [] or [1]), got shape {tuple(value.shape)} "
            f"with values {flat[:8].tolist()}; fused partitions with different scales need "
            "their block scales rescaled to a shared one first"
        )
    v = flat[0]
    if not (bool(torch.isfinite(v)) and float(v) > 0):
        raise ValueError(f"{name} must be finite and > 0, got {float(v)}")
    return v.clone().to(device)


class NVFP4Linear(nn.Module):
    """``y = x @ W.T + bias`` with an NVFP4 weight ``W [out_features, in_features]``.

    Buffers (the ModelOpt/Quark checkpoint names and layouts, so ``state_dict()`` and
    ``load_state_dict`` speak the checkpoint format):

    * ``weight``: ``uint8 [out, in/2]``, two E2M1 codes per byte, element ``2i`` of a row in
      the low nibble;
    * ``weight_scale``: ``float8_e4m3fn [out, in/16]``, one scale per 16 consecutive inputs,
      plain row-major (not swizzled);
    * ``weight_scale_2``: ``float32 []``, the tensor-scale *multiplier*:
      ``W = e2m1 · weight_scale · weight_scale_2``. Loading accepts ``[1]`` too (Quark);
    * ``input_scale`` (only if the layer was built with one): ``float32 []``, the static
      activation scale of W4A4 checkpoints, kept for round trips; unused (activations are not
      quantized);
    * ``bias``: ``[out]`` in its own float dtype, or absent.

    ``in_features`` must be a multiple of 16. The buffers never change dtype: ``.half()`` /
    ``.to(torch.bfloat16)`` only move them between devices (and convert ``bias``).

    ``forward(x)``: ``x [..., in]`` bf16/fp16 on the buffers' device -> ``[..., out]`` in
    ``x.dtype`` on the same device (float32 accumulation). Leading dims are flattened, so
    one compiled kernel (CUDA) or XLA executable serves every shape with the same number of
    rows. On a Hopper GPU the layer also keeps the kernel's prepared layout of the weight
    (built on the first call, for bf16 and fp16 alike: the packed codes re-interleaved plus
    the block scales transposed, one byte each, about the size of the checkpoint buffers).
    The buffers are
    handed to JAX once (zero-copy) and reconverted only after ``load_state_dict``, ``.to()``
    or a buffer reassignment; in-place writes to a buffer (other than through
    ``load_state_dict``) need :meth:`refresh`.

    Autograd: an ``x`` that requires grad (grad mode on) gets ``grad_x = grad_y @ W`` in
    ``x.dtype`` (float32 accumulation; the Pallas dequantize kernel and XLA's dot on GPUs) from
    the weight the forward used. The buffers are not parameters and get no gradient; double
    backward is not supported.

    Build it with :meth:`from_linear`, :meth:`from_checkpoint_tensors`,
    :meth:`from_nvfp4_array`, or ``NVFP4Linear(in, out)`` followed by ``load_state_dict``.

    Args:
      in_features, out_features: the logical weight is ``[out_features, in_features]``.
      bias: whether the layer has a ``bias`` buffer (zeros until loaded).
      input_scale: whether the layer has an ``input_scale`` buffer (for W4A4 checkpoints).
      bias_dtype: dtype of the ``bias`` buffer.
      device: where the (zero-initialized) buffers live: ``cpu`` or ``cuda``.
      backend: ``None`` (nvfp4-jax's choice: Pallas on sm_90+ GPUs, XLA otherwise; buffers
        on the CPU of a GPU machine use XLA), ``"xla"`` or ``"pallas"``. Resolved when a
        shape is first compiled.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        input_scale: bool = False,
        bias_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if in_features % 16:
            raise ValueError(
                f"in_features must be a multiple of 16 (the NVFP4 block), got {in_features}"
            )
        if bias_dtype not in _DENSE_DTYPES:
            raise TypeError(f"bias_dtype must be float32, bfloat16 or float16, got {bias_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.backend = _check_backend(backend)
        kw = {"device": device}
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw)
        )
        self.register_buffer(
            "weight_scale",
            torch.zeros(out_features, in_features // 16, dtype=torch.float8_e4m3fn, **kw),
        )
        self.register_buffer("weight_scale_2", torch.ones((), dtype=torch.float32, **kw))
        if input_scale:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, **kw))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=bias_dtype, **kw) if bias else None
        )
        # (source buffers, device, jitted fn, JAX args, [TorchGemm] (empty until built) or None)
        self._jax: tuple | None = None

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_checkpoint_tensors(
        cls,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_scale_2: torch.Tensor | float,
        *,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | float | None = None,
        backend: str | None = None,
    ) -> NVFP4Linear:
        """A layer from the tensors of a ModelOpt / Quark NVFP4 checkpoint.

        Args:
          weight: ``uint8 [out, in/2]`` packed E2M1 codes (low nibble = even input).
          weight_scale: ``float8_e4m3fn [out, in/16]`` plain block scales, same device.
          weight_scale_2: the tensor-scale multiplier (ModelOpt ``amax/(6·448)``): shape
            ``[]`` or ``[1]`` (or several equal values), float32/bf16/fp16, > 0.
            compressed-tensors' ``weight_global_scale`` is its inverse: pass ``1 / gs``.
          bias: optional ``[out]`` float tensor.
          input_scale: optional static activation scale (ModelOpt ``input_scale``, Quark
            ``input_scale_2``; dequant direction): kept, unused by the W4A16 product.
          backend: see the class docstring.

        ``weight`` and ``weight_scale`` are used as they are (no copy when contiguous); the
        scalars and ``bias`` are moved to ``weight``'s device.
        """
        for name, t in (("weight", weight), ("weight_scale", weight_scale)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if weight.dtype != torch.uint8:
            raise TypeError(
                f"weight must be uint8 packed FP4 codes [out, in/2], got {weight.dtype} "
                "(quantize a dense weight with NVFP4Linear.from_linear)"
            )
        if weight.dim() != 2 or weight.shape[1] == 0:
            raise ValueError(f"weight must be 2-D [out, in/2], got shape {tuple(weight.shape)}")
        if weight_scale.dtype != torch.float8_e4m3fn:
            hint = ""
            if weight_scale.dtype == torch.uint8:
                hint = " (raw bytes: pass weight_scale.view(torch.float8_e4m3fn))"
            raise TypeError(f"weight_scale must be float8_e4m3fn, got {weight_scale.dtype}{hint}")
        out_features, in_features = weight.shape[0], 2 * weight.shape[1]
        if in_features % 16:
            raise ValueError(
                f"weight [out, in/2] = {tuple(weight.shape)} gives in_features={in_features}, "
                "which is not a multiple of 16"
            )
        if tuple(weight_scale.shape) != (out_features, in_features // 16):
            raise ValueError(
                f"weight_scale must have shape {(out_features, in_features // 16)} "
                f"([out, in/16] for weight {tuple(weight.shape)}), got {tuple(weight_scale.shape)}"
            )
        device = weight.device
        if weight_scale.device != device:
            raise ValueError(f"weight_scale is on {weight_scale.device}, weight on {device}")
        if bias is not None:
            if isinstance(bias, jax.Array):
                bias = to_torch(bias)
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
            if bias.dtype not in _DENSE_DTYPES:
                raise TypeError(f"bias must be float32, bfloat16 or float16, got {bias.dtype}")
            if tuple(bias.shape) != (out_features,):
                raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        layer = cls(
            in_features,
            out_features,
            bias is not None,
            input_scale=input_scale is not None,
            bias_dtype=bias.dtype if bias is not None else torch.bfloat16,
            device="meta",
            backend=backend,
        )
        layer.weight = weight.detach().contiguous()
        layer.weight_scale = weight_scale.detach().contiguous()
        layer.weight_scale_2 = _scalar(weight_scale_2, "weight_scale_2", device)
        if input_scale is not None:
            layer.input_scale = _scalar(input_scale, "input_scale", device)
        if bias is not None:
            layer.bias = bias.detach().to(device).contiguous()
        return layer

    @classmethod
    def from_nvfp4_array(
        cls,
        a: NVFP4Array,
        bias: torch.Tensor | jax.Array | None = None,
        *,
        input_scale: torch.Tensor | float | None = None,
        backend: str | None = None,
    ) -> NVFP4Linear:
        """A layer sharing the memory of an ``NVFP4Array`` (zero-copy, on its device).

        ``a`` is a 2-D weight quantized along the input dim with a scalar tensor scale: logical
        ``[out, in]`` (``nvfp4_jax.quantize(w)``) or logical ``[in, out]``
        (``nvfp4_jax.quantize(w, axis=0)``, a ``matmul`` weight); both are stored
        ``[out, in/2]``, so the layer computes ``x @ W.T`` resp. ``x @ W``.
        """
        if not isinstance(a, NVFP4Array):
            raise TypeError(f"a must be an nvfp4_jax.NVFP4Array, got {type(a).__name__}")
        if a.data.ndim != 2:
            raise ValueError(f"a must be a 2-D weight, got logical shape {a.shape}")
        if jnp.ndim(a.tensor_scale) != 0:
            raise ValueError(
                f"a.tensor_scale must be a scalar, got shape {jnp.shape(a.tensor_scale)}"
            )
        return cls.from_checkpoint_tensors(
            to_torch(a.data),
            to_torch(a.scales),
            to_torch(jnp.asarray(a.tensor_scale, jnp.float32)),
            bias=bias,
            input_scale=input_scale,
            backend=backend,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend: str | None = None) -> NVFP4Linear:
        """Quantize ``linear.weight`` (bf16/fp16/fp32, on CPU or CUDA) with
        ``nvfp4_jax.quantize`` (blocks along ``in_features``, tensor scale ``amax/(6·448)``),
        on the weight's device. The bias is copied in its dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.dtype not in _DENSE_DTYPES:
            raise TypeError(f"linear.weight must be float32, bfloat16 or float16, got {w.dtype}")
        if linear.in_features % 16:
            raise ValueError(
                f"linear.in_features must be a multiple of 16, got {linear.in_features}"
            )
        quantize = _quantize_fn(_backend_for(None, w.device))
        a = quantize(to_jax(w, copy=None))  # a copy only for a strided/misaligned weight
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_nvfp4_array(a, bias, backend=backend)

    # -- JAX view of the buffers ----------------------------------------------------------
    def _sources(self) -> tuple:
        b = self._buffers
        return b["weight"], b["weight_scale"], b["weight_scale_2"], b["bias"]

    def _jax_state(self) -> tuple:
        """(sources, device, jitted fn, JAX args), rebuilt when a buffer object changed."""
        state, sources = self._jax, self._sources()
        if state is not None and all(map(operator.is_, state[0], sources)):
            return state
        weight, scales, ts, bias = (None if t is None else t.detach() for t in sources)
        if weight.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"NVFP4Linear buffers are on {weight.device}; move the layer to cpu or cuda"
            )
        # copy=None: e.g. tensors of a mmapped checkpoint may be misaligned; then one copy.
        a = NVFP4Array(
            to_jax(weight, copy=None),
            to_jax(scales, copy=None),
            to_jax(ts.reshape(()), copy=None),
            axis=-1,
        )  # validates shapes, scale > 0
        jbias = None if bias is None else to_jax(bias, copy=None)
        backend = _backend_for(self.backend, weight.device)
        torch_gemm = None  # holds the TorchGemm of the direct kernel launch, built lazily
        if weight.device.type == "cuda" and _launches_from_torch(backend):
            torch_gemm = []
        self._jax = (
            sources,
            weight.device,
            _linear_fn(backend),
            (a.data, a.scales, a.tensor_scale, jbias),
            torch_gemm,
        )
        return self._jax

    def refresh(self) -> None:
        """Forget the JAX view of the buffers (call after writing to a buffer in place)."""
        self._jax = None

    def nvfp4_weight(self) -> NVFP4Array:
        """The weight as an ``NVFP4Array`` of logical shape ``[out, in]``, sharing memory
        with the buffers."""
        data, scales, ts, _ = self._jax_state()[3]
        return NVFP4Array(data, scales, ts, axis=-1)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``e2m1 · weight_scale · weight_scale_2`` as a dense ``[out, in]`` tensor."""
        if dtype not in _DENSE_DTYPES:
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        jdtype = {
            torch.float32: jnp.float32,
            torch.bfloat16: jnp.bfloat16,
            torch.float16: jnp.float16,
        }[dtype]
        backend = _backend_for(None, self._buffers["weight"].device)
        return to_torch(nvfp4_jax.dequantize(self.nvfp4_weight(), jdtype, backend=backend))

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` (bf16/fp16) -> ``[..., out]`` in ``x.dtype``. A non-contiguous ``x``
        is copied once (as ``F.linear`` would); on CUDA the product runs after the work
        queued on torch's current stream, which sees the result (see ``interop.dlpack``)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"x must be bfloat16 or float16, got {x.dtype}")
        if x.is_nested or x.layout != torch.strided:
            raise TypeError(
                f"x must be a dense tensor, got layout {x.layout} (nested={x.is_nested})"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        state = self._jax_state()
        device = state[1]
        if x.device != device:
            raise ValueError(f"x is on {x.device}, but the layer's buffers are on {device}")
        lead = x.shape[:-1]
        track = x.requires_grad and torch.is_grad_enabled()
        if x.numel() == 0:  # (through F.linear only to give x its empty gradient)
            empty = x.new_zeros(self.out_features, self.in_features)
            return (
                torch.nn.functional.linear(x, empty)
                if track
                else x.new_empty(*lead, empty.shape[0])
            )
        x2d = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if track:
            y = _InputGrad.apply(x2d, self, state)
        else:
            y = self._product_2d(x2d.detach(), state)
        return y if x.dim() == 2 else y.view(*lead, self.out_features)

    def _product_2d(self, x2d: torch.Tensor, state: tuple) -> torch.Tensor:
        """``x2d [M, in]`` (validated, no grad) -> ``[M, out]`` with ``state =
        self._jax_state()``."""
        _, device, fn, args, torch_gemm = state
        if torch_gemm is not None and x2d.shape[0] < DEQUANTIZE_DOT_MIN_M:
            # The Pallas kernel launched from torch, no JAX dispatch. Prefill-sized inputs
            # take the JAX path below: its dequantize route beats the fused kernel there
            # (nvfp4_jax.matmul.pallas_plan), and the dispatch cost is small next to them.
            if not torch_gemm:  # one prepared layout serves bf16 and fp16 activations
                bias = self._buffers["bias"]
                torch_gemm.append(TorchGemm(*args[:3], None if bias is None else bias.detach()))
            return torch_gemm[0](x2d if x2d.is_contiguous() else x2d.contiguous())
        return _export(fn(_to_jax_fast(x2d), *args), device)

    # -- torch.nn.Module plumbing -----------------------------------------------------------
    def __getstate__(self):  # pickling / deepcopy: the JAX view is rebuilt on demand
        state = self.__dict__.copy()
        state["_jax"] = None
        return state

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) / .type() convert every floating buffer -- float8 included.
        # The NVFP4 storage dtypes are part of the format: keep them, follow only the device.
        fixed = {k: self._buffers[k] for k in _FORMAT_BUFFERS if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for k, old in fixed.items():
            new = self._buffers[k]
            if new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        self._jax = None
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # torch's loader would cast (copy_) a float weight into the uint8 buffer: refuse.
        want = {
            "weight": (torch.uint8,),
            "weight_scale": (torch.float8_e4m3fn,),
            "weight_scale_2": _DENSE_DTYPES,
            "input_scale": _DENSE_DTYPES,
            "bias": _DENSE_DTYPES,
        }
        errors = []
        for name, dtypes in want.items():
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.dtype not in dtypes:
                hint = ""
                if name == "weight" and t.is_floating_point():
                    hint = (
                        " -- this looks like an unquantized nn.Linear state dict; quantize it "
                        "with NVFP4Linear.from_linear or interop.quantize_model_"
                    )
                elif name == "weight_scale" and t.dtype == torch.uint8:
                    hint = " -- raw bytes: store them as .view(torch.float8_e4m3fn)"
                errors.append(
                    f"{prefix}{name} must have dtype "
                    f"{' or '.join(str(d) for d in dtypes)}, got {t.dtype}{hint}"
                )
        if errors:
            error_msgs.extend(errors)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name in ("weight_scale_2", "input_scale"):
            t = self._buffers.get(name)
            if t is not None and not (bool(torch.isfinite(t)) and float(t) > 0):
                error_msgs.append(f"{prefix}{name} must be finite and > 0, got {float(t)}")
        self._jax = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, backend={self.backend or 'auto'}"
        )


# -- quantize_model_ ------------------------------------------------------------------------
@dataclasses.dataclass
class QuantizeReport:
    """What :func:`quantize_model_` did: qualified names of the replaced ``nn.Linear``
    layers, of the skipped ones with the reason, and notes on other changes it made."""

    quantized: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"quantized {len(self.quantized)} Linear layer(s) to NVFP4, skipped {len(self.skipped)}"
        ]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _TextProgress:
    """Fallback progress bar (tqdm absent): a line to stderr about every 10%."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self._last = total, desc, 0, -1

    def update(self, n: int = 1) -> None:
        self.n += n
        step = 10 * self.n // max(self.total, 1)
        if step != self._last:
            self._last = step
            print(f"{self.desc}: {self.n}/{self.total} layers", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, show: bool):
    if not show:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextProgress(total, "quantize_model_")
    return tqdm(total=total, desc="quantize_model_", unit="layer", file=sys.stderr)


def _skip_predicate(skip: Any) -> Callable[[str, nn.Module], bool]:
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"skip must be a callable(name, module) -> bool or glob pattern(s), got {skip!r}"
        )
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _skip_reason(name: str, parent: nn.Module, linear: nn.Linear, skip: Callable) -> str | None:
    if skip(name, linear):
        return "matched skip"
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads out_proj.weight directly instead of calling it"
    if linear.in_features % 16:
        return f"in_features={linear.in_features} is not a multiple of 16"
    if linear.weight.dtype not in _DENSE_DTYPES:
        return f"weight dtype {linear.weight.dtype} is not float32/bfloat16/float16"
    if linear.weight.device.type not in ("cpu", "cuda"):
        return f"weight is on {linear.weight.device}, not cpu/cuda"
    return None


def _disable_fused_paths(model: nn.Module, report: QuantizeReport) -> None:
    """torch's fused TransformerEncoder(Layer) inference paths read ``linear1.weight`` /
    ``linear2.weight`` directly (and feed nested tensors): route them through ``forward``."""
    for name, m in model.named_modules():
        quantized_ffn = isinstance(m, nn.TransformerEncoderLayer) and (
            isinstance(m.linear1, NVFP4Linear) or isinstance(m.linear2, NVFP4Linear)
        )
        if quantized_ffn and m.activation_relu_or_gelu:
            m.activation_relu_or_gelu = 0  # only selects the fused kernel; forward uses .activation
            report.notes.append(
                f"{name or 'model'}: fused TransformerEncoderLayer fast path disabled"
            )
        if (
            isinstance(m, nn.TransformerEncoder)
            and getattr(m, "use_nested_tensor", False)
            and any(isinstance(s, NVFP4Linear) for s in m.modules())
        ):
            m.use_nested_tensor = False
            report.notes.append(
                f"{name or 'model'}: TransformerEncoder nested-tensor path disabled"
            )


def quantize_model_(
    model: nn.Module,
    *,
    skip: str | Iterable[str] | Callable[[str, nn.Module], bool] = (),
    backend: str | None = None,
    progress: bool | None = None,
) -> QuantizeReport:
    """Replace the ``nn.Linear`` layers of ``model`` by :class:`NVFP4Linear`, in place.

    Each weight is quantized on its own device, one layer at a time (the dense weight is
    freed as soon as its layer is replaced). Skipped, with the reason in the report: layers
    matching ``skip``, layers whose ``in_features`` is not a multiple of 16, the
    ``out_proj`` of ``nn.MultiheadAttention`` (which reads ``out_proj.weight`` directly),
    non-float weights and weights off cpu/cuda. A Linear shared by several parents becomes one
    shared ``NVFP4Linear``. Hooks registered on a replaced Linear are not carried over.
    ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` holding quantized layers get
    their fused fast paths turned off (they bypass ``forward``); see ``report.notes``.

    Args:
      model: any ``nn.Module`` other than a bare ``nn.Linear``
        (use ``NVFP4Linear.from_linear`` for that).
      skip: glob pattern(s) on qualified names (``fnmatch``, e.g. ``"lm_head"``,
        ``"*.gate"``), or ``callable(name, linear) -> bool``.
      backend: passed to every :class:`NVFP4Linear`.
      progress: show a progress bar (tqdm if installed, else lines on stderr); ``None``
        shows it for models with at least 16 layers to quantize.

    Returns:
      A :class:`QuantizeReport`; print it for a summary.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError(
            "model is itself an nn.Linear and cannot be replaced in place; "
            "use NVFP4Linear.from_linear(model)"
        )
    backend = _check_backend(backend)
    skip_fn = _skip_predicate(skip)
    report = QuantizeReport()
    todo = []  # (parent, attribute, qualified name, linear)
    for parent_name, parent in model.named_modules():
        for attr, child in list(parent._modules.items()):  # every attribute, shared ones too
            if isinstance(child, nn.Linear):
                name = f"{parent_name}.{attr}" if parent_name else attr
                reason = _skip_reason(name, parent, child, skip_fn)
                if reason is None:
                    todo.append((parent, attr, name, child))
                else:
                    report.skipped[name] = reason
    bar = _progress_bar(len(todo), len(todo) >= 16 if progress is None else bool(progress))
    done: dict[int, NVFP4Linear] = {}
    try:
        for parent, attr, name, linear in todo:
            if id(linear) not in done:
                done[id(linear)] = NVFP4Linear.from_linear(linear, backend=backend)
            setattr(parent, attr, done[id(linear)])
            report.quantized.append(name)
            bar.update(1)
    finally:
        bar.close()
    _disable_fused_paths(model, report)
    return report
