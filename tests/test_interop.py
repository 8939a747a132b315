"""interop: the torch <-> JAX DLPack bridge, NVFP4Linear and quantize_model_.

CPU tests run everywhere torch is installed (the file is skipped without torch). Tests marked
``gpu`` need CUDA in both torch and JAX (sm_90+ per conftest) and check the same contracts on
the device plus CUDA stream ordering without explicit synchronization.
"""

import copy
import dataclasses
import io
import sys

import pytest

torch = pytest.importorskip("torch")

import jax
import jax.numpy as jnp
import numpy as np
import torch.nn.functional as F
from torch import nn

import interop
import nvfp4_jax as nv
from interop import NVFP4Linear, dlpack, modules, to_jax, to_torch
from nvfp4_jax import backends

DTYPES = list(interop.SUPPORTED_DTYPES)
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _random(dtype, shape, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.rand(shape, generator=g) < 0.5
    elif dtype in (torch.uint8, torch.int8, torch.int32):
        lo, hi = {
            torch.uint8: (0, 256),
            torch.int8: (-128, 128),
            torch.int32: (-(2**31), 2**31 - 1),
        }[dtype]
        t = torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)
    else:
        t = (torch.randn(shape, generator=g) * 4).to(dtype)
    return t.to(device)


def _bytes_t(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _bytes_j(a):
    return np.asarray(a).reshape(-1).view(np.uint8)


def _ptr(a):
    return a.unsafe_buffer_pointer()


def _rel(y, ref):
    y, ref = (v.detach().cpu().double() if isinstance(v, torch.Tensor) else v for v in (y, ref))
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


_E2M1 = torch.tensor(
    [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64
)


def _torch_dequantize(weight, weight_scale, weight_scale_2):
    """Independent torch dequantizer of the checkpoint layout: element 2i of a row is the
    low nibble of byte i, one E4M3 scale per 16 elements, times the tensor scale; float32
    ``e2m1 * (scale * tensor_scale)`` like nvfp4_jax (so bit-comparable), as float64."""
    weight = weight.cpu()
    codes = torch.stack([weight & 0xF, weight >> 4], dim=-1).reshape(weight.shape[0], -1)
    block = weight_scale.cpu().float() * weight_scale_2.cpu().float()
    return (_E2M1.float()[codes.long()] * block.repeat_interleave(16, dim=1)).double()


@pytest.fixture(autouse=True)
def _jax_on_cpu_for_cpu_tests(request):
    """CPU tests stay on the CPU on a GPU machine too (JAX's default device is the GPU there);
    their direct nvfp4_jax calls name backend="xla" for the same reason."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _layer(k=64, n=48, bias=True, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


# == the bridge ==============================================================================
@pytest.mark.parametrize("shape", [(3, 32), (), (0, 16)], ids=["2d", "0d", "empty"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_zero_copy(dtype, shape):
    t = _random(dtype, shape)
    a = to_jax(t)
    assert a.dtype == interop.SUPPORTED_DTYPES[dtype] and a.shape == shape
    np.testing.assert_array_equal(_bytes_j(a), _bytes_t(t))
    b = to_torch(a)
    assert b.dtype == dtype and tuple(b.shape) == shape and b.device.type == "cpu"
    np.testing.assert_array_equal(_bytes_t(b), _bytes_t(t))
    if t.numel():
        assert _ptr(a) == t.data_ptr() == b.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jax_to_torch_to_jax(dtype):
    a = jnp.array(to_jax(_random(dtype, (4, 16), seed=1)), copy=True)  # owned by JAX
    t = to_torch(a)
    assert t.data_ptr() == _ptr(a) and t.dtype == dtype
    back = to_jax(t)
    assert _ptr(back) == _ptr(a)
    np.testing.assert_array_equal(_bytes_j(back), _bytes_j(a))


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_float8_uint8_route_is_zero_copy(dtype, monkeypatch):
    """The fallback for frameworks that refuse float8 over DLPack: uint8 bytes plus a dtype
    rewrite in the capsule, forced here on a torch that supports float8 natively."""
    monkeypatch.setattr(
        dlpack, "dtype_route", lambda d, direction: "uint8" if d in FP8 else "native"
    )
    t = _random(dtype, (5, 32))
    a = to_jax(t)
    assert a.dtype == interop.SUPPORTED_DTYPES[dtype] and _ptr(a) == t.data_ptr()
    np.testing.assert_array_equal(_bytes_j(a), _bytes_t(t))
    b = to_torch(a)
    assert b.dtype == dtype and b.data_ptr() == _ptr(a)
    np.testing.assert_array_equal(_bytes_t(b), _bytes_t(t))


def test_retype_versioned_capsule():
    t = _random(torch.uint8, (2, 16))
    cap = t.__dlpack__(max_version=(1, 0))  # "dltensor_versioned"
    dlpack._retype_capsule(cap, 10, 8)  # kDLFloat8_e4m3fn
    r = torch.from_dlpack(cap)
    assert r.dtype == torch.float8_e4m3fn and r.data_ptr() == t.data_ptr()
    with pytest.raises(BufferError, match="16-bit"):
        dlpack._retype_capsule(torch.zeros(2, dtype=torch.bfloat16).__dlpack__(), 10, 8)


@pytest.mark.skipif(
    torch.__version__ < "2.11", reason="float8 over DLPack verified from torch 2.11"
)
def test_native_float8_route_here():
    # torch >= 2.11 with jax 0.11 carries float8 natively; the uint8 route is the fallback.
    assert dlpack.dtype_route(torch.float8_e4m3fn, "to_jax") == "native"
    assert dlpack.dtype_route(torch.float8_e4m3fn, "to_torch") == "native"


@pytest.mark.parametrize("view", ["transpose", "step", "expand"])
def test_non_contiguous_refused_or_copied(view):
    base = _random(torch.float32, (8, 16))
    t = {"transpose": base.T, "step": base[:, ::2], "expand": base[:1].expand(4, 16)}[view]
    with pytest.raises(ValueError, match=r"not contiguous.*copy=None"):
        to_jax(t)
    a = to_jax(t, copy=None)
    np.testing.assert_array_equal(np.asarray(a), t.numpy())
    assert _ptr(a) != base.data_ptr()


def test_copy_argument():
    t = _random(torch.bfloat16, (4, 16))
    assert _ptr(to_jax(t, copy=None)) == t.data_ptr()  # contiguous: still shared
    c = to_jax(t, copy=True)
    assert _ptr(c) != t.data_ptr()
    np.testing.assert_array_equal(_bytes_j(c), _bytes_t(t))
    with pytest.raises(TypeError, match="copy must be True, False or None"):
        to_jax(t, copy="yes")


def test_misaligned_cpu_view():
    base = torch.arange(17, dtype=torch.float32)
    t = base[1:]  # contiguous, 4 bytes past a 64-byte boundary
    assert t.is_contiguous() and t.data_ptr() % 64
    with pytest.raises(ValueError, match=r"64 bytes.*copy=None"):
        to_jax(t)
    np.testing.assert_array_equal(np.asarray(to_jax(t, copy=None)), t.numpy())


def test_to_jax_errors():
    with pytest.raises(TypeError, match="must be a torch.Tensor, got ndarray"):
        to_jax(np.zeros(3))
    with pytest.raises(TypeError, match=r"dtypes bfloat16, float16.*got torch.float64"):
        to_jax(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="got torch.int64"):
        to_jax(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"view\(torch.uint8\)"):
        to_jax(torch.zeros(3, dtype=torch.uint8).view(torch.float4_e2m1fn_x2))
    with pytest.raises(ValueError, match=r"requires grad.*detach"):
        to_jax(torch.zeros(3, requires_grad=True))
    with pytest.raises(ValueError, match="device meta"):
        to_jax(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="strided"):
        to_jax(torch.zeros(3, 3).to_sparse())


def test_to_torch_errors():
    with pytest.raises(TypeError, match="must be a jax.Array, got ndarray"):
        to_torch(np.zeros(3))
    with pytest.raises(TypeError, match="got uint32"):
        to_torch(jnp.zeros(3, jnp.uint32))
    with pytest.raises(TypeError, match="two per uint8 byte"):
        to_torch(jnp.zeros(4, jnp.float4_e2m1fn))
    with pytest.raises(TypeError, match="tracer"):
        jax.jit(to_torch)(jnp.zeros(3))
    a = jnp.zeros(3)
    a.delete()
    with pytest.raises(ValueError, match="deleted"):
        to_torch(a)


def test_lifetimes():
    t = _random(torch.float32, (4, 16))
    want = t.numpy().copy()
    a = to_jax(t)
    del t
    np.testing.assert_array_equal(np.asarray(a), want)  # the JAX array keeps torch memory alive
    b = to_torch(jnp.asarray(want) * 2)
    np.testing.assert_array_equal(b.numpy(), want * 2)  # and the other way round


# == NVFP4Linear =============================================================================
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_from_linear_matches_f_linear(dtype, bias):
    lin = _layer(bias=bias, dtype=dtype)
    m = NVFP4Linear.from_linear(lin)
    sd = m.state_dict()
    w_dq = _torch_dequantize(sd["weight"], sd["weight_scale"], sd["weight_scale_2"])
    # The layout agrees with nvfp4_jax's dequantize, and the quantization is sane.
    np.testing.assert_array_equal(m.dequantize_weight(torch.float32).numpy(), w_dq.float().numpy())
    assert _rel(w_dq, lin.weight.double().detach()) < 0.15
    x = torch.randn(2, 3, 64).to(dtype)
    with torch.no_grad():
        y = m(x)
    assert y.dtype == dtype and y.shape == (2, 3, 48) and y.device == x.device
    ref = F.linear(x.double(), w_dq, None if lin.bias is None else lin.bias.detach().double())
    assert _rel(y, ref) <= 1e-2


def test_state_dict_round_trip():
    m = NVFP4Linear.from_linear(_layer())
    sd = m.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        "weight": (torch.uint8, (48, 32)),
        "weight_scale": (torch.float8_e4m3fn, (48, 4)),
        "weight_scale_2": (torch.float32, ()),
        "bias": (torch.bfloat16, (48,)),
    }
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    fresh = NVFP4Linear(64, 48)
    fresh(x)  # builds its JAX view of the zero buffers: loading must invalidate it
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(_bytes_t(v), _bytes_t(sd[k]))
    # Quark stores weight_scale_2 as [1].
    quark = dict(sd, weight_scale_2=sd["weight_scale_2"].reshape(1))
    NVFP4Linear(64, 48).load_state_dict(quark)
    # Pickling / deepcopy drop the JAX view and rebuild it.
    torch.testing.assert_close(copy.deepcopy(m)(x), m(x), rtol=0, atol=0)


def test_load_state_dict_rejects_wrong_formats():
    m = NVFP4Linear(64, 48)
    with pytest.raises(RuntimeError, match="unquantized nn.Linear state dict"):
        m.load_state_dict(nn.Linear(64, 48).state_dict())
    good = NVFP4Linear.from_linear(_layer()).state_dict()
    with pytest.raises(
        RuntimeError, match=r"weight_scale must have dtype torch.float8_e4m3fn.*raw bytes"
    ):
        m.load_state_dict(dict(good, weight_scale=good["weight_scale"].view(torch.uint8)))
    with pytest.raises(RuntimeError, match=r"weight_scale_2 must be finite and > 0"):
        m.load_state_dict(dict(good, weight_scale_2=torch.tensor(0.0)))
    with pytest.raises(RuntimeError, match="size mismatch"):
        NVFP4Linear(32, 48).load_state_dict(good)


def test_from_checkpoint_tensors_and_nvfp4_array():
    w = jax.random.normal(jax.random.key(0), (48, 64), jnp.bfloat16)
    a = nv.quantize(w, backend="xla")  # logical [out, in]
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    from_array = NVFP4Linear.from_nvfp4_array(a)
    assert from_array.weight.data_ptr() == _ptr(a.data)  # shares the NVFP4Array's memory
    # The same tensors as a checkpoint would hold them (copies, ws2 as Quark's [1]).
    weight = torch.from_numpy(np.asarray(a.data).copy())
    scale = torch.from_numpy(np.asarray(a.scales).view(np.uint8).copy()).view(torch.float8_e4m3fn)
    ws2 = torch.tensor([float(a.tensor_scale)])
    ckpt = NVFP4Linear.from_checkpoint_tensors(weight, scale, ws2, input_scale=torch.tensor([0.5]))
    assert sorted(ckpt.state_dict()) == ["input_scale", "weight", "weight_scale", "weight_scale_2"]
    assert ckpt.weight.data_ptr() == weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x), from_array(x), rtol=0, atol=0)
    ref = jax.jit(lambda x, a: nv.linear(x, a, backend="xla"))(to_jax(x), a)
    np.testing.assert_array_equal(_bytes_t(ckpt(x)), _bytes_j(ref))


def test_from_nvfp4_array_matmul_weight():
    w_kn = jax.random.normal(jax.random.key(1), (64, 48), jnp.bfloat16)
    a = nv.quantize(w_kn, axis=0, backend="xla")  # logical [in, out], stored [out, in/2]
    m = NVFP4Linear.from_nvfp4_array(a, bias=jnp.ones(48, jnp.float32))
    assert (m.in_features, m.out_features) == (64, 48)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    ref = jax.jit(lambda x, a, b: nv.matmul(x, a, bias=b, backend="xla"))(
        to_jax(x), a, jnp.ones(48, jnp.float32)
    )
    np.testing.assert_array_equal(_bytes_t(m(x)), _bytes_j(ref))


def test_constructor_errors():
    a = nv.quantize(jnp.ones((4, 32), jnp.float32), backend="xla")
    weight, scale = to_torch(a.data), to_torch(a.scales)
    with pytest.raises(TypeError, match=r"weight must be uint8.*got torch.float32"):
        NVFP4Linear.from_checkpoint_tensors(weight.float(), scale, 1.0)
    with pytest.raises(TypeError, match=r"weight_scale must be float8_e4m3fn.*view"):
        NVFP4Linear.from_checkpoint_tensors(weight, scale.view(torch.uint8), 1.0)
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(4, 2\)"):
        NVFP4Linear.from_checkpoint_tensors(weight, scale[:, :1], 1.0)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        NVFP4Linear.from_checkpoint_tensors(weight[:, :4], scale[:, :1], 1.0)
    with pytest.raises(ValueError, match="weight_scale_2 must be finite and > 0"):
        NVFP4Linear.from_checkpoint_tensors(weight, scale, -1.0)
    with pytest.raises(ValueError, match="fused partitions"):
        NVFP4Linear.from_checkpoint_tensors(weight, scale, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        NVFP4Linear.from_checkpoint_tensors(weight, scale, 1.0, bias=torch.zeros(5))
    with pytest.raises(TypeError, match="must be an nvfp4_jax.NVFP4Array"):
        NVFP4Linear.from_nvfp4_array(weight)
    with pytest.raises(ValueError, match="in_features must be a multiple of 16"):
        NVFP4Linear.from_linear(nn.Linear(40, 8))
    with pytest.raises(ValueError, match="in_features must be a multiple of 16"):
        NVFP4Linear(40, 8)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        NVFP4Linear(64, 8, backend="cuda")


def test_forward_errors():
    m = NVFP4Linear.from_linear(_layer())
    with pytest.raises(TypeError, match="x must be bfloat16 or float16, got torch.float32"):
        m(torch.zeros(2, 64))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 64\], got \(2, 32\)"):
        m(torch.zeros(2, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"x must have shape"):
        m(torch.zeros((), dtype=torch.bfloat16))
    x = torch.zeros(2, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 48) and not y.requires_grad
    with torch.inference_mode():
        assert m(torch.zeros(2, 64, dtype=torch.bfloat16)).shape == (2, 48)
    assert m(torch.zeros(0, 3, 64, dtype=torch.bfloat16)).shape == (0, 3, 48)
    assert m(torch.zeros(0, 64, dtype=torch.bfloat16)).shape == (0, 48)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m(np.zeros((2, 64)))


def _grad_reference(layers, x, g):
    """float64 input gradient of ``g · (layers[-1] ∘ gelu ∘ ... ∘ layers[0])(x)`` with the
    layers' dequantized weights (plain ``nn.Linear`` layers: their own weights)."""
    xd = x.detach().double().requires_grad_()
    h = xd
    for i, layer in enumerate(layers):
        if i:
            h = F.gelu(h)
        sd = layer.state_dict()
        if "weight_scale" in sd:
            w = _torch_dequantize(sd["weight"], sd["weight_scale"], sd["weight_scale_2"])
        else:  # a layer quantize_model_ left unquantized (e.g. K not a multiple of 16)
            w = sd["weight"].cpu().double()
        h = F.linear(h, w, None if layer.bias is None else layer.bias.detach().cpu().double())
    (h * g.double()).sum().backward()
    return xd.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_input_gradient(dtype):
    """x.grad = grad_y @ W through two quantized layers (leading dims, bias, a strided
    grad_y); the weight and bias buffers get no gradient."""
    model = nn.Sequential(_layer(64, 48, seed=1), nn.GELU(), _layer(48, 32, bias=False, seed=2))
    model = model.to(dtype)
    interop.quantize_model_(model)
    x = torch.randn(2, 5, 64, dtype=dtype, requires_grad=True)
    g = torch.randn(2, 32, 5, dtype=dtype).transpose(1, 2)  # non-contiguous upstream grad
    y = model(x)
    assert y.requires_grad and y.dtype == dtype
    y.backward(g)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert _rel(x.grad, _grad_reference([model[0], model[2]], x, g)) <= 1e-2
    assert all(b.grad is None for b in model.buffers())
    # Gradient checking on an empty batch, and no graph under no_grad.
    e = torch.zeros(0, 64, dtype=dtype, requires_grad=True)
    model[0](e).sum().backward()
    assert e.grad.shape == (0, 64)
    with torch.no_grad():
        assert not model(x).requires_grad


def test_backward_sees_the_weight_of_the_forward():
    """Between forward and backward, a buffer reassignment leaves the gradient to the old
    weight; an in-place write (load_state_dict) makes backward raise, as torch does for any
    tensor saved for backward."""
    layer = NVFP4Linear.from_linear(_layer(seed=3))
    other = NVFP4Linear.from_linear(_layer(seed=4))
    x = torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 48, dtype=torch.bfloat16)
    ref = _grad_reference([layer], x, g)
    y = layer(x)
    for name in ("weight", "weight_scale"):
        setattr(layer, name, other._buffers[name].clone())
    y.backward(g)
    assert _rel(x.grad, ref) <= 1e-2
    y = layer(x)
    layer.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(g)


def test_lora_example_trains_through_quantized_layers():
    import pathlib
    import runpy

    path = pathlib.Path(__file__).parents[1] / "examples" / "torch_mlp.py"
    losses = runpy.run_path(str(path))["lora_demo"](torch.device("cpu"), steps=10)
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


def test_forward_non_contiguous_x_and_jit_cache():
    m = NVFP4Linear.from_linear(_layer())
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    y = m(x)
    fn = m._jax_state()[2]
    n = fn._cache_size()
    torch.testing.assert_close(m(x.reshape(2, 3, 64)), y.reshape(2, 3, 48), rtol=0, atol=0)
    torch.testing.assert_close(m(x.T.contiguous().T), y, rtol=0, atol=0)  # strided x: one copy
    assert fn._cache_size() == n  # same row count: no new executable


def test_buffers_converted_once(monkeypatch):
    m = NVFP4Linear.from_linear(_layer())
    calls = []
    real = modules.to_jax
    monkeypatch.setattr(modules, "to_jax", lambda t, **kw: calls.append(t) or real(t, **kw))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = m(x)
    m(x), m(x)
    assert len(calls) == 4  # weight, weight_scale, weight_scale_2, bias
    m.load_state_dict(m.state_dict())
    m(x)
    assert len(calls) == 8
    m.to(torch.float16)  # keeps the NVFP4 dtypes, converts the bias
    assert (m.weight.dtype, m.weight_scale.dtype, m.weight_scale_2.dtype, m.bias.dtype) == (
        torch.uint8,
        torch.float8_e4m3fn,
        torch.float32,
        torch.float16,
    )
    torch.testing.assert_close(m(x.half()).float(), y.float(), rtol=2e-2, atol=2e-2)
    assert len(calls) == 12
    m.half()
    m.float()
    assert m.weight_scale.dtype == torch.float8_e4m3fn and m.bias.dtype == torch.float32


# == quantize_model_ =========================================================================
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.block = nn.Sequential(nn.GELU(), nn.Linear(128, 40))
        self.odd = nn.Linear(40, 32)  # in_features 40: skipped
        self.head = nn.Linear(32, 16)
        self.tied = self.up  # one module under two names

    def forward(self, x):
        return self.head(self.odd(self.block(self.up(x))))


def test_quantize_model_():
    torch.manual_seed(0)
    net = _Net().to(torch.bfloat16).eval()
    dense = copy.deepcopy(net)
    report = interop.quantize_model_(net, skip="head")
    assert report.quantized == ["up", "tied", "block.1"]
    assert report.skipped == {
        "odd": "in_features=40 is not a multiple of 16",
        "head": "matched skip",
    }
    assert isinstance(net.up, NVFP4Linear) and net.tied is net.up
    assert type(net.odd) is nn.Linear and type(net.head) is nn.Linear
    # Reference: the dense net with the dequantized weights.
    dense.up.weight.data = net.up.dequantize_weight(torch.bfloat16)
    dense.block[1].weight.data = net.block[1].dequantize_weight(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert _rel(net(x).float(), dense(x).float()) <= 1e-2
    assert "skipped odd: in_features=40" in str(report)
    with pytest.raises(TypeError, match="from_linear"):
        interop.quantize_model_(nn.Linear(64, 64))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        interop.quantize_model_(lambda x: x)
    net2 = _Net()
    r2 = interop.quantize_model_(net2, skip=lambda name, m: m.out_features == 40)
    assert r2.skipped["block.1"] == "matched skip"


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_quantize_model_transformer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    enc = (
        nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=True)
        .to(torch.bfloat16)
        .eval()
    )
    dense = copy.deepcopy(enc)
    report = interop.quantize_model_(enc)
    assert report.quantized == ["layers.0.linear1", "layers.0.linear2"]
    assert "MultiheadAttention" in report.skipped["layers.0.self_attn.out_proj"]
    assert len(report.notes) == 2  # fused layer path and nested-tensor path disabled
    q = enc.layers[0]
    dense.layers[0].linear1.weight.data = q.linear1.dequantize_weight(torch.bfloat16)
    dense.layers[0].linear2.weight.data = q.linear2.dequantize_weight(torch.bfloat16)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": pad}):  # the padded call takes the nested path
            y, ref = enc(x, **kw).float(), dense(x, **kw).float()
            keep = ~pad[..., None].expand_as(y) if kw else torch.ones_like(y, dtype=torch.bool)
            assert _rel(y[keep], ref[keep]) <= 2e-2


def test_quantize_model_progress(monkeypatch, capsys):
    net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    interop.quantize_model_(net, progress=True)
    assert "quantize_model_" in capsys.readouterr().err  # tqdm
    net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # tqdm not installed
    interop.quantize_model_(net, progress=True)
    assert "quantize_model_: 2/2 layers" in capsys.readouterr().err
    interop.quantize_model_(nn.Sequential(nn.Linear(16, 16)))  # small model: no bar by default
    assert capsys.readouterr().err == ""


def test_bench_overhead_smoke(capsys):
    from benchmarks import bench_interop_overhead as bench_overhead

    bench_overhead.main(
        ["--m", "1", "--k", "64", "--n", "64", "--iters", "20", "--warmup", "3", "--device", "cpu"]
    )
    out = capsys.readouterr().out
    assert "NVFP4Linear.forward" in out and "direct jitted JAX" in out


# == GPU ======================================================================================
def _jax_has_gpu():
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and _jax_has_gpu()),
        reason="needs CUDA in both torch and JAX",
    ),
]


