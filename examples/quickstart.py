"""Quantize a weight to NVFP4, inspect it, and use it in a matmul.

Run: bash .ci/python.sh examples/quickstart.py
"""

import time

import jax
import jax.numpy as jnp

import nvfp4_jax as nv


def main() -> None:
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    kx, kw = jax.random.split(jax.random.key(0))
    k, n, m = 4096, 1024, 8
    w = jax.random.normal(kw, (k, n), jnp.bfloat16) * 0.02  # a [K, N] weight
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)

    wq = nv.quantize(w, axis=0)  # blocks of 16 along K; stored [N, K/2] like a torch Linear
    print(wq)
    w_dq = nv.dequantize(wq, jnp.float32)
    err = jnp.linalg.norm(w_dq - w.astype(jnp.float32)) / jnp.linalg.norm(w.astype(jnp.float32))
    print(f"weight relative error: {float(err):.4f}  (NVFP4 on Gaussian data: ~0.09-0.10)")
    print(
        f"memory: {w.nbytes / 2**20:.2f} MiB bf16 -> {wq.nbytes / 2**20:.2f} MiB NVFP4 "
        f"({w.nbytes / wq.nbytes:.2f}x smaller)"
    )

    matmul = jax.jit(lambda x, wq: x @ nv.dequantize(wq, x.dtype))
    y = matmul(x, wq).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        y = matmul(x, wq)
    y.block_until_ready()
    ref = x.astype(jnp.float32) @ w.astype(jnp.float32)
    out_err = jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
    print(
        f"x @ W: output relative error vs bf16 weights {float(out_err):.4f}, "
        f"{(time.perf_counter() - t0) / 10 * 1e3:.2f} ms per call (dequantize + dot)"
    )

    fake = nv.quant_dequant(
        w, axis=0
    )  # fake quantization, bit-identical to dequantize(quantize(w))
    assert bool(jnp.all(fake == nv.dequantize(wq, w.dtype)))
    print("quant_dequant == dequantize(quantize(w)): ok")


if __name__ == "__main__":
    main()
