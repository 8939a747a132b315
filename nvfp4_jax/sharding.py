"""Sharding: weight layouts for tensor and expert parallelism, and what ``matmul`` does on
sharded inputs.

Tensor and expert parallelism run inside ``jax.shard_map``, each device multiplying by its
local weight shard: :func:`shard_specs` gives the ``PartitionSpec`` of every leaf of an
NVFP4 weight or expert stack (prepared layout included) split along its output features
(column parallel), its contraction dim (row parallel) or its experts (``moe(...,
expert_axis=...)``), and :func:`shard_weight` places a weight that way;
:func:`interleave_gate_up` orders a MoE ``w13`` so that each device's slice holds matching
gate and up rows. A shard of the prepared layout is the prepared layout of the shard, so a
weight is prepared once, before it is split.

Under an explicit mesh (``jax.make_mesh``'s default axis type) every array carries its
sharding in its type. The Pallas kernels (and ``ragged_dot``) have no sharding rules, so
``matmul``/``linear`` and ``moe`` with activations sharded along their leading (row) dims run
per device inside ``jax.shard_map`` on the local rows, the weights replicated
(:func:`row_parallel_mesh`). A weight or contraction dim sharded in its type raises, pointing
to ``shard_map``. Arrays under an ``Auto`` mesh (or none) carry no sharding in their type and
pass through untouched: XLA's partitioner handles them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from nvfp4_jax.array import NVFP4Array
from nvfp4_jax.formats import BLOCK_SIZE
from nvfp4_jax.kernels import gemm

Axes = str | tuple[str, ...] | None


def shard_specs(
    w: NVFP4Array, mesh: Any, *, n: Axes = None, k: Axes = None, e: Axes = None
) -> NVFP4Array:
    """``PartitionSpec`` of each leaf of ``w`` for a weight split over mesh axes.

    Args:
      w: a 2-D ``NVFP4Array`` quantized along K (logical ``[K, N]`` for ``matmul`` or
        ``[N, K]`` for ``linear``; stored ``[N, K/2]``) with a scalar tensor scale, or a stack
        of expert weights (logical ``[E, K, N]``, stored ``[E, N, K/2]``, for ``moe`` and
        ``grouped_matmul``; every expert is split alike), prepared or not.
      mesh: the ``jax.sharding.Mesh`` (or ``AbstractMesh``) whose axes are named.
      n: mesh axis name(s) splitting the output features N (column parallel: each device
        computes its ``N / size`` outputs). N must be a multiple of ``16 * size``.
      k: mesh axis name(s) splitting the contraction dim K (row parallel: each device
        computes a partial product of its K slice of ``x``, summed with ``lax.psum``). K must
        be a multiple of ``16 * size``, or of ``k_group * size`` for a prepared weight.
      e: mesh axis name(s) splitting the experts of a stack (expert parallelism: each device
        holds ``E / size`` consecutive experts; ``moe(..., expert_axis=e)``).

    Returns:
      A pytree with ``w``'s structure whose leaves are ``PartitionSpec``: ``in_specs`` for
      ``w`` in ``jax.shard_map`` (storage ``data``/``scales`` ``P(n, k)``, tensor scale
      ``P()``, prepared codes and scales ``P(k, n, None)``; for a stack, a
      leading ``e`` on each, the tensor scales ``P(e)`` where there is one per expert).
    """
    if not isinstance(w, NVFP4Array):
        raise TypeError(f"w must be an NVFP4Array, got {type(w).__name__}")
    plain = w.data.ndim == 2 and w.axis in (-1, -2) and jax.numpy.ndim(w.tensor_scale) == 0
    stacked = w.data.ndim == 3 and w.axis == -2
    if not (plain or stacked):
        raise ValueError(
            "shard_specs: w must be a 2-D weight quantized along K with a scalar tensor "
            "scale, or a stack of expert weights [E, K, N] quantized along K, got logical "
            f"shape {w.shape} blocked on axis {w.axis + w.ndim}"
        )
    if e is not None and not stacked:
        raise ValueError(f"shard_specs: e={e!r} splits experts, but w is a 2-D weight")
    names = dict(zip(mesh.axis_names, mesh.axis_sizes))
    rows, length = w.data.shape[-2], 2 * w.data.shape[-1]
    experts = w.data.shape[0] if stacked else 1
    k_unit = BLOCK_SIZE if w.prepared is None else w.prepared.k_group
    for arg, axes, dim, unit, what in (
        ("n", n, rows, BLOCK_SIZE, "N (output features)"),
        ("k", k, length, k_unit, "K (contraction dim)"),
        ("e", e, experts, 1, "E (experts)"),
    ):
        if axes is None:
            continue
        axis_names = (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [a for a in axis_names if a not in names]
        if unknown or not axis_names:
            raise ValueError(
                f"shard_specs: {arg}={axes!r} names no axis of the mesh (axes {tuple(names)})"
            )
        size = math.prod(names[a] for a in axis_names)
        if dim % (unit * size):
            raise ValueError(
                f"shard_specs: {what} = {dim} must be a multiple of {unit} x {size} (the "
                f"size of mesh axes {axis_names}) for {arg}={axes!r}"
            )
    lead = (e,) if stacked else ()  # the expert dim (every expert split alike along n, k)
    P = lambda *dims: PartitionSpec(*lead, *dims)
    per_expert_scale = stacked and jax.numpy.ndim(w.tensor_scale) == 1
    leaves = [P(n, k), P(n, k), P() if per_expert_scale else PartitionSpec()]
    if w.prepared is not None:  # a prepared stack has one tensor scale per expert
        leaves += [P(k, n, None), P(k, n, None), P() if stacked else PartitionSpec()]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(w), leaves)


def interleave_gate_up(w13: NVFP4Array, parts: int) -> NVFP4Array:
    """Reorder the output features of fused gate/up expert weights for ``parts``-way tensor
    parallelism of ``moe``.

    ``moe`` splits each expert's ``2I`` outputs into gate (first ``I``) and up (last ``I``).
    Split contiguously over ``parts`` devices, device ``p`` must hold gate and up rows ``[p
    I/parts, (p+1) I/parts)``, gate first: this puts them there, so that :func:`shard_specs`
    with ``n=...`` gives every device a ``w13`` shard that ``moe`` reads as its own
    ``[E, H, 2I/parts]`` gate/up weight (pair it with ``w2`` split along ``k``, and add the
    devices' outputs with ``lax.psum``). Codes and scales are permuted, not changed; a
    prepared layout is permuted alike.

    Args:
      w13: a stack of expert weights of logical shape ``[E, H, 2I]`` quantized along ``H``
        (``checkpoint.stack_experts``), prepared or not.
      parts: the number of devices the outputs will be split over; ``I`` must be a multiple
        of ``8 * parts`` (16 outputs per device-local gate/up pair).
    """
    if not isinstance(w13, NVFP4Array):
        raise TypeError(f"w13 must be an NVFP4Array, got {type(w13).__name__}")
    if w13.data.ndim != 3 or w13.axis != -2:
        raise ValueError(
            "interleave_gate_up: w13 must be a stack of expert weights [E, H, 2I] quantized "
            f"along H, got logical shape {w13.shape} blocked on axis {w13.axis + w13.ndim}"
        )
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"parts must be a positive int, got {parts!r}")
    outputs = w13.data.shape[1]
    if outputs % (16 * parts):
        raise ValueError(
            f"interleave_gate_up: 2I = {outputs} outputs must be a multiple of 16 x {parts} "
            "(a gate and an up slice of a multiple of 8 rows per device)"
        )
    inter, chunk = outputs // 2, outputs // (2 * parts)
    order = np.concatenate(
        [
            np.concatenate([np.arange(p * chunk, (p + 1) * chunk)] * 2)
            + np.repeat([0, inter], chunk)
            for p in range(parts)
        ]
    )
    out = NVFP4Array(
        w13.data[:, order], w13.scales[:, order], w13.tensor_scale, axis=-2, dtype=w13.dtype
    )
    if w13.prepared is not None:  # [E, K/kg, N, kg/4] codes, [E, K/kg, N/16, kg] scales
        prepared = w13.prepared
        rows = gemm.scale_rows(prepared.scales)[:, :, order]  # [E, K/kg, N, kg/16]
        out.prepared = prepared._replace(
            data=prepared.data[:, :, order], scales=gemm.scales_from_rows(rows)
        )
    return out


def shard_weight(
    w: NVFP4Array, mesh: Any, *, n: Axes = None, k: Axes = None, e: Axes = None
) -> NVFP4Array:
    """``w`` placed on ``mesh`` as :func:`shard_specs` describes (``jax.device_put``)."""
    specs = shard_specs(w, mesh, n=n, k=k, e=e)
    shardings = jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec)
    )
    return jax.device_put(w, shardings)


TENSOR_PARALLEL_HINT = (
    "for tensor parallelism, call it inside jax.shard_map on the local weight shards "
    "(nvfp4_jax.sharding.shard_specs gives their in_specs; README, section 'Sharding')"
)


def explicit_spec(a: Any) -> tuple[Any, PartitionSpec] | None:
    """``(mesh, spec)`` of an array sharded in its type over an explicit mesh axis (spec
    padded to the array's rank), or None for a replicated or unsharded-in-type array."""
    if a is None:
        return None
    sharding = getattr(jax.typeof(a), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names:
        return None
    if AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    spec = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
    if all(s is None for s in spec):
        return None
    return mesh, PartitionSpec(*spec)


def row_parallel_mesh(fn: str, x: jax.Array, constants: dict[str, Any]):
    """For ``fn(x [..., K], constants...)``: ``(mesh, spec of x)`` when ``x`` is sharded along
    leading dims only (data parallelism), None when nothing is sharded in its type.

    Raises ``ValueError`` for a sharded contraction dim of ``x`` or a sharded constant
    (weights, bias), naming the argument and its spec.
    """
    refuse(fn, constants, f"it runs data parallel over the rows of x; {TENSOR_PARALLEL_HINT}")
    found = explicit_spec(x)
    if found is None:
        return None
    mesh, spec = found
    if spec[-1] is not None:
        raise ValueError(
            f"{fn}: x is sharded along its last (contraction) dim ({spec}, shape {x.shape}); "
            f"shard only its leading (row) dims; {TENSOR_PARALLEL_HINT}"
        )
    return mesh, spec


def refuse(fn: str, arrays: dict[str, Any], why: str) -> None:
    """Raise ``ValueError`` if any leaf of ``arrays`` is sharded over an explicit mesh."""
    for name, tree in arrays.items():
        for leaf in jax.tree_util.tree_leaves(tree):
            found = explicit_spec(leaf)
            if found is not None:
                raise ValueError(
                    f"{fn}: {name} is sharded ({found[1]}, shape {leaf.shape}) over an explicit "
                    f"mesh, which {fn} does not take ({why}); replicate it, or call {fn} inside "
                    "jax.shard_map on per-device inputs"
                )