def _apply_marks(fn):
    for mark in gpu:
        fn = mark(fn)
    return fn


@_apply_marks
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_round_trip_zero_copy(dtype):
    for shape in [(33, 48), ()]:
        t = _random(dtype, shape, device="cuda")
        a = to_jax(t)
        assert a.devices() == {jax.devices("gpu")[t.get_device()]}
        assert _ptr(a) == t.data_ptr()
        np.testing.assert_array_equal(_bytes_j(a), _bytes_t(t))
        b = to_torch(a)
        assert b.device == t.device and b.data_ptr() == t.data_ptr()
        owned = jnp.asarray(a).copy()  # JAX-owned buffer
        c = to_torch(owned)
        assert c.data_ptr() == _ptr(owned)
        np.testing.assert_array_equal(_bytes_t(c), _bytes_t(t))


@_apply_marks
@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_gpu_float8_uint8_route(dtype, monkeypatch):
    monkeypatch.setattr(
        dlpack, "dtype_route", lambda d, direction: "uint8" if d in FP8 else "native"
    )
    t = _random(dtype, (8, 32), device="cuda")
    a = to_jax(t)
    assert a.dtype == interop.SUPPORTED_DTYPES[dtype] and _ptr(a) == t.data_ptr()
    b = to_torch(a)
    assert b.dtype == dtype and b.data_ptr() == t.data_ptr()
    np.testing.assert_array_equal(_bytes_t(b), _bytes_t(t))


