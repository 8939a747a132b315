"""Race detection of the Mosaic GPU CPU interpreter: run a kernel with ``interpret=RACES``,
then ask :func:`races_found`. The interpreter tracks every SMEM/GMEM access of every simulated
thread (warpgroups, the TMA engine) with vector clocks and reports conflicting accesses that
no barrier orders."""

# jax 0.11 exposes the interpreter's race report only in its private module.
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as _interpret
from jax.experimental.pallas import mosaic_gpu as plgpu

RACES = plgpu.InterpretGPUParams(detect_races=True)


def races_found() -> bool:
    """Whether the last kernel run with ``interpret=RACES`` had a data race."""
    return bool(_interpret.get_races().races_found)
