"""Zero-copy bridge between PyTorch tensors and JAX arrays over DLPack.

``to_jax(tensor)`` and ``to_torch(array)`` never copy silently: the result shares memory with
the input (``tensor.data_ptr() == array.unsafe_buffer_pointer()``) or, for ``to_jax``, a copy
happens only where the caller allowed it with ``copy=None``/``copy=True``.

Contract
--------
* **Devices**: CPU and CUDA. The JAX array lands on the JAX device with the tensor's CUDA
  ordinal (``cuda:1`` -> the JAX GPU with ``local_hardware_id == 1``), and back.
* **Dtypes** (both directions, same dtype on both sides): bfloat16, float16, float32, uint8,
  int8, int32, bool, float8_e4m3fn, float8_e5m2. Anything else raises ``TypeError`` (JAX would
  otherwise convert float64/int64 to 32 bits, i.e. copy). FP4 has no common DLPack encoding:
  packed E2M1 codes cross as ``uint8`` (``tensor.view(torch.uint8)``).
* **float8 fallback**: where a framework refuses a float8 dtype over DLPack (torch releases
  before float8 DLPack support), the bytes cross as ``uint8`` and the dtype code in the DLPack
  capsule is rewritten to the float8 one (or the other way round, followed by a free
  ``tensor.view(float8)``): still zero-copy, no bitcast kernel. Which route is used is probed
  once per dtype (see :func:`dtype_route`).
* **Layout**: only row-major contiguous tensors cross zero-copy. Strided views (transposes,
  step slices, expanded dims) and, on CPU, data not aligned to 64 bytes (XLA's CPU client
  requirement; e.g. ``t[1:]``) need a copy. ``to_jax(copy=False)`` (the default) raises
  ``ValueError`` for them; ``copy=None`` makes one explicit copy (``tensor.contiguous()`` /
  ``clone()``) and shares memory otherwise; ``copy=True`` always copies.
  0-d and empty tensors are supported.
* **Autograd**: ``to_jax`` refuses tensors with ``requires_grad=True`` (the autograd history
  would be dropped silently); pass ``tensor.detach()``.
* **Aliasing**: the two objects share memory. JAX assumes its arrays are immutable: writing to
  the torch side in place while the JAX array is alive is undefined behaviour for JAX, and on
  CUDA it is not ordered with JAX work that was set up before the write; convert again after
  such a write (``NVFP4Linear`` re-imports its buffers after ``load_state_dict``). Never
  donate (``donate_argnums``) a JAX array that torch still views. Each side keeps the other's
  memory alive for as long as it lives.

CUDA streams
------------
Both directions follow the DLPack stream protocol, so no explicit synchronization is needed:

* ``to_jax(t)``: JAX's *external-ready-events* stream of the device is made to wait (a CUDA
  event, no host sync) for the work queued so far on torch's **current** stream, and the
  array is imported as ready on that stream, so JAX computations that read it run after the
  torch work that produced it (exactly what ``jax.dlpack.from_dlpack`` and torch's
  ``__dlpack__(stream=...)`` do together, without their Python overhead).
* ``to_torch(a)``: torch passes its **current** stream for the array's device; JAX makes that
  stream wait until ``a`` is ready. Torch work queued afterwards on that stream sees the
  result; work on *another* torch stream needs the usual ``stream.wait_stream(...)``.
* Lifetime caveat: memory is returned to the allocator of the side that owns it when its last
  reference dies, ordered only by that side's streams. In the usual alternating pattern
  (``to_torch(f(to_jax(x)))`` and torch consumers on the current stream) every new JAX
  computation is ordered after the torch work queued before its ``to_jax`` input, so this is
  safe; if you free a ``to_torch`` result while a torch kernel reading it is still queued and
  then run unrelated JAX work that never takes a ``to_jax`` input, keep the tensor alive until
  that kernel is done.
* ``torch.Tensor.__dlpack__()`` called *without* a stream (torch's default ``stream=-1``) does
  no synchronization at all: always go through these functions (or ``jax.dlpack``/
  ``torch.from_dlpack``), never through raw capsules.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Any

import jax
import jax.numpy as jnp
import torch

__all__ = ["SUPPORTED_DTYPES", "dtype_route", "to_jax", "to_torch"]

# torch dtype -> JAX dtype, for every dtype the bridge carries.
SUPPORTED_DTYPES: dict[torch.dtype, jnp.dtype] = {
    torch.bfloat16: jnp.dtype(jnp.bfloat16),
    torch.float16: jnp.dtype(jnp.float16),
    torch.float32: jnp.dtype(jnp.float32),
    torch.uint8: jnp.dtype(jnp.uint8),
    torch.int8: jnp.dtype(jnp.int8),
    torch.int32: jnp.dtype(jnp.int32),
    torch.bool: jnp.dtype(jnp.bool_),
    torch.float8_e4m3fn: jnp.dtype(jnp.float8_e4m3fn),
    torch.float8_e5m2: jnp.dtype(jnp.float8_e5m2),
}
_TORCH_DTYPE = {v: k for k, v in SUPPORTED_DTYPES.items()}
_NAMES = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
_TORCH_DEVICES = ("cpu", "cuda")

# DLPack enums (dlpack.h).
_KDL_CPU, _KDL_CUDA = 1, 2
_KDL_UINT = 1
_KDL_FLOAT8 = {torch.float8_e4m3fn: 10, torch.float8_e5m2: 12}  # kDLFloat8_e4m3fn, _e5m2


# -- checks --------------------------------------------------------------------------------
def _check_tensor(tensor: Any, name: str = "tensor") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        hint = ""
        if tensor.dtype == getattr(torch, "float4_e2m1fn_x2", None):
            hint = " (pass packed FP4 codes as tensor.view(torch.uint8))"
        raise TypeError(f"{name} must have one of the dtypes {_NAMES}, got {tensor.dtype}{hint}")
    if tensor.device.type not in _TORCH_DEVICES:
        raise ValueError(
            f"{name} is on device {tensor.device}; the bridge supports cpu and cuda tensors"
        )
    if tensor.requires_grad:
        raise ValueError(
            f"{name} requires grad: converting it to JAX would drop its autograd history; "
            "pass tensor.detach()"
        )
    if tensor.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}")


def _check_array(array: Any, name: str = "array") -> jax.Device:
    if isinstance(array, jax.core.Tracer):
        raise TypeError(
            f"{name} is a JAX tracer: to_torch needs a concrete array, so call it outside "
            "jax.jit/vmap/grad"
        )
    if not isinstance(array, jax.Array):
        raise TypeError(f"{name} must be a jax.Array, got {type(array).__name__}")
    if array.dtype not in _TORCH_DTYPE:
        hint = ""
        if array.dtype in (jnp.dtype(jnp.float4_e2m1fn), jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):
            hint = " (pack 4-bit values two per uint8 byte, e.g. nvfp4_jax.pack_fp4)"
        raise TypeError(f"{name} must have one of the dtypes {_NAMES}, got {array.dtype}{hint}")
    if array.is_deleted():
        raise ValueError(f"{name} has been deleted (donated or .delete()d)")
    devices = array.devices()
    if len(devices) != 1:
        raise ValueError(
            f"{name} is sharded over {len(devices)} devices; to_torch takes a single-device "
            "array (use array.addressable_shards[i].data)"
        )
    (device,) = devices
    if device.platform not in ("cpu", "gpu", "cuda"):
        raise ValueError(f"{name} is on {device}; the bridge supports JAX CPU and CUDA devices")
    if device.platform != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"{name} is on {device} but this torch build has no CUDA support")
    return device


@functools.cache
def _jax_device(platform: str, hardware_id: int) -> jax.Device:
    """The JAX device for a DLPack (platform, id); cached (devices never change)."""
    try:
        devices = jax.local_devices(backend=platform)
    except RuntimeError as e:
        raise ValueError(
            f"the tensor is on a {platform} device but JAX has no {platform} backend "
            f"(JAX devices: {jax.devices()}); install JAX with CUDA support "
            "(pip install 'jax[cuda13]') or move the tensor to the CPU"
        ) from e
    for d in devices:
        if d.local_hardware_id == hardware_id:
            return d
    raise ValueError(f"JAX sees no {platform} device with hardware id {hardware_id}: {devices}")


def _cuda_guard(tensor: torch.Tensor):
    """torch's ``__dlpack__`` only exports tensors of the current CUDA device."""
    if tensor.is_cuda and tensor.get_device() != torch.cuda.current_device():
        return torch.cuda.device(tensor.get_device())
    return contextlib.nullcontext()