@_apply_marks
def test_gpu_stream_chain():
    """torch (side stream) -> JAX -> torch (same stream), no synchronize in between: a slow
    producer (sleep + matmul into a NaN-filled buffer) and a slow JAX op catch any missing
    ordering in either direction."""
    n = 1024
    slow = jax.jit(lambda v: jax.lax.fori_loop(0, 100, lambda i, u: jnp.sin(u) + v, v))
    side = torch.cuda.Stream()
    outs = []
    with torch.cuda.stream(side):
        for i in range(4):
            g = torch.Generator("cuda").manual_seed(i)
            a = torch.randn(n, n, device="cuda", generator=g) / 8
            x = torch.full((n, n), float("nan"), device="cuda")
            torch.cuda._sleep(50_000_000)  # delays the producer on the side stream only
            torch.matmul(a, a, out=x)
            y = to_torch(slow(to_jax(x)))
            outs.append((a, y * 2 + 1))  # consumer on the same (current) stream
    torch.cuda.synchronize()  # only to read the results back for the reference
    for a, z in outs:
        a = a.cpu()
        ref = np.asarray(slow(jax.device_put((a @ a).numpy(), jax.devices("cpu")[0]))) * 2 + 1
        np.testing.assert_allclose(z.cpu().numpy(), ref, rtol=1e-3, atol=1e-3)


