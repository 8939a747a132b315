"""``grouped_matmul``: tokens sorted by expert times per-expert NVFP4 weights (MoE).

``grouped_matmul(x, w, group_sizes)`` follows ``jax.lax.ragged_dot``: ``x [T, K]`` holds the
tokens sorted by expert, ``group_sizes [E]`` says how many rows each expert takes (in order,
summing to at most ``T``), and ``w`` is an ``NVFP4Array`` of logical shape ``[E, K, N]``
quantized along K (stored ``[E, N, K/2]``, the layout of vLLM's ``w13``/``w2`` expert
weights), with one tensor scale per expert or a shared scalar. Row ``t`` of group ``e`` gets
``x[t] @ dequantize(w[e])``; rows past ``sum(group_sizes)`` are zero. Group sizes are data:
changing the routing does not recompile.

Backends: ``"pallas"`` runs the dense GEMM kernel of ``kernels/gemm.py`` over
expert-aligned token tiles (each CTA looks up its tile's expert; unused tiles exit at once,
so empty experts cost nothing); ``"xla"`` dequantizes every expert (exact) and calls
``jax.lax.ragged_dot``.

Scale format: the kernel widens each expert's block scales (compact bytes, or scales
pre-widened by ``prepare``) to the activation dtype, exactly, and applies each expert's
tensor scale in its float32 epilogue, so unlike
Marlin's S0E5M3 scales (see ``scales.marlin_process_scales``) it needs no scale factor shared
across experts: the prepared stack equals per-expert dequantization exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from nvfp4_jax import _checks, backends, reference, sharding
from nvfp4_jax.array import NVFP4Array
from nvfp4_jax.backends import Backend
from nvfp4_jax.kernels import gemm
from nvfp4_jax.matmul import ACTIVATION_DTYPES, _dense_codes, _linear_in_activations, prepare


def _expert_scales(w: NVFP4Array) -> jax.Array:
    """The tensor scale of each expert, float32 ``[E]``."""
    return jnp.broadcast_to(jnp.asarray(w.tensor_scale, jnp.float32), w.data.shape[:1])


def _xla_grouped_matmul(x, w: NVFP4Array, group_sizes, out_dtype, config=None) -> jax.Array:
    """XLA path: exact per-expert dequantization to ``x.dtype``, ``ragged_dot`` in f32."""
    del config
    wt = reference.dequantize(w.data, w.scales, jnp.float32(1.0), x.dtype)  # [E, N, K]
    return _dense_grouped(x, wt, _expert_scales(w), group_sizes, out_dtype)


def _dense_grouped(x, wt, expert_scales, group_sizes, out_dtype) -> jax.Array:
    """``ragged_dot(x, wtᵀ) · expert_scales[expert of row]`` for dense ``wt [E, N, K]``, f32
    accumulation, one rounding to ``out_dtype``."""
    acc = lax.ragged_dot(x, jnp.swapaxes(wt, 1, 2), group_sizes, preferred_element_type=jnp.float32)
    row_scale = expert_scales[gemm.group_of(jnp.cumsum(group_sizes), x.shape[0])]
    return (acc * row_scale[:, None]).astype(out_dtype)


def _pallas_grouped_matmul(x, w: NVFP4Array, group_sizes, out_dtype, config=None) -> jax.Array:
    """Pallas path: the GEMM kernel over expert-aligned token tiles (prepares ``w`` here
    when it carries no layout)."""
    if jnp.dtype(out_dtype) not in ACTIVATION_DTYPES:
        raise NotImplementedError(
            f"the Pallas GEMM writes bfloat16/float16, not {jnp.dtype(out_dtype)}"
        )
    num_experts, n, k = w.data.shape[0], w.data.shape[1], 2 * w.data.shape[2]
    if w.prepared is None:  # any prepared layout serves both activation dtypes
        w = prepare(w)
    interpret = backends.interpret_pallas()
    if config is None:
        config = gemm.default_grouped_config(
            x.shape[0],
            num_experts,
            n,
            k,
            dtype=x.dtype,
            k_group=w.prepared.k_group,
            scale_itemsize=w.prepared.scales.dtype.itemsize,
        )
        if interpret:  # the interpreter runs only the SMEM-operand variant
            config = dataclasses.replace(config, a_operand="smem")
    return gemm.nvfp4_grouped_matmul(
        x,
        w.prepared,
        group_sizes,
        n=n,
        k=k,
        out_dtype=out_dtype,
        config=config,
        interpret=interpret,
    )


backends.register("grouped_matmul", Backend.XLA)(_xla_grouped_matmul)
backends.register("grouped_matmul", Backend.PALLAS)(_pallas_grouped_matmul)


def _validate(x: Any, w: Any, group_sizes: Any, out_dtype: Any):
    if not isinstance(w, NVFP4Array):
        raise TypeError(
            "grouped_matmul: w must be an NVFP4Array of logical shape [E, K, N] "
            f"(jax.vmap(lambda we: nvfp4_jax.quantize(we, axis=0))(w)), got {type(w).__name__}"
        )
    x = _checks.as_array(x, "x")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"grouped_matmul: x must be bfloat16 or float16, got {x.dtype}")
    if w.data.ndim != 3 or w.axis != -2:
        raise ValueError(
            "grouped_matmul: w must have logical shape [E, K, N] quantized along K (stored "
            f"[E, N, K/2]); got logical shape {w.shape} blocked on axis {w.axis + w.ndim}"
        )
    num_experts, n, k = w.data.shape[0], w.data.shape[1], 2 * w.data.shape[2]
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(
            f"grouped_matmul: x must have shape [T, {k}] to match w {w.shape}, got {x.shape}"
        )
    if jnp.shape(w.tensor_scale) not in ((), (num_experts,)):
        raise ValueError(
            f"grouped_matmul: w.tensor_scale must be a scalar or [{num_experts}], got shape "
            f"{jnp.shape(w.tensor_scale)}"
        )
    group_sizes = _checks.as_array(group_sizes, "group_sizes")
    if group_sizes.shape != (num_experts,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"grouped_matmul: group_sizes must be an integer array of shape ({num_experts},) "
            f"(one per expert), got {group_sizes.dtype} {group_sizes.shape}"
        )
    if _checks.is_concrete(group_sizes):
        sizes = jax.device_get(group_sizes)
        if (sizes < 0).any() or sizes.sum() > x.shape[0]:
            raise ValueError(
                "grouped_matmul: group_sizes must be >= 0 and sum to at most the "
                f"{x.shape[0]} rows of x, got {sizes.tolist()}"
            )
    out_dtype = x.dtype if out_dtype is None else _checks.output_dtype(out_dtype, "out_dtype")
    return x, group_sizes.astype(jnp.int32), n, out_dtype


def grouped_matmul(
    x: jax.Array,
    w: NVFP4Array,
    group_sizes: jax.Array,
    *,
    out_dtype: Any = None,
    backend: str | None = None,
    config: Any = None,
) -> jax.Array:
    """Per-expert products of tokens sorted by expert (``jax.lax.ragged_dot`` semantics).

    Args:
      x: ``[T, K]`` bf16 or fp16, rows sorted by expert.
      w: ``NVFP4Array`` of logical shape ``[E, K, N]`` quantized along K (stored
        ``[E, N, K/2]``), tensor scale scalar or ``[E]``; ``nvfp4_jax.prepare(w)`` attaches
        the kernel layout once.
      group_sizes: integer ``[E]``: rows of ``x`` per expert, in order, summing to at most
        ``T``. Dynamic under ``jit``.
      out_dtype: bf16, fp16 or fp32; default ``x.dtype``.
      backend: ``"pallas"`` or ``"xla"`` (see :mod:`nvfp4_jax.backends`).
      config: a ``kernels.gemm.GemmConfig`` overriding the kernel's tiling.

    Returns:
      ``[T, N]`` in ``out_dtype`` (float32 accumulation); rows past ``sum(group_sizes)``
      are zero. Under ``vmap`` (over ``x``, ``group_sizes`` or ``w``) the products run one
      after another.

    Differentiable in ``x`` (the weights and group sizes are constants), as
    :func:`nvfp4_jax.matmul`: row ``t`` of expert ``e`` gets ``g[t] @ dequantize(w[e])ᵀ``.
    """
    x, group_sizes, n, out_dtype = _validate(x, w, group_sizes, out_dtype)
    sharding.refuse(
        "grouped_matmul",
        {"x": x, "w": w, "group_sizes": group_sizes},
        "its group sizes index the rows of the whole x",
    )
    if x.shape[0] == 0:
        return jnp.zeros((0, n), out_dtype)
    return _differentiable(x, w, group_sizes, out_dtype, backend, config)


def _grouped_tangent(x_dot, w, group_sizes, *, out_dtype, backend):
    """``ragged_dot(x_dot, (e2m1 · scale)ᵀ) · tensor_scale[expert]``; transposed, row ``t``
    of expert ``e`` gets ``g[t] @ (e2m1 · scale)_e · tensor_scale_e``."""
    wt = _dense_codes(w, x_dot.dtype, backend)  # [E, N, K]
    return _dense_grouped(x_dot, wt, _expert_scales(w), group_sizes, out_dtype)


def _grouped(x, w, group_sizes, out_dtype, backend, config):
    """Dispatch one grouped product; under ``vmap`` the batch runs as a sequence of them
    (``ragged_dot`` has no batching rule beyond its leading dim, the kernel none at all)."""

    @jax.custom_batching.custom_vmap
    def run(x, w, group_sizes):
        return backends.call("grouped_matmul", backend, x, w, group_sizes, out_dtype, config)

    @run.def_vmap
    def run_vmap(axis_size, in_batched, x, w, group_sizes):
        args = jax.tree_util.tree_map(
            lambda v, b: v if b else jnp.broadcast_to(v, (axis_size,) + jnp.shape(v)),
            (x, w, group_sizes),
            tuple(in_batched),
        )
        out = lax.map(lambda a: _grouped(*a, out_dtype, backend, config), args)
        return out, True

    return run(x, w, group_sizes)


# Differentiable in x; the weights and group sizes are constants.
_differentiable = _linear_in_activations(_grouped, _grouped_tangent, bias_like=False)
