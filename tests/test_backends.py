"""The dispatch point: selection order, errors, and a record of what ran."""

import jax
import jax.numpy as jnp
import pytest

import nvfp4_jax as nv
from nvfp4_jax import backends


def test_default_on_cpu_is_xla_and_recorded(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    if backends.device_info().platform == "gpu":
        pytest.skip("CPU-only expectation")
    with backends.record() as log:
        nv.quantize(jnp.ones((2, 16)))
    assert log == [backends.Dispatch("quantize", "xla", "")]


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "no-such-backend")
    with backends.record() as log:
        nv.dequantize(nv.quantize(jnp.ones((2, 16)), backend="xla"), backend="xla")
    assert [d.backend for d in log] == ["xla", "xla"]
    with pytest.raises(
        ValueError, match=r"unknown NVFP4 backend 'no-such-backend' \(from \$NVFP4_JAX_BACKEND\)"
    ):
        nv.quantize(jnp.ones((2, 16)))


def test_environment_selects(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "XLA")
    with backends.record() as log:
        nv.quant_dequant(jnp.ones((2, 16)))
    assert log[0].backend == "xla"


def test_unknown_backend_lists_available():
    with pytest.raises(
        ValueError, match=r"unknown NVFP4 backend 'cuda'.*available for 'quantize': \['xla'"
    ):
        nv.quantize(jnp.ones((2, 16)), backend="cuda")


def test_pallas_unavailable_on_old_gpu_is_an_error():
    old = backends.DeviceInfo("gpu", "NVIDIA A100", (8, 0), 108)
    reason = backends.unavailable_reason("matmul", backends.Backend.PALLAS, old)
    assert "compute capability >= 9.0" in reason


def test_device_info_honours_abstract_mesh():
    from cross_lowering import h100_mesh

    with jax.sharding.use_abstract_mesh(h100_mesh()):
        info = backends.device_info()
    assert info == backends.DeviceInfo("gpu", "NVIDIA H100 80GB HBM3", (9, 0), 132)
    assert info.is_hopper_or_newer
    assert backends.device_info().platform == jax.devices()[0].platform


def test_old_gpu_falls_back_to_xla_with_one_warning(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(
        backends, "device_info", lambda: backends.DeviceInfo("gpu", "NVIDIA A100", (8, 0), 108)
    )
    monkeypatch.setattr(backends, "_WARNED", set())
    with pytest.warns(
        UserWarning, match="falls back to the 'xla' backend.*compute capability >= 9.0"
    ):
        assert backends.select("matmul") is backends.Backend.XLA
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("matmul") is backends.Backend.XLA  # warned once only
    with pytest.raises(ValueError, match="cannot run 'matmul'.*compute capability >= 9.0"):
        backends.select("matmul", "pallas")