@_apply_marks
def test_gpu_nvfp4_linear_on_side_stream():
    lin = _layer(k=1024, n=512).cuda()
    m = NVFP4Linear.from_linear(lin)
    sd = m.state_dict()
    w_dq = _torch_dequantize(sd["weight"], sd["weight_scale"], sd["weight_scale_2"])
    src = torch.randn(4, 16, 1024, dtype=torch.bfloat16)
    src_gpu = src.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        x = torch.full(src.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
        torch.cuda._sleep(50_000_000)  # x holds NaN until the side stream gets past this
        x.copy_(src_gpu)
        z = m(x).float() * 1.0
        assert z.device == x.device
    torch.cuda.synchronize()
    ref = F.linear(src.double(), w_dq, lin.bias.detach().cpu().double())
    assert _rel(z.cpu(), ref) <= 1e-2
    # Round trip of the buffers on the device.
    fresh = NVFP4Linear(1024, 512, device="cuda")
    fresh.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(src.cuda()), m(src.cuda()), rtol=0, atol=0)
    assert fresh.cpu()(src).device.type == "cpu"


@_apply_marks
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_second_device():
    t = _random(torch.bfloat16, (4, 16), device="cuda:1")
    a = to_jax(t)  # torch's current device stays cuda:0
    assert {d.local_hardware_id for d in a.devices()} == {1} and _ptr(a) == t.data_ptr()
    assert to_torch(a).device == t.device


