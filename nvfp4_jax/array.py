"""``NVFP4Array``: the pytree that holds an NVFP4-quantized tensor."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nvfp4_jax import _checks
from nvfp4_jax.formats import BLOCK_SIZE


@jax.tree_util.register_pytree_node_class
class NVFP4Array:
    """An NVFP4 tensor: E2M1 codes, per-16 E4M3 block scales and a float32 tensor scale.

    Invariants (checked by the constructor):

    * ``data``: ``uint8 [*lead, L/2]`` -- two E2M1 codes per byte, element ``2i`` in the low
      nibble, bit 3 of a code is its sign. The **block axis is always last** in storage: a
      ``[K, N]`` matmul weight quantized along K is stored ``[N, K/2]``, the layout of a
      PyTorch ``Linear`` weight and of every NVFP4 checkpoint.
    * ``scales``: ``float8_e4m3fn [*lead, L/16]``, one per 16 consecutive elements of the
      block axis, plain row-major (not swizzled).
    * ``tensor_scale``: ``float32``, the *multiplier* (``x ≈ e2m1 · scale · tensor_scale``;
      the inverse of vLLM's ``global_scale``). A scalar, or one value per leading batch
      entry: shape ``lead[:j]`` for ``1 <= j <= len(lead) - 1`` (e.g. ``[E]`` for experts).
    * ``axis`` (static): the blocked axis of the *logical* array, as a negative index, so it
      stays right when ``vmap`` adds leading dims.
    * ``dtype`` (static): the dtype the array was quantized from (the default
      ``dequantize`` target).

    The logical shape is the storage shape ``(*lead, L)`` with ``L`` moved to ``axis``.
    ``jit``, ``vmap`` over leading dims and ``tree_map`` see ``data``, ``scales`` and
    ``tensor_scale`` as leaves, plus ``prepared`` when present: the GEMM kernel's layout
    of the same weight (``kernels.gemm.PreparedWeight``, built once by
    ``nvfp4_jax.prepare``), carried along so a jitted ``matmul`` never rebuilds it.
    """

    __slots__ = ("axis", "data", "dtype", "prepared", "scales", "tensor_scale")

    def __init__(
        self,
        data: Any,
        scales: Any,
        tensor_scale: Any = 1.0,
        *,
        axis: int = -1,
        dtype: Any = jnp.bfloat16,
        prepared: Any = None,
    ):
        data = _checks.dtype_is(data, "data", jnp.uint8)
        scales = _checks.as_array(scales, "scales")
        if scales.dtype != jnp.dtype(jnp.float8_e4m3fn):
            raise TypeError(f"scales must have dtype float8_e4m3fn, got {scales.dtype}")
        if data.ndim == 0:
            raise ValueError("data must have at least one dimension (the packed block axis)")
        length = 2 * data.shape[-1]
        _checks.block_multiple(length, "data", "unpacked block axis (2 * data.shape[-1])")
        expected = data.shape[:-1] + (length // BLOCK_SIZE,)
        if scales.shape != expected:
            raise ValueError(
                f"scales must have shape {expected} (one per 16 elements of data {data.shape}), "
                f"got {scales.shape}"
            )
        tensor_scale = _checks.positive_finite_scale(tensor_scale, "tensor_scale", data.shape[:-2])
        self.data = data
        self.scales = scales
        self.tensor_scale = tensor_scale
        self.axis = _checks.axis(axis, data.ndim)
        self.dtype = _checks.output_dtype(dtype, "dtype")
        self.prepared = prepared

    # -- pytree ---------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.data, self.scales, self.tensor_scale, self.prepared), (self.axis, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # Leaves may be tracers, ShapeDtypeStructs, None or sentinels here: never validate.
        obj = object.__new__(cls)
        obj.data, obj.scales, obj.tensor_scale, obj.prepared = children
        obj.axis, obj.dtype = aux
        return obj

    # -- logical view ---------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return BLOCK_SIZE

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (unquantized) shape."""
        storage = tuple(self.data.shape[:-1]) + (2 * self.data.shape[-1],)
        dims = list(storage[:-1])
        dims.insert(len(storage) + self.axis, storage[-1])
        return tuple(dims)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, block scales and tensor scale(s)."""
        return int(self.data.size + self.scales.size + 4 * np.prod(np.shape(self.tensor_scale)))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Shorthand for ``nvfp4_jax.dequantize(self, dtype)``."""
        from nvfp4_jax.api import dequantize

        return dequantize(self, self.dtype if dtype is None else dtype)

    def __repr__(self) -> str:
        def leaf(x):
            shape = ",".join(str(d) for d in np.shape(x))
            return f"{jnp.dtype(x.dtype).name}[{shape}]"

        ts = leaf(self.tensor_scale)
        if np.shape(self.tensor_scale) == () and _checks.is_concrete(self.tensor_scale):
            ts = f"{float(np.asarray(self.tensor_scale)):.6g}"
        return (
            f"NVFP4Array(shape={self.shape}, dtype={jnp.dtype(self.dtype).name}, "
            f"axis={self.axis + self.ndim}, data={leaf(self.data)}, "
            f"scales={leaf(self.scales)}, tensor_scale={ts}"
            + (
                f", prepared with {_scale_format(self.prepared.scales.dtype)} scales, k-group"
                f" {self.prepared.k_group}"
                if self.prepared is not None
                else ""
            )
            + ")"
        )


def _scale_format(dtype) -> str:
    dtype = jnp.dtype(dtype)
    return "compact" if dtype == jnp.uint8 else f"{dtype.name}-widened"
