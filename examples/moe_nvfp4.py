"""A mixture-of-experts block on NVFP4 expert weights: accuracy, memory and (on a GPU) speed.

Builds a random MoE layer (8 experts, top-2, SiLU-gated MLPs, hidden 1024 / intermediate 2816
by default), quantizes every expert's ``w13`` ([E, H, 2I], gate and up fused) and ``w2``
([E, I, H]) to NVFP4 with one tensor scale per expert, and compares ``nvfp4_jax.moe.moe`` with
the same block on the unquantized bf16 weights (a dense per-expert reference). On a GPU it
also times the grouped products against bf16 ``jax.lax.ragged_dot``.

Run:  PYTHONPATH=. python examples/moe_nvfp4.py [--tokens 64 --experts 8 --top-k 2]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import nvfp4_jax as nv


def dense_moe(x, logits, w13, w2, top_k):
    """The MoE block on dense float32 weights: every expert on every token, masked."""
    weights, experts = nv.moe.route(logits, top_k)
    gate = jnp.zeros(logits.shape, jnp.float32).at[jnp.arange(x.shape[0])[:, None], experts]
    gate = gate.set(weights)
    h = jnp.einsum("th,ehn->etn", x.astype(jnp.float32), w13)
    inter = h.shape[-1] // 2
    y = jnp.einsum("eti,eih->eth", jax.nn.silu(h[..., :inter]) * h[..., inter:], w2)
    return jnp.einsum("te,eth->th", gate, y)


def wall_ms(fn, *args, iters=20):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    args = p.parse_args()
    e, h, inter, t = args.experts, args.hidden, args.intermediate, args.tokens
    keys = jax.random.split(jax.random.key(0), 4)
    w13 = jax.random.normal(keys[0], (e, h, 2 * inter), jnp.float32) / np.sqrt(h)
    w2 = jax.random.normal(keys[1], (e, inter, h), jnp.float32) / np.sqrt(inter)
    x = jax.random.normal(keys[2], (t, h), jnp.bfloat16)
    logits = jax.random.normal(keys[3], (t, e), jnp.float32)

    quantize_experts = jax.vmap(lambda w: nv.quantize(w.astype(jnp.bfloat16), axis=0))
    q13, q2 = nv.prepare(quantize_experts(w13)), nv.prepare(quantize_experts(w2))
    print(f"devices: {jax.devices()}; {e} experts, top-{args.top_k}, H={h}, I={inter}, T={t}")
    print(f"w13 {q13}")

    moe = jax.jit(lambda x, lg, a, b: nv.moe.moe(x, lg, a, b, top_k=args.top_k))
    y = moe(x, logits, q13, q2)
    y_q_ref = nv.moe.moe_reference(x, logits, q13, q2, top_k=args.top_k)
    y_dense = dense_moe(x, logits, w13, w2, args.top_k)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    print(
        f"rel. error vs the dense reference on the same NVFP4 weights: "
        f"{rel(y.astype(jnp.float32), y_q_ref.astype(jnp.float32)):.2e}"
    )
    print(
        f"rel. error vs the unquantized bf16/f32 block (quantization error): "
        f"{rel(y.astype(jnp.float32), y_dense):.3f}"
    )
    dense_mib = (w13.size + w2.size) * 2 / 2**20
    fp4_mib = (q13.nbytes + q2.nbytes) / 2**20
    print(f"expert weights: {dense_mib:.1f} MiB bf16 -> {fp4_mib:.1f} MiB NVFP4")

    if jax.default_backend() == "gpu":
        _, experts = nv.moe.route(logits, args.top_k)
        order = jnp.argsort(experts.reshape(-1), stable=True)
        gs = jnp.bincount(experts.reshape(-1), length=e).astype(jnp.int32)
        xs = x[order // args.top_k]
        w13_bf16 = w13.astype(jnp.bfloat16)
        t_bf16 = wall_ms(jax.jit(jax.lax.ragged_dot), xs, w13_bf16, gs)
        t_fp4 = wall_ms(jax.jit(nv.grouped_matmul), xs, q13, gs)
        print(
            f"w13 grouped product, wall time per call: bf16 ragged_dot {t_bf16:.3f} ms, "
            f"NVFP4 grouped_matmul {t_fp4:.3f} ms ({t_bf16 / t_fp4:.2f}x); kernel-only "
            f"tables: benchmarks/bench_moe.py"
        )


if __name__ == "__main__":
    main()
