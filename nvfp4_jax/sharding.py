"""Sharding: tensor-parallel weight layouts, and what ``matmul`` does on sharded inputs.

Tensor parallelism runs inside ``jax.shard_map``, each device multiplying by its local
weight shard: :func:`shard_specs` gives the ``PartitionSpec`` of every leaf of a 2-D
NVFP4 weight (prepared layout included) split along its output features (column parallel)
or its contraction dim (row parallel), and :func:`shard_weight` places a weight that way.
A shard of the prepared layout is the prepared layout of the shard, so a weight is prepared
once, before it is split.

Under an explicit mesh (``jax.make_mesh``'s default axis type) every array carries its
sharding in its type. The Pallas kernels (and ``ragged_dot``) have no sharding rules, so
``matmul``/``linear`` with activations sharded along their leading (row) dims run per device
inside ``jax.shard_map`` on the local rows, the weight replicated
(:func:`row_parallel_mesh`). A weight or contraction dim sharded in its type raises, pointing
to ``shard_map``. Arrays under an ``Auto`` mesh (or none) carry no sharding in their type and
pass through untouched: XLA's partitioner handles them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from nvfp4_jax.array import NVFP4Array
from nvfp4_jax.formats import BLOCK_SIZE

Axes = str | tuple[str, ...] | None


def shard_specs(w: NVFP4Array, mesh: Any, *, n: Axes = None, k: Axes = None) -> NVFP4Array:
    """``PartitionSpec`` of each leaf of ``w`` for a weight split over mesh axes.

    Args:
      w: a 2-D ``NVFP4Array`` quantized along K (logical ``[K, N]`` for ``matmul`` or
        ``[N, K]`` for ``linear``; stored ``[N, K/2]``), prepared or not, scalar tensor scale.
      mesh: the ``jax.sharding.Mesh`` (or ``AbstractMesh``) whose axes are named.
      n: mesh axis name(s) splitting the output features N (column parallel: each device
        computes its ``N / size`` outputs). N must be a multiple of ``16 * size``.
      k: mesh axis name(s) splitting the contraction dim K (row parallel: each device
        computes a partial product of its K slice of ``x``, summed with ``lax.psum``). K must
        be a multiple of ``16 * size``, or of ``k_group * size`` for a prepared weight.

    Returns:
      A pytree with ``w``'s structure whose leaves are ``PartitionSpec``: ``in_specs`` for
      ``w`` in ``jax.shard_map`` (storage ``data``/``scales`` ``P(n, k)``, tensor scale
      ``P()``, prepared codes ``P(k, n, None)`` and scales ``P(k, n)``).
    """
    if not isinstance(w, NVFP4Array):
        raise TypeError(f"w must be an NVFP4Array, got {type(w).__name__}")
    if w.data.ndim != 2 or w.axis not in (-1, -2) or jax.numpy.ndim(w.tensor_scale) != 0:
        raise ValueError(
            "shard_specs: w must be a 2-D weight quantized along K with a scalar tensor "
            f"scale, got logical shape {w.shape} blocked on axis {w.axis + w.ndim}"
        )
    names = dict(zip(mesh.axis_names, mesh.axis_sizes))
    rows, length = w.data.shape[0], 2 * w.data.shape[1]
    k_unit = BLOCK_SIZE if w.prepared is None else w.prepared.k_group
    for arg, axes, dim, unit, what in (
        ("n", n, rows, BLOCK_SIZE, "N (output features)"),
        ("k", k, length, k_unit, "K (contraction dim)"),
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
    P = PartitionSpec
    leaves = [P(n, k), P(n, k), P()]
    if w.prepared is not None:
        leaves += [P(k, n, None), P(k, n), P()]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(w), leaves)


def shard_weight(w: NVFP4Array, mesh: Any, *, n: Axes = None, k: Axes = None) -> NVFP4Array:
    """``w`` placed on ``mesh`` as :func:`shard_specs` describes (``jax.device_put``)."""
    specs = shard_specs(w, mesh, n=n, k=k)
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
