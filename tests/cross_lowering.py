"""Lower kernels for an abstract H100 (sm_90) on a CPU host: the whole Pallas -> Mosaic GPU
lowering (layouts, dtypes, SMEM budget) runs, ptxas does not."""

import jax
from jax.sharding import AbstractDevice, AbstractMesh

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")


def h100_mesh() -> AbstractMesh:
    return AbstractMesh((1,), ("x",), abstract_device=H100)


def cross_lower(fn, *args) -> str:
    """StableHLO text of ``jit(fn)`` lowered for CUDA under the abstract H100 mesh."""
    with jax.sharding.use_abstract_mesh(h100_mesh()):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