# -- float8 fallback: rewrite the dtype inside a DLPack capsule ---------------------------
class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensorVersioned(ctypes.Structure):  # DLPack >= 1.0, capsule "dltensor_versioned"
    _fields_ = [
        ("version_major", ctypes.c_uint32),
        ("version_minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype, _get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype, _get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


def _retype_capsule(capsule: Any, code: int, bits: int) -> None:
    """Overwrite the element type of an unconsumed DLPack capsule (same element width)."""
    name = _get_name(capsule)
    ptr = _get_pointer(capsule, name)
    if name == b"dltensor":  # DLManagedTensor starts with its DLTensor
        dl = _DLTensor.from_address(ptr)
    elif name == b"dltensor_versioned":
        dl = _DLManagedTensorVersioned.from_address(ptr).dl_tensor
    else:
        raise BufferError(f"not an unconsumed DLPack capsule: {name!r}")
    if dl.dtype.bits != bits or dl.dtype.lanes != 1:
        raise BufferError(
            f"cannot retype a {dl.dtype.bits}-bit x{dl.dtype.lanes} element to {bits} bits"
        )
    dl.dtype.code = code


class _Retyped:
    """A DLPack producer that forwards to ``base`` and rewrites the element type of the
    capsule it hands out (same width: float8 <-> uint8). Zero-copy; streams pass through."""

    def __init__(self, base: Any, code: int):
        self.base, self.code = base, code

    def __dlpack_device__(self):
        return self.base.__dlpack_device__()

    def __dlpack__(self, **kwargs):
        capsule = self.base.__dlpack__(**kwargs)
        _retype_capsule(capsule, self.code, 8)
        return capsule


@functools.cache
def dtype_route(dtype: torch.dtype, direction: str) -> str:
    """``"native"`` or ``"uint8"``: how ``dtype`` crosses in ``direction`` (``"to_jax"`` or
    ``"to_torch"``). Only float8 dtypes can need the ``uint8`` route; probed once on CPU."""
    if dtype not in _KDL_FLOAT8:
        return "native"
    try:
        if direction == "to_jax":
            jax.dlpack.from_dlpack(torch.zeros(4, dtype=dtype), copy=False)
        else:
            torch.from_dlpack(jnp.zeros(4, SUPPORTED_DTYPES[dtype]))
    except Exception:  # noqa: BLE001 (BufferError, RuntimeError, TypeError by version)
        return "uint8"
    return "native"


# -- import / export -----------------------------------------------------------------------
# jax.dlpack.from_dlpack costs ~20 us per call on CPU, mostly Python around this one call; we
# make the same call directly (falling back to the public function if it ever moves).
try:
    from jax._src.lib import _jax as _jaxlib

    _RAW_IMPORT = _jaxlib.dlpack_managed_tensor_to_buffer
except (ImportError, AttributeError):  # pragma: no cover - other jax versions
    _RAW_IMPORT = None
_HIP = torch.version.hip is not None


@functools.cache
def _external_stream(pointer: int, device_index: int) -> torch.cuda.ExternalStream:
    return torch.cuda.ExternalStream(pointer, device=torch.device("cuda", device_index))


def _capsule(tensor: torch.Tensor) -> Any:
    """A DLPack capsule of a contiguous tensor, float8 retyped from a uint8 view if needed.
    No stream handling here: the caller orders the consumer stream first."""
    if dtype_route(tensor.dtype, "to_jax") == "native":
        return torch.utils.dlpack.to_dlpack(tensor)
    capsule = torch.utils.dlpack.to_dlpack(tensor.view(torch.uint8))
    _retype_capsule(capsule, _KDL_FLOAT8[tensor.dtype], 8)
    return capsule


def _import(tensor: torch.Tensor, copy: bool | None) -> jax.Array:
    """Import a validated, contiguous tensor with the protocol of ``jax.dlpack.from_dlpack``
    (and of ``torch.Tensor.__dlpack__(stream=...)``, done here without its Python overhead):
    on CUDA, JAX's external-ready-events stream first waits (event, no host sync) for the
    work queued on torch's current stream, and JAX orders the new array after that stream.
    """
    try:
        if _RAW_IMPORT is None or _HIP:  # the public path, same protocol
            producer = tensor
            if dtype_route(tensor.dtype, "to_jax") != "native":
                producer = _Retyped(tensor.view(torch.uint8), _KDL_FLOAT8[tensor.dtype])
            with _cuda_guard(tensor):
                return jax.dlpack.from_dlpack(producer, copy=copy)
        if not tensor.is_cuda:
            return _RAW_IMPORT(_capsule(tensor), _jax_device("cpu", 0), None, copy, _KDL_CPU)
        index = tensor.get_device()
        device = _jax_device("cuda", index)
        stream = device.get_stream_for_external_ready_events()
        with _cuda_guard(tensor):
            _external_stream(stream, index).wait_stream(torch.cuda.current_stream(index))
        return _RAW_IMPORT(_capsule(tensor), device, stream, copy, _KDL_CUDA)
    except (RuntimeError, ValueError) as e:
        if copy is False and "align" in str(e):
            raise ValueError(
                f"tensor ({tensor.device}, data_ptr {tensor.data_ptr():#x}) cannot be shared "
                f"without a copy: {e}. Pass copy=None to allow one copy, or .clone() it"
            ) from None
        raise


def _export(array: jax.Array, device: torch.device) -> torch.Tensor:
    """A validated single-device array as a tensor on ``device`` (its device), with the
    protocol of ``torch.from_dlpack``: JAX makes torch's current stream wait for the array."""
    dtype = _TORCH_DTYPE[array.dtype]
    native = dtype_route(dtype, "to_torch") == "native"
    producer = array if native else _Retyped(array, _KDL_UINT)
    if device.type == "cuda":
        pointer = torch.cuda.current_stream(device).cuda_stream
        capsule = producer.__dlpack__(stream=1 if pointer == 0 else pointer)  # 1: legacy default
    else:
        capsule = producer.__dlpack__()
    tensor = torch.utils.dlpack.from_dlpack(capsule)
    return tensor if native else tensor.view(dtype)


# -- public API ----------------------------------------------------------------------------
def to_jax(tensor: torch.Tensor, *, copy: bool | None = False) -> jax.Array:
    """A ``torch.Tensor`` as a ``jax.Array`` on the same device, sharing its memory.

    Args:
      tensor: a CPU or CUDA tensor of a dtype in :data:`SUPPORTED_DTYPES`, any shape
        (0-d included), ``requires_grad=False``.
      copy: ``False`` (default): share memory or raise ``ValueError`` (non-contiguous tensor;
        on CPU, data not 64-byte aligned). ``None``: share memory when possible, otherwise
        make one contiguous copy first. ``True``: always copy (the result never aliases).

    Returns:
      A committed ``jax.Array`` with the tensor's shape and dtype. On CUDA, JAX work that
      reads it is ordered after the torch work queued so far on torch's current stream.
    """
    _check_tensor(tensor)
    if not (copy is None or isinstance(copy, bool)):
        raise TypeError(f"copy must be True, False or None, got {copy!r}")
    if copy is True:
        tensor = tensor.clone(memory_format=torch.contiguous_format)  # 64-byte aligned
    elif not tensor.is_contiguous():
        if copy is False:
            raise ValueError(
                f"tensor is not contiguous (shape {tuple(tensor.shape)}, strides "
                f"{tensor.stride()}): it cannot be shared with JAX without a copy. Pass "
                "copy=None to copy it (tensor.contiguous()), or make it contiguous yourself"
            )
        tensor = tensor.contiguous()
    # What is left to decide is alignment: JAX copies a misaligned buffer only if allowed.
    return _import(tensor, False if copy is False else None)


def to_torch(array: jax.Array) -> torch.Tensor:
    """A single-device ``jax.Array`` as a ``torch.Tensor`` on the same device, sharing its
    memory (always zero-copy: JAX arrays are dense and aligned).

    Args:
      array: a committed or uncommitted array on one CPU or CUDA device, of a dtype in
        :data:`SUPPORTED_DTYPES`; not a tracer.

    Returns:
      A tensor with the array's shape and dtype. On CUDA, torch's current stream (of the
      array's device) waits until the array is ready; no host synchronization.
    """
    device = _check_array(array)
    return _export(
        array,
        torch.device("cpu")
        if device.platform == "cpu"
        else torch.device("cuda", device.local_hardware_id),
    )


def _to_jax_fast(tensor: torch.Tensor) -> jax.Array:
    """``to_jax(tensor, copy=None)`` for a tensor the caller has already validated (dtype,
    device, no grad): the per-call path of ``NVFP4Linear.forward``."""
    return _import(tensor if tensor.is_contiguous() else tensor.contiguous(), None)
