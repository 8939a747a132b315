"""A mixture-of-experts block on NVFP4 expert weights (vLLM's ``fused_moe`` semantics).

``moe(x, router_logits, w13, w2, top_k=...)``: softmax routing with top-k (optionally
renormalized), tokens sorted by expert, ``grouped_matmul`` with ``w13`` (gate and up
projections fused: logical ``[E, H, 2I]``, stored ``[E, 2I, H/2]`` like vLLM's ``w13``),
``silu(gate) * up``, ``grouped_matmul`` with ``w2`` (logical ``[E, I, H]``, stored
``[E, H, I/2]``), and a routing-weighted sum back into token order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from nvfp4_jax import _checks, sharding
from nvfp4_jax.array import NVFP4Array
from nvfp4_jax.grouped import grouped_matmul


def route(router_logits: jax.Array, top_k: int, *, renormalize: bool = True):
    """Softmax over experts, then the ``top_k`` largest (vLLM's ``fused_topk``).

    Args:
      router_logits: ``[T, E]`` float.
      top_k: experts per token, ``1 <= top_k <= E``.
      renormalize: divide the chosen weights by their sum.

    Returns:
      ``(weights float32 [T, top_k], experts int32 [T, top_k])``.
    """
    logits = _checks.float_array(router_logits, "router_logits")
    if logits.ndim != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {logits.shape}")
    if not isinstance(top_k, int) or not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k must be an int in [1, {logits.shape[1]}] (E), got {top_k!r}")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def _check_experts(x, w13, w2):
    """Validates the operands; returns the number of experts in ``w13``/``w2``."""
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, NVFP4Array) or w.data.ndim != 3 or w.axis != -2:
            shape = w.shape if isinstance(w, NVFP4Array) else type(w).__name__
            raise ValueError(
                f"{name} must be an NVFP4Array of logical shape [E, K, N] quantized along K, "
                f"got {shape}"
            )
    num_experts, two_i, hidden = w13.shape[0], w13.shape[2], w13.shape[1]
    if two_i % 2 or w2.shape != (num_experts, two_i // 2, hidden):
        raise ValueError(f"w13 [E, H, 2I] = {w13.shape} and w2 [E, I, H] = {w2.shape} do not match")
    if x.ndim != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must be [T, {hidden}] (H of w13), got shape {x.shape}")
    return num_experts


def _axis_size(name: str) -> int:
    try:
        return lax.axis_size(name)
    except NameError:
        raise ValueError(
            f"moe: expert_axis={name!r} is not a mesh axis bound here; call moe inside "
            "jax.shard_map over a mesh with that axis (its experts split with "
            "nvfp4_jax.sharding.shard_specs(w, mesh, e=...))"
        ) from None


def moe(
    x: jax.Array,
    router_logits: jax.Array,
    w13: NVFP4Array,
    w2: NVFP4Array,
    *,
    top_k: int,
    renormalize: bool = True,
    backend: str | None = None,
    expert_axis: str | None = None,
) -> jax.Array:
    """One MoE block: ``sum_k weight_k · (silu(x W1_e) * (x W3_e)) W2_e`` per token.

    Args:
      x: ``[T, H]`` bf16 or fp16.
      router_logits: ``[T, E]`` float.
      w13: NVFP4 ``[E, H, 2I]`` (gate columns ``[:I]``, up columns ``[I:]``).
      w2: NVFP4 ``[E, I, H]``.
      top_k, renormalize: routing (see :func:`route`).
      backend: for both ``grouped_matmul`` calls.
      expert_axis: expert parallelism inside ``jax.shard_map``: the mesh axis the experts are
        split over. ``w13``/``w2`` then hold this device's ``E / size`` consecutive experts
        (``sharding.shard_specs(w, mesh, e=expert_axis)``) and ``router_logits`` all ``E``;
        every device routes all tokens, multiplies only those routed to its experts, and the
        float32 sums are added over ``expert_axis`` (one ``psum``) before the rounding.

    Tokens sharded along their rows over an explicit mesh run per device (``jax.shard_map``;
    each token's routing and products are its own), the expert weights replicated.

    Returns:
      ``[T, H]`` in ``x.dtype``. As in vLLM, both products are rounded to ``x.dtype``
      (float32 accumulation), ``silu(gate) * up`` and the weighted sum run in float32.
    """
    x = _checks.as_array(x, "x")
    local = _check_experts(x, w13, w2)
    parts = 1 if expert_axis is None else _axis_size(expert_axis)
    logits = _checks.as_array(router_logits, "router_logits")
    if logits.shape != (x.shape[0], local * parts):
        where = "" if expert_axis is None else f" ({local} experts on each of {parts} devices)"
        raise ValueError(
            f"router_logits must be [T, E] = [{x.shape[0]}, {local * parts}]{where}, got "
            f"{logits.shape}"
        )
    sharded = sharding.row_parallel_mesh("moe", x, {"w13": w13, "w2": w2})
    if sharded is not None:  # tokens are independent: each device runs its own rows
        mesh, spec = sharded
        logits = jax.sharding.reshard(logits, spec)
        block = functools.partial(
            _block, top_k=top_k, renormalize=renormalize, backend=backend, expert_axis=None
        )
        return jax.shard_map(block, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=spec)(
            x, logits, w13, w2
        )
    return _block(x, logits, w13, w2, top_k, renormalize, backend, expert_axis)


def _block(x, logits, w13, w2, top_k, renormalize, backend, expert_axis):
    """:func:`moe` on validated operands."""
    local = w13.shape[0]
    weights, experts = route(logits, top_k, renormalize=renormalize)
    flat = experts.reshape(-1)
    if expert_axis is not None:  # this device's experts; the other routes sort last, unused
        flat = flat - lax.axis_index(expert_axis) * local
        flat = jnp.where((flat >= 0) & (flat < local), flat, local)
    order = jnp.argsort(flat, stable=True)
    token = order // top_k
    group_sizes = jnp.bincount(flat, length=local + 1)[:local].astype(jnp.int32)
    h = grouped_matmul(x[token], w13, group_sizes, backend=backend).astype(jnp.float32)
    inter = h.shape[1] // 2
    act = (jax.nn.silu(h[:, :inter]) * h[:, inter:]).astype(x.dtype)
    y = grouped_matmul(act, w2, group_sizes, backend=backend).astype(jnp.float32)
    y = y * weights.reshape(-1)[order][:, None]
    out = jnp.zeros((x.shape[0], y.shape[1]), jnp.float32).at[token].add(y)
    if expert_axis is not None:
        out = lax.psum(out, expert_axis)
    return out.astype(x.dtype)


def moe_reference(
    x: jax.Array,
    router_logits: jax.Array,
    w13: NVFP4Array,
    w2: NVFP4Array,
    *,
    top_k: int,
    renormalize: bool = True,
) -> jax.Array:
    """Dense float32 reference of :func:`moe`: every expert on every token, masked by the
    routing weights (dequantized weights, no sorting, no grouped product)."""
    num_experts = _check_experts(x, w13, w2)
    weights, experts = route(router_logits, top_k, renormalize=renormalize)
    dense = jnp.zeros((x.shape[0], num_experts), jnp.float32)
    dense = dense.at[jnp.arange(x.shape[0])[:, None], experts].set(weights)
    w13d = w13.dequantize(jnp.float32)
    w2d = w2.dequantize(jnp.float32)
    hp = lax.Precision.HIGHEST
    rounded = lambda v: v.astype(x.dtype).astype(jnp.float32)
    h = rounded(jnp.einsum("th,ehn->etn", x.astype(jnp.float32), w13d, precision=hp))
    inter = h.shape[-1] // 2
    act = rounded(jax.nn.silu(h[..., :inter]) * h[..., inter:])
    y = rounded(jnp.einsum("eti,eih->eth", act, w2d, precision=hp))
    return jnp.einsum("te,eth->th", dense, y, precision=hp).astype(x.dtype)
