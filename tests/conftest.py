import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=False,
)
settings.load_profile("ci")


def _has_hopper_gpu() -> bool:
    try:
        from nvfp4_jax.backends import device_info

        return device_info().is_hopper_or_newer
    except Exception:  # noqa: BLE001 (any failure to query a GPU means: no GPU tests)
        return False


def pytest_collection_modifyitems(config, items):
    if _has_hopper_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with compute capability >= 9.0")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """Fresh random inputs every run (seed printed on failure; NVFP4_TEST_SEED=<seed> replays it)."""
    seed = int(os.environ.get("NVFP4_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