def test_torch_gemm_serves_both_dtypes_from_one_layout_and_rejects_others():
    """TorchGemm prepares one compact-scale layout (no activation dtype asked for) and
    refuses activations other than bf16/fp16 before any launch."""
    from interop.torch_kernel import TorchGemm

    w = nv.quantize(jnp.asarray(np.random.default_rng(7).standard_normal((64, 128)), jnp.bfloat16))
    g = TorchGemm(w.data, w.scales, w.tensor_scale, None)
    assert g.scales.dtype == torch.uint8 and g.k_group == 128
    with pytest.raises(TypeError, match="bfloat16 or float16, got torch.float32"):
        g(torch.ones(2, 128))
    from nvfp4_jax.kernels import gemm

    with pytest.raises(ValueError, match="stream-K tilings are not launched from torch"):
        g.launcher_for(gemm.GemmConfig(tile_k=128, stream_k=3), 2, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="no block of partials"):  # 64 columns, one row
        g.launcher_for(gemm.GemmConfig(tile_n=64, tile_k=64, split_k=2), 1, torch.bfloat16, "cpu")
    with pytest.raises(TypeError, match="torch_dtype must be bfloat16 or float16"):
        g.config_for(2, torch.float32)
    with pytest.raises(TypeError, match="torch_dtype must be bfloat16 or float16"):
        g.launcher_for(gemm.GemmConfig(tile_k=128), 2, torch.float32, torch.device("cpu"))
    for m in (1, 2, 16, 64, 1024):  # the policy of a call: the JAX path's tiling, no stream-K
        cfg = g.config_for(m, torch.bfloat16)
        base = gemm.default_config(m, g.n, g.k, stream_k=False, k_group=g.k_group)
        if m == 1 and base.split_k > 1:  # 64 columns, one row: no sum kernel, one launch
            assert cfg == gemm.single_kernel_config(base, m, g.k, n=g.n), cfg
            assert not gemm._stores_partials(cfg)
        else:
            assert cfg == base, (m, cfg)


