"""Print the facts the kernels depend on: device, ptxas ISA, HBM bandwidth, bf16 GEMM rate.

Run: PYTHONPATH=. python benchmarks/env_probe.py
"""

import jax
import jax.numpy as jnp

from benchmarks import common
from nvfp4_jax.backends import device_info


def main() -> None:
    print(common.device_line())
    print(device_info())
    try:
        from jax._src.lib import mosaic_gpu_dialect  # noqa: F401
        from jax.experimental.mosaic.gpu import core as mgpu_core

        print("ptxas ISA:", mgpu_core.mgpu_lib._mosaic_gpu_ext._get_ptxas_isa_version())
    except Exception as e:  # noqa: BLE001 - informational only
        print("ptxas ISA: unknown", type(e).__name__, e)
    bw = common.hbm_copy_bandwidth()
    print(f"HBM copy bandwidth: {bw:.0f} GB/s (read + write)")
    n = 8192
    a = [jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in range(2)]
    us = common.time_per_call(lambda x, y: x @ y, [(a[0], a[1]), (a[1], a[0])], iterations=10)
    print(f"bf16 {n}^3 matmul: {us:.0f} us = {2 * n**3 / us / 1e6:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
