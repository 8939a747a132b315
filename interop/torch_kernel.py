"""The Pallas GEMM launched straight from PyTorch: no JAX dispatch and no DLPack per call.

:class:`TorchGemm` holds one NVFP4 weight prepared once in JAX
(``kernels.gemm.prepare_weight``, shared with torch zero-copy) and one compiled kernel per
row count ``M`` (shared by every layer of the same shapes); a split-K tiling adds a second
compiled kernel that sums its float32 partials (``kernels.split_k.add_partials``, what XLA
fuses on the JAX path). Per call it allocates the output and launches the kernel(s) on
torch's current stream, so stream semantics are those of ``F.linear``. A launch uses the
module that ``plgpu.as_torch_kernel`` would compile, minus that wrapper's per-call work
(:class:`_DirectLaunch`); if jax's private entry points it needs are missing, it falls back
to ``as_torch_kernel``, which launches on the default stream (ordered against the current
one with events).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import torch
import torch.nn.functional as F
from jax.experimental.pallas import mosaic_gpu as plgpu

from interop.dlpack import to_torch
from nvfp4_jax.kernels import gemm, split_k

_JAX_DTYPE = {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}


def _jax_dtype(name: str, torch_dtype) -> jnp.dtype:
    """The JAX dtype of an activation dtype the kernel takes; TypeError for others."""
    if torch_dtype not in _JAX_DTYPE:
        raise TypeError(f"{name} must be bfloat16 or float16, got {torch_dtype}")
    return _JAX_DTYPE[torch_dtype]


def kernel_fn(
    n: int, k: int, cfg: gemm.GemmConfig, m_rows: int, k_group: int = gemm.DEFAULT_K_GROUP
) -> Callable:
    """The JAX function ``(x2d, data, scales, ts[, bias])`` -> the kernel's raw output: one
    Mosaic GPU kernel and nothing else, as ``as_torch_kernel`` requires. ``m_rows``: the
    rows of x (:func:`gemm.launch_rows`); K-folded (``cfg.k_fold``), x comes as the view
    ``[m_rows * k_fold, K / k_fold]`` and data and scales as :func:`gemm.fold_view`.
    ``k_group``: the prepared weight's. Raises ``ValueError`` for a ``cfg`` that does not
    fit the weight (as ``gemm.nvfp4_matmul`` does)."""
    fold = cfg.k_fold
    tile_m = gemm.token_tile(cfg, m_rows * fold)
    k_steps = gemm._check_config(cfg, k, k_group, interpret=False)

    def fn(x2d, data, scales, ts, *bias):
        return gemm._launch(
            x2d,
            data,
            scales,
            ts,
            bias[0] if bias else None,
            None,
            n=n,
            out_dtype=x2d.dtype,
            cfg=cfg,
            tile_m=tile_m,
            m_tiles=-(-m_rows * fold // tile_m),
            k_steps=k_steps,
            interpret=False,
        )

    return fn


_kernel_fn_cached = functools.cache(kernel_fn)  # one function object per shape and config


def kernel_module(fn: Callable, structs, platforms: tuple[str, ...] | None = None):
    """Lower ``fn`` (one Mosaic GPU kernel and nothing else) as ``as_torch_kernel`` does.

    Returns ``(module_asm, order, out_info)``: the serialized Mosaic GPU module, the index
    into ``structs`` of each kernel operand, and the output's ``ShapeDtypeStruct``. Raises
    ``NotImplementedError`` if the kernel needs operands the wrapper would make up
    (constants, scratch allocations) or aliases its output.
    """
    from jax._src.lib.mlir import passmanager
    from jax._src.pallas.mosaic_gpu import torch as mgpu_torch
    from jax.experimental import mosaic

    traced = jax.jit(fn).trace(*structs)
    module = traced.lower(lowering_platforms=platforms).compiler_ir()
    with module.context:
        mosaic.gpu.dialect.register_inliner_extensions(module.context)
        passmanager.PassManager.parse("builtin.module(inline{default-pipeline=})").run(
            module.operation
        )
        call, prepare_args, _, _ = mgpu_torch._find_mgpu_call_in_module(module)
        sentinels = [object() for _ in structs]
        position = {id(v): i for i, v in enumerate(sentinels)}
        operands = prepare_args(*sentinels, device=None)
        if any(id(v) not in position for v in operands):
            raise NotImplementedError("kernel operands are not plain arguments")
        if call.output_operand_aliases:
            raise NotImplementedError("kernel aliases an output to an input")
        module_asm = call.attributes["mhlo.backend_config"]["module"].value_bytes
    return module_asm, [position[id(v)] for v in operands], traced.out_info


class _DirectLaunch:
    """One compiled Mosaic GPU kernel launched with ``cuLaunchKernel`` arguments built from
    tensor pointers, on torch's *current* stream: what ``plgpu.as_torch_kernel`` does,
    without its per-call signature checks, argument environment and default-stream launch
    (tens of microseconds per call on a slow host). Uses jax 0.11's private
    ``_find_mgpu_call_in_module`` and ``MosaicGpuCompile``; :func:`_compile` falls back to
    the public wrapper if they change.

    The device must be the current CUDA device while it is built and launched (the kernel
    module is loaded into the current context)."""

    def __init__(self, fn: Callable, args: list[torch.Tensor]):
        import ctypes

        structs = [jax.ShapeDtypeStruct(a.shape, str(a.dtype).split(".")[-1]) for a in args]
        module_asm, self._order, out = kernel_module(fn, structs)
        self.out_shape = tuple(out.shape)
        self.out_dtype = getattr(torch, jnp.dtype(out.dtype).name)
        try:
            import jax_plugins.xla_cuda13 as cuda_plugin
        except ImportError:
            import jax_plugins.xla_cuda12 as cuda_plugin
        dll = ctypes.CDLL(cuda_plugin._get_library_path())
        dll.MosaicGpuCompile.argtypes = [ctypes.c_char_p, ctypes.c_int]
        dll.MosaicGpuCompile.restype = ctypes.POINTER(ctypes.c_void_p)
        torch.cuda.init()
        compiled = dll.MosaicGpuCompile(module_asm, len(module_asm))
        if not compiled:
            raise RuntimeError("MosaicGpuCompile failed")
        self._compiled = compiled  # kept for the life of the process (cached launcher)
        self._function = compiled[0]
        self._launch = ctypes.CFUNCTYPE(
            None, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        )(compiled[1])
        self._buffers = ctypes.c_void_p * (len(self._order) + 1)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        x = args[0]
        out = torch.empty(self.out_shape, dtype=self.out_dtype, device=x.device)
        ptrs = self._buffers(*[args[i].data_ptr() for i in self._order], out.data_ptr())
        self._launch(self._function, torch.cuda.current_stream(x.device).cuda_stream, ptrs)
        return out


def _compile(key: tuple, make_fn: Callable[[], Callable], args) -> tuple[Callable, bool]:
    """(launcher, on_current_stream) of the one-kernel JAX function ``make_fn()`` on
    tensors shaped like ``args``, cached under ``key`` (shared by every layer of the same
    shapes)."""
    key = key + tuple((tuple(a.shape), a.dtype) for a in args)
    if key not in _LAUNCHERS:
        fn = make_fn()
        try:
            _LAUNCHERS[key] = (_DirectLaunch(fn, args), True)
        except (ImportError, AttributeError, NotImplementedError, OSError, RuntimeError) as e:
            warnings.warn(
                f"nvfp4_jax interop: direct kernel launch unavailable ({e!r}); falling back "
                "to plgpu.as_torch_kernel (default stream)",
                stacklevel=2,
            )
            _LAUNCHERS[key] = (plgpu.as_torch_kernel(fn), False)  # default stream
    return _LAUNCHERS[key]


_LAUNCHERS: dict[tuple, tuple[Callable, bool]] = {}


def reduce_fn(dtype) -> Callable:
    """The JAX function ``(partials, ts[, bias])`` -> ``dtype [rows, n_out]``: the split-K
    sum as one Mosaic GPU kernel (:func:`split_k.add_partials`)."""

    def fn(partials, ts, *bias):
        return split_k.add_partials_kernel(partials, ts, *bias, out_dtype=dtype)

    return fn


class _SplitKLaunch:
    """A split-K tiling from torch: the GEMM kernel stores float32 partial sums, a second
    kernel adds them, scales and adds the bias (both on the same stream)."""

    def __init__(self, gemm_launch: Callable, reduce_launch: Callable):
        self._gemm, self._reduce = gemm_launch, reduce_launch

    def __call__(self, x, data, scales, ts, *bias):
        return self._reduce(self._gemm(x, data, scales, ts), ts, *bias)


@dataclasses.dataclass
class _Launcher:
    apply: Callable
    on_current_stream: bool
    rows: int  # M rounded up to what the kernel's TMA needs
    bias: torch.Tensor | None  # padded to whole output tiles
    k_fold: int  # GemmConfig.k_fold: x, data and scales enter as K-folded views
    data: torch.Tensor  # the weight's codes and scales as the kernel takes them
    scales: torch.Tensor


class TorchGemm:
    """``y = x @ W.T * tensor_scale (+ bias)`` for torch CUDA tensors, ``W [N, K]`` NVFP4.

    Args:
      data, scales, tensor_scale: the weight as JAX arrays on the GPU (``uint8 [N, K/2]``,
        ``float8_e4m3fn [N, K/16]``, float32 scalar).
      bias: ``[N]`` torch tensor or None.

    The prepared layout (compact scales) serves bf16 and fp16 activations alike; a kernel is
    compiled per (rows, activation dtype).
    """

    def __init__(self, data, scales, tensor_scale, bias: torch.Tensor | None):
        self.n, self.k = data.shape[0], 2 * data.shape[1]
        prepared = gemm.prepare_weight(data, scales, tensor_scale)  # compact scales
        self.k_group = prepared.k_group
        codes = jax.lax.bitcast_convert_type(prepared.data, jnp.uint8)  # torch has few uint16 ops
        # The JAX arrays whose memory the torch views below share (prepared.data is dropped).
        self._jax_buffers = (codes, prepared.scales, prepared.tensor_scale)
        self.data = to_torch(codes).view(torch.uint16).reshape(prepared.data.shape)
        self.scales = to_torch(prepared.scales)
        self.tensor_scale = to_torch(prepared.tensor_scale)
        self.bias = bias
        self._launchers: dict[tuple[int, torch.dtype], _Launcher] = {}

    def config_for(self, m: int, torch_dtype: torch.dtype) -> gemm.GemmConfig:
        """The tiling a call with ``m`` tokens of ``torch_dtype`` runs: the JAX path's
        (``gemm.default_config``) without stream-K, whose partial sums only XLA adds; its
        split-K partials are added by a second kernel (``split_k.add_partials``). Where that
        kernel has no block for the partials (fewer than 128 output columns and one row),
        one kernel: ``gemm.single_kernel_config`` (K-folding or cluster split-K)."""
        dtype = _jax_dtype("torch_dtype", torch_dtype)
        cfg = gemm.default_config(
            m,
            self.n,
            self.k,
            dtype=dtype,
            stream_k=False,
            k_group=self.k_group,
            scale_itemsize=self.scales.dtype.itemsize,
        )
        if gemm._stores_partials(cfg):
            try:
                split_k.block_shape(cfg.split_k, gemm.launch_rows(m), self._padded_n(cfg))
            except ValueError:
                return gemm.single_kernel_config(cfg, m, self.k, dtype, n=self.n)
        return cfg

    def _padded_n(self, cfg: gemm.GemmConfig) -> int:
        """Output columns of a launch: N padded to whole ``cfg.tile_n`` tiles."""
        return -(-self.n // cfg.tile_n) * cfg.tile_n

    def _launcher(self, m: int, torch_dtype: torch.dtype, device: torch.device) -> _Launcher:
        launcher = self.launcher_for(self.config_for(m, torch_dtype), m, torch_dtype, device)
        self._launchers[m, torch_dtype] = launcher
        return launcher

    def launcher_for(
        self, cfg: gemm.GemmConfig, m: int, torch_dtype: torch.dtype, device: torch.device
    ) -> _Launcher:
        """The compiled launch of tiling ``cfg`` for ``m`` tokens of ``torch_dtype``: one
        kernel, or with XLA-style split-K (``split_k > 1``, ``split_k_reduce="xla"``) the
        GEMM and :func:`split_k.add_partials`; with the weight's views it takes (K-folded
        where ``cfg.k_fold > 1``). Not cached on this layer (``benchmarks/
        bench_torch_launch.py`` times tilings other than the one a call picks). Stream-K
        (``cfg.stream_k``) is refused with a ``ValueError``: its partial sums need XLA."""
        jax_dtype = _jax_dtype("torch_dtype", torch_dtype)
        if cfg.stream_k:
            raise ValueError(
                f"stream-K tilings are not launched from torch (their partial sums are added"
                f" by XLA), got {cfg}; see TorchGemm.config_for"
            )
        fold = cfg.k_fold
        rows = gemm.launch_rows(m, fold)
        n_out = self._padded_n(cfg)
        partials = gemm._stores_partials(cfg)
        if partials:  # ValueError (before compiling) where the sum kernel has no block
            split_k.block_shape(cfg.split_k, rows, n_out)
        data, scales = self.data, self.scales
        if fold > 1:
            data, scales = gemm.fold_view(data, fold), gemm.fold_view(scales, fold)
        args = [torch.empty(rows * fold, self.k // fold, dtype=torch_dtype, device=device)]
        args += [data, scales, self.tensor_scale]
        bias = None
        if self.bias is not None:
            bias = F.pad(self.bias, (0, n_out - self.n)).contiguous()
            if not partials:  # (the sum kernel adds it)
                args.append(bias)
        key = (self.n, self.k, cfg, rows, self.k_group)
        with torch.cuda.device(device):
            make = lambda: _kernel_fn_cached(self.n, self.k, cfg, rows, self.k_group)  # noqa: E731
            apply, on_current = _compile(key, make, args)
            if partials:
                sums = [torch.empty(cfg.split_k, rows, n_out, dtype=torch.float32, device=device)]
                sums += [self.tensor_scale] + ([bias] if bias is not None else [])
                add, add_on_current = _compile(
                    ("add_partials", jax_dtype), lambda: reduce_fn(jax_dtype), sums
                )
                apply, on_current = _SplitKLaunch(apply, add), on_current and add_on_current
        return _Launcher(apply, on_current, rows, bias, fold, data, scales)

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d``: contiguous ``[M, K]`` bf16/fp16 CUDA tensor -> ``[M, N]`` of its dtype."""
        _jax_dtype("x2d", x2d.dtype)
        m = x2d.shape[0]
        device = x2d.device
        launcher = self._launchers.get((m, x2d.dtype)) or self._launcher(m, x2d.dtype, device)
        if launcher.rows != m:
            x2d = F.pad(x2d, (0, 0, 0, launcher.rows - m))
        if launcher.k_fold > 1:  # (token, K part) rows
            x2d = x2d.reshape(launcher.rows * launcher.k_fold, self.k // launcher.k_fold)
        args = (x2d, launcher.data, launcher.scales, self.tensor_scale)
        if launcher.bias is not None:
            args += (launcher.bias,)
        if launcher.on_current_stream:
            if device.index == torch.cuda.current_device():
                out = launcher.apply(*args)
            else:  # the kernel module lives in the device's context
                with torch.cuda.device(device):
                    out = launcher.apply(*args)
        else:  # as_torch_kernel launches on the default stream
            current = torch.cuda.current_stream(device)
            default = torch.cuda.default_stream(device)
            if current != default:
                default.wait_stream(current)
            with torch.cuda.device(device):
                out = launcher.apply(*args)
            if current != default:
                current.wait_stream(default)
        if out.shape != (m, self.n):
            out = out[:m, : self.n].contiguous()
        return out