def test_torch_launch_split_k_sum_is_one_mosaic_kernel():
    """A split-K launch from torch is the GEMM (float32 partials) and the sum kernel
    (``split_k.add_partials``): lower the sum as ``_DirectLaunch`` compiles it, for an
    abstract H100 on the CPU, with and without a bias; the operands keep the wrapper's
    order."""
    from cross_lowering import h100_mesh

    from interop.torch_kernel import kernel_module, reduce_fn

    for bias in (False, True):
        args = [jnp.zeros((4, 16, 4096), jnp.float32), jnp.ones((1,), jnp.float32)]
        args += [jnp.zeros(4096, jnp.bfloat16)] if bias else []
        with jax.sharding.use_abstract_mesh(h100_mesh()):
            asm, order, out = kernel_module(reduce_fn(jnp.bfloat16), args, ("cuda",))
        assert isinstance(asm, bytes) and asm
        assert order == list(range(len(args))) and out.shape == (16, 4096)
        assert out.dtype == jnp.bfloat16


def test_torch_launch_function_is_one_mosaic_kernel():
    """The CUDA forward path compiles a lone Mosaic GPU call (as ``plgpu.as_torch_kernel``
    requires) and launches it with its operands in the kernel's order: lower what it
    compiles for an abstract H100 on the CPU, for an XLA split-K config, the launch path's
    cluster split-K one (decode, and prefill rows in 64-token tiles, which leave SMEM for
    the partial sums), and a fused one with a bias."""
    from cross_lowering import h100_mesh

    from interop.torch_kernel import kernel_fn, kernel_module
    from nvfp4_jax.kernels import gemm

    n, k = 512, 1024
    prep = gemm.prepare_weight(
        jnp.zeros((n, k // 2), jnp.uint8), jnp.ones((n, k // 16), jnp.float8_e4m3fn), 1.0
    )
    for m in (1, 16, 64, 304):
        cfg = gemm.default_config(m, n, k, num_sms=132)
        args = [jnp.zeros((m, k), jnp.bfloat16), *prep]
        if m in (16, 304):  # the launch path: split-K (if any) reduced in clusters, one kernel
            cfg = gemm.single_kernel_config(cfg, m, k, n=n)
            assert cfg.cluster_reduce and cfg.split_k <= 4
        if m == 64:  # the launch path's fused epilogue, with a bias
            cfg = dataclasses.replace(cfg, split_k=1)
            args.append(jnp.zeros(-(-n // cfg.tile_n) * cfg.tile_n, jnp.bfloat16))
        with jax.sharding.use_abstract_mesh(h100_mesh()):
            asm, order, out = kernel_module(kernel_fn(n, k, cfg, m), args, ("cuda",))
        assert isinstance(asm, bytes) and asm
        # _launch passes (data, scales, x, ts[, bias]); the wrapper takes x first.
        assert order == [1, 2, 0, 3] + ([4] if m == 64 else [])
        n_out = -(-n // cfg.tile_n) * cfg.tile_n
        partials = cfg.split_k > 1 and not cfg.cluster_reduce
        assert out.shape == ((cfg.split_k, m, n_out) if partials else (m, n_out))


def test_torch_launch_function_k_fold_is_one_mosaic_kernel():
    """The launch path of a K-folded tiling (``GemmConfig.k_fold``: split-K inside the CTA,
    what ``single_kernel_config`` makes of 4 splits of 128-feature tiles at M <= 16) takes
    x, codes and scales as torch views and compiles one Mosaic GPU call."""
    from cross_lowering import h100_mesh

    from interop.torch_kernel import kernel_fn, kernel_module
    from nvfp4_jax.kernels import gemm

    n, k = 4096, 1024
    prep = gemm.prepare_weight(
        jnp.zeros((n, k // 2), jnp.uint8), jnp.ones((n, k // 16), jnp.float8_e4m3fn), 1.0
    )
    for m in (1, 3, 16):
        cfg = gemm.single_kernel_config(gemm.default_config(m, n, k, num_sms=132), m, k, n=n)
        assert cfg.k_fold == 4 and cfg.tile_n == 32 and cfg.split_k == 1, cfg
        rows = gemm.launch_rows(m, cfg.k_fold)
        args = [jnp.zeros((rows * 4, k // 4), jnp.bfloat16)]
        args += [gemm.fold_view(prep.data, 4), gemm.fold_view(prep.scales, 4), prep.tensor_scale]
        with jax.sharding.use_abstract_mesh(h100_mesh()):
            asm, order, out = kernel_module(kernel_fn(n, k, cfg, rows), args, ("cuda",))
        assert isinstance(asm, bytes) and asm and order == [1, 2, 0, 3]
        assert out.shape == (rows, n)


@_apply_marks
@pytest.mark.parametrize("rows", [1, 5, 13, 64])
def test_gpu_torch_launch_decode_tilings(rows):
    """N = 4096, K = 1024: 32 tiles x 4 splits, launched from torch as one K-folded kernel
    (M <= 8) or as the split-K GEMM and the kernel that sums its partials and adds the bias
    (M = 13, 64), on torch's current stream."""
    from interop.torch_kernel import _SplitKLaunch

    lin = _layer(k=1024, n=4096, seed=rows).cuda()
    layer = NVFP4Linear.from_linear(lin)
    sd = layer.state_dict()
    w_dq = _torch_dequantize(sd["weight"], sd["weight_scale"], sd["weight_scale_2"])
    x = torch.randn(rows, 1024, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        y = layer(x)
        y16 = layer(x.half())
    torch.cuda.current_stream().wait_stream(side)
    launchers = [ln for g in layer._jax_state()[4] for ln in g._launchers.values()]
    assert len(launchers) == 2 and all(ln.on_current_stream for ln in launchers)
    if rows <= 8:
        assert all(ln.k_fold == 4 for ln in launchers)
    else:
        assert all(isinstance(ln.apply, _SplitKLaunch) for ln in launchers)
    ref = F.linear(x.cpu().double(), w_dq, lin.bias.detach().cpu().double())
    assert y.shape == (rows, 4096) and y.dtype == torch.bfloat16 and _rel(y.cpu(), ref) <= 1e-2
    ref16 = F.linear(x.half().cpu().double(), w_dq, lin.bias.detach().cpu().double())
    assert y16.dtype == torch.float16 and _rel(y16.cpu(), ref16) <= 2e-3
    err = (y.cpu().double() - ref).abs()  # no element left unwritten
    assert float(err.max()) <= 0.05 * float(ref.abs().max())


@_apply_marks
def test_gpu_prefill_rows_take_the_dequantize_route():
    """From DEQUANTIZE_DOT_MIN_M rows on, the CUDA forward uses the JAX path (whose
    ``linear`` dequantizes and calls XLA's dot) instead of launching the fused kernel."""
    from nvfp4_jax.matmul import DEQUANTIZE_DOT_MIN_M

    lin = _layer(k=1024, n=520).cuda()
    layer = NVFP4Linear.from_linear(lin)
    sd = layer.state_dict()
    w_dq = _torch_dequantize(sd["weight"], sd["weight_scale"], sd["weight_scale_2"])
    x = torch.randn(DEQUANTIZE_DOT_MIN_M + 5, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad(), backends.record() as log:
        y = layer(x)
    assert layer._jax_state()[4] == [], "no kernel launched from torch"
    assert backends.Dispatch("matmul", "pallas", "dequantize") in log
    assert y.shape == (x.shape[0], 520) and y.dtype == torch.bfloat16
    ref = F.linear(x.cpu().double(), w_dq, lin.bias.detach().cpu().double())
    assert _rel(y.cpu(), ref) <= 1e-2


@_apply_marks
@pytest.mark.parametrize("rows", [1, 13, 64, 300])
def test_gpu_torch_launch_matches_jax_dispatch(rows, monkeypatch):
    lin = _layer(k=1024, n=520).cuda()
    fast = NVFP4Linear.from_linear(lin)
    monkeypatch.setenv("NVFP4_JAX_TORCH_LAUNCH", "0")
    slow = NVFP4Linear.from_linear(lin)
    assert slow._jax_state()[4] is None
    monkeypatch.delenv("NVFP4_JAX_TORCH_LAUNCH")
    sd = fast.state_dict()
    w_dq = _torch_dequantize(sd["weight"], sd["weight_scale"], sd["weight_scale_2"])
    x = torch.randn(rows, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        y = fast(x)
        gemms = fast._jax_state()[4]
        assert gemms, "the CUDA forward must launch the kernel from torch"
        launchers = [ln for g in gemms for ln in g._launchers.values()]
        assert launchers and all(ln.on_current_stream for ln in launchers), "direct launch"
        z = slow(x)
    assert y.shape == (rows, 520) and y.dtype == torch.bfloat16 and y.is_contiguous()
    ref = F.linear(x.cpu().double(), w_dq, lin.bias.detach().cpu().double())
    assert _rel(y.cpu(), ref) <= 1e-2
    torch.testing.assert_close(y, z, rtol=2**-7, atol=1e-3 * float(ref.abs().max()))
    with torch.no_grad():  # fp16 activations: the same prepared layout, a second kernel
        y16 = fast(x.half())
    assert y16.dtype == torch.float16 and len(gemms) == 1
    assert {dtype for _, dtype in gemms[0]._launchers} == {x.dtype, torch.float16}
    assert _rel(y16.cpu(), F.linear(x.half().cpu().double(), w_dq, lin.bias.cpu().double())) <= 1e-2


@_apply_marks
@pytest.mark.parametrize("rows", [7, 2100])
def test_gpu_backward_input_gradient(rows):
    """CUDA: forward by the kernel launched from torch (or the dequantize route), backward
    through JAX, on torch's current stream."""
    model = nn.Sequential(_layer(1024, 520, seed=5), nn.GELU(), _layer(520, 256, seed=6)).cuda()
    interop.quantize_model_(model)
    # K = 520 is no multiple of 16: the second layer stays a bf16 nn.Linear
    assert isinstance(model[0], interop.NVFP4Linear) and type(model[2]) is nn.Linear
    x = torch.randn(rows, 1024, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    g = torch.randn(rows, 256, dtype=torch.bfloat16, device="cuda")
    model(x).backward(g)
    assert x.grad.device == x.device and x.grad.dtype == torch.bfloat16
    assert _rel(x.grad.cpu(), _grad_reference([model[0], model[2]], x.cpu(), g.cpu())) <= 1e-2


def test_torch_launch_function_checks_config():
    """``kernel_fn`` validates the tiling against the weight as ``gemm.nvfp4_matmul`` does
    (``gemm._check_config``): a ValueError naming the field, before anything is traced."""
    from interop.torch_kernel import kernel_fn
    from nvfp4_jax.kernels import gemm

    folded = gemm.GemmConfig(tile_n=32, tile_m=8, tile_k=128, k_fold=4)
    with pytest.raises(ValueError, match="k_fold=4 needs K to be a multiple of"):
        kernel_fn(4096, 1040, folded, 1)
    with pytest.raises(ValueError, match="tile_k=128 must be a multiple of k_group=256"):
        kernel_fn(4096, 4096, gemm.GemmConfig(tile_k=128), 16, k_group=256)
    with pytest.raises(ValueError, match="split_k=3 must divide"):
        kernel_fn(4096, 4096, gemm.GemmConfig(tile_k=128, split_k=3), 16)
    assert callable(kernel_fn(4096, 4096, folded, 1))
