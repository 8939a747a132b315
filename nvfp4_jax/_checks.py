"""Input validation shared by every public function: one place, clear messages.

Caller mistakes raise ``TypeError`` (wrong dtype or type) or ``ValueError`` (wrong shape or
value) naming the argument, what it got and what is allowed. Checks on values run only when
the value is concrete (not a tracer inside ``jit``/``vmap``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZABLE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
OUTPUT_DTYPES = QUANTIZABLE_DTYPES


def _dtype_names(dtypes) -> str:
    return ", ".join(jnp.dtype(d).name for d in dtypes)


def as_array(x: Any, name: str) -> jax.Array:
    if isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "__jax_array__"):
        return jnp.asarray(x)
    if isinstance(x, (int, float, list, tuple)) and not isinstance(x, bool):
        return jnp.asarray(x)
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")


def float_array(x: Any, name: str) -> jax.Array:
    x = as_array(x, name)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def quantizable(x: Any, name: str) -> jax.Array:
    x = as_array(x, name)
    if x.dtype not in QUANTIZABLE_DTYPES:
        raise TypeError(f"{name} must be one of {_dtype_names(QUANTIZABLE_DTYPES)}, got {x.dtype}")
    return x


def code_array(x: Any, name: str) -> jax.Array:
    """uint8 E2M1 codes; concrete values must be < 16."""
    x = dtype_is(x, name, jnp.uint8)
    if is_concrete(x) and x.size and int(np.max(np.asarray(x))) > 15:
        raise ValueError(
            f"{name} must hold 4-bit codes (0..15), got a value {int(np.max(np.asarray(x)))}"
        )
    return x


def dtype_is(x: Any, name: str, dtype) -> jax.Array:
    x = as_array(x, name)
    if x.dtype != jnp.dtype(dtype):
        raise TypeError(f"{name} must have dtype {jnp.dtype(dtype).name}, got {x.dtype}")
    return x


def output_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype:
    try:
        d = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(
            f"{name} must be one of {_dtype_names(OUTPUT_DTYPES)}, got {dtype!r}"
        ) from e
    if d not in OUTPUT_DTYPES:
        raise TypeError(f"{name} must be one of {_dtype_names(OUTPUT_DTYPES)}, got {d}")
    return d


def axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """Normalise ``axis`` to a negative index into an array of rank ``ndim``."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    if ndim == 0:
        raise ValueError("cannot quantize a 0-d array: it has no block axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of rank {ndim}")
    return int(axis) - ndim if axis >= 0 else int(axis)


def ints_at_least(*named: tuple[str, Any, int], context: str = "") -> None:
    """Raises ValueError unless every ``(name, value, least)`` holds an int (Python or NumPy,
    not a bool) ``value >= least``; ``context`` prefixes the message."""
    for name, value, least in named:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{context}{name} must be an int >= {least}, got {value!r}")


def block_multiple(length: int, name: str, what: str = "block axis") -> None:
    if length % 16:
        raise ValueError(
            f"{name}: the {what} must have a length that is a multiple of 16, got {length}"
        )


def is_concrete(x: Any) -> bool:
    try:
        np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False
    return True


def positive_finite_scale(x: Any, name: str, batch_shape: tuple[int, ...] | None) -> jax.Array:
    """A float32 scale that is a scalar or has a prefix of ``batch_shape`` (any shape when
    ``None``); concrete values must be finite and > 0."""
    x = as_array(x, name)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float scalar or array, got dtype {x.dtype}")
    x = x.astype(jnp.float32)
    allowed = [()] + [batch_shape[:j] for j in range(1, len(batch_shape or ()) + 1)]
    if batch_shape is not None and x.shape not in allowed:
        raise ValueError(
            f"{name} must be a scalar or have a leading-batch shape in {allowed[1:] or '[]'}, "
            f"got shape {x.shape}"
        )
    if is_concrete(x):
        v = np.asarray(x)
        if not np.all(np.isfinite(v)) or not np.all(v > 0):
            raise ValueError(
                f"{name} must be finite and > 0, got {v if v.size < 8 else v.ravel()[:8]}"
            )
    return x
