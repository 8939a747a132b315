"""Weight-only NVFP4 GEMM for Hopper (sm_90), written in Pallas Mosaic GPU.

Computes ``y[M, N] = x[M, K] @ W[K, N]`` where ``x`` is bf16/f16 and ``W`` is
NVFP4: canonical storage ``data`` uint8 ``[N, K/2]`` (two E2M1 codes per byte,
element ``2i`` of a row in the low nibble), ``scales`` float8_e4m3fn
``[N, K/16]`` and a float32 ``tensor_scale`` (a multiplier), so that
``W[k, n] = e2m1(data)[n, k] * scales[n, k // 16] * tensor_scale``.

Hopper has no FP4 tensor cores, so the kernel decodes the weights to the
activation dtype in registers and runs bf16/f16 ``wgmma`` with fp32
accumulation. It uses "swap-AB": each CTA computes the transposed product
``acc[n, m] = W_tile[n, k] . x_tile[m, k]^T`` so that output features fill
wgmma's 64-row M side and the tokens (as few as 8) fill its N side.

Glossary: a *scale block* is the 16 consecutive k that share one E4M3 scale;
a *k-group* is the 64 (``k_group``) consecutive k whose codes are interleaved
into one uint16 lane by :func:`prepare_weight`; a *quarter* is the 16-column
slice of a k-group that one uint16 nibble position covers; a *tile* is the
kernel's unit of work (``tile_n x tile_m`` outputs, ``tile_k`` per step).

Public entry points: :class:`GemmConfig`, :func:`default_config`,
:func:`prepare_weight`, :func:`nvfp4_matmul` and :func:`reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

# Rows of one wgmma instruction on the M side (= output features here).
_WGMMA_ROWS = 64
# Largest wgmma N (= tokens here).
_MAX_TILE_M = 256
# Elements per scale block.
_BLOCK = 16
# Nibbles (codes) per uint16 lane of the prepared data.
_CODES_PER_LANE = 4
# SMEM per CTA on H100 as reported by the Mosaic GPU lowering.
_SMEM_BYTES = 232448

_E2M1_VALUES = np.array(
    [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6],
    dtype=np.float32,
)

AOperand = Literal["registers", "smem"]


# -----------------------------------------------------------------------------
# Configuration
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GemmConfig:
  """Tiling of one kernel launch.

  Attributes:
    tile_n: output features per CTA; 64, 128 or 256. ``tile_n // 64`` compute
      warpgroups (at most 2) each own ``tile_n / num_compute_wgs`` rows.
    tile_m: tokens per CTA (wgmma N); multiple of 8, at most 256. The wrapper
      shrinks it to ``round_up(M, 8)`` when M is smaller.
    tile_k: reduction depth per pipeline step; multiple of the prepared
      weight's ``k_group`` (64).
    stages: SMEM pipeline depth (TMA buffers in flight).
    split_k: number of CTAs that share the K range of one output tile; their
      fp32 partial sums are reduced by a small XLA epilogue.
    a_operand: "registers" feeds the decoded weights to wgmma from registers
      (fast; GPU only); "smem" stores them to swizzled SMEM first (runs in the
      Mosaic GPU interpreter).
  """

  tile_n: int = 128
  tile_m: int = 64
  tile_k: int = 256
  stages: int = 4
  split_k: int = 1
  a_operand: AOperand = "registers"

  def __post_init__(self):
    if self.tile_n not in (64, 128, 256):
      raise ValueError(f"tile_n must be 64, 128 or 256, got {self.tile_n}")
    if self.tile_m % 8 or not 8 <= self.tile_m <= _MAX_TILE_M:
      raise ValueError(f"tile_m must be a multiple of 8 in [8, 256], got {self.tile_m}")
    if self.tile_k % 64 or self.tile_k <= 0:
      raise ValueError(f"tile_k must be a positive multiple of 64, got {self.tile_k}")
    if self.stages < 1:
      raise ValueError(f"stages must be >= 1, got {self.stages}")
    if self.split_k < 1:
      raise ValueError(f"split_k must be >= 1, got {self.split_k}")
    if self.a_operand not in ("registers", "smem"):
      raise ValueError(f"a_operand must be 'registers' or 'smem', got {self.a_operand!r}")

  @property
  def num_compute_wgs(self) -> int:
    return min(2, self.tile_n // _WGMMA_ROWS)

  @property
  def wg_rows(self) -> int:
    return self.tile_n // self.num_compute_wgs


def _get_num_sms() -> int:
  """SM count of the target device; honours an abstract (cross-lowering) mesh."""
  abstract_device = jax.sharding.get_abstract_mesh().abstract_device
  if abstract_device is not None and abstract_device.num_cores:
    return abstract_device.num_cores
  device = jax.devices()[0]
  return getattr(device, "core_count", None) or 132


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _largest_divisor_at_most(n: int, bound: int) -> int:
  return max(d for d in range(1, max(1, min(n, bound)) + 1) if n % d == 0)


def default_config(m: int, n: int, k: int, *, num_sms: int | None = None) -> GemmConfig:
  """Heuristic tiling per shape bucket (decode: M <= 64, prefill: M > 64).

  Decode is bound by streaming the weights: small token tiles, deep K steps
  and split-K so that ``n_tiles * split_k`` covers the SMs. Prefill is bound
  by the tensor cores and the decode ALU work, which is amortized over
  ``tile_m`` tokens: big token tiles, short K steps.
  """
  num_sms = num_sms or _get_num_sms()
  if m <= 64:
    tile_n, tile_k = 128, 256
    k_steps = -(-k // tile_k)
    n_tiles = -(-n // tile_n)
    split_k = _largest_divisor_at_most(k_steps, max(1, num_sms // n_tiles))
    return GemmConfig(tile_n=tile_n, tile_m=_round_up(max(m, 1), 8), tile_k=tile_k,
                      stages=4, split_k=split_k)
  tile_m = 128 if m <= 128 else 256
  return GemmConfig(tile_n=128, tile_m=tile_m, tile_k=64, stages=4, split_k=1)


# -----------------------------------------------------------------------------
# Weight preparation (one-time, pure jnp)
# -----------------------------------------------------------------------------


class PreparedWeight(NamedTuple):
  """Kernel layout of an NVFP4 weight ``W[K, N]``; see :func:`prepare_weight`.

  Attributes:
    data: uint16 ``[K_pad / k_group, N_pad, k_group / 4]``.
    scales: float8_e4m3fn ``[K_pad / 16, N_pad]`` (scale blocks major).
    tensor_scale: float32 ``[1]`` multiplier.
  """

  data: jax.Array
  scales: jax.Array
  tensor_scale: jax.Array

  @property
  def k_group(self) -> int:
    return self.data.shape[2] * _CODES_PER_LANE


def prepare_weight(
    data: jax.Array,
    scales: jax.Array,
    tensor_scale: jax.Array | float,
    *,
    k_group: int = 64,
) -> PreparedWeight:
  """Reorders a canonical NVFP4 weight into the layout the kernel reads.

  Args:
    data: uint8 ``[N, K/2]``, two E2M1 codes per byte (low nibble first).
    scales: float8_e4m3fn ``[N, K/16]``.
    tensor_scale: float32 scalar multiplier.
    k_group: interleaving granule along K (64, 128 or 256). Kernel ``tile_k``
      must be a multiple of it. The x tile in SMEM is swizzled at
      ``k_group / 4`` columns (64 -> 32-byte swizzle).

  Returns:
    A :class:`PreparedWeight` with

    * ``data[g, n, j]`` (uint16): for k-group ``g`` (``k = 64 g + ...`` for
      ``k_group = 64``) and output feature ``n``, nibble ``q`` (bits
      ``4q .. 4q+3``) holds the E2M1 code of ``W[k, n]`` at
      ``k = g * k_group + q * (k_group / 4) + j``. So lane ``j`` of a
      k-group carries the same column ``j`` of its four quarters, and the
      kernel decodes quarter ``q`` of a ``[rows, k_group/4]`` uint16 tile with
      a shift by ``4q``: each quarter is a dense ``[rows, k_group/4]`` wgmma
      operand, multiplied with a contiguous column slice of the x tile.
      ``K_pad = round_up(K, k_group)``; ``N_pad = round_up(N, 16)``; padding
      codes are 0.
    * ``scales[b, n]`` (float8_e4m3fn): the E4M3 scale of block ``b``
      (``k in [16 b, 16 b + 16)``) of feature ``n``, i.e. the canonical scales
      transposed so that one pipeline step reads a ``(tile_k/16, tile_n)``
      box whose rows are per-feature vectors. Padding scales are 0, so padded
      weights contribute nothing.
    * ``tensor_scale``: float32 ``[1]``, applied in the fp32 epilogue.

    Tiles that overhang ``N_pad``/``K_pad`` are zero-filled by TMA.
  """
  if data.ndim != 2 or data.dtype != jnp.uint8:
    raise ValueError(f"data must be uint8 [N, K/2], got {data.dtype}{list(data.shape)}")
  n, half_k = data.shape
  k = 2 * half_k
  if scales.shape != (n, k // _BLOCK) or k % _BLOCK:
    raise ValueError(
        f"scales must be [N, K/16] = {[n, k // _BLOCK]} with K % 16 == 0, got"
        f" {list(scales.shape)} for data {list(data.shape)}")
  if k_group not in (64, 128, 256):
    raise ValueError(f"k_group must be 64, 128 or 256, got {k_group}")
  k_pad = _round_up(k, k_group)
  n_pad = _round_up(n, 16)
  lanes = k_group // _CODES_PER_LANE

  codes = jnp.stack([data & 0xF, data >> 4], axis=-1).reshape(n, k)
  codes = jnp.pad(codes, ((0, n_pad - n), (0, k_pad - k))).astype(jnp.uint16)
  codes = codes.reshape(n_pad, k_pad // k_group, _CODES_PER_LANE, lanes)
  packed = functools.reduce(
      jnp.bitwise_or,
      [codes[:, :, q, :] << (4 * q) for q in range(_CODES_PER_LANE)])
  packed = packed.transpose(1, 0, 2)  # [K_pad / k_group, N_pad, lanes]

  s = scales.astype(jnp.float8_e4m3fn)
  s = jnp.pad(s, ((0, n_pad - n), (0, (k_pad - k) // _BLOCK))).T
  ts = jnp.asarray(tensor_scale, jnp.float32).reshape(1)
  return PreparedWeight(packed, s, ts)


# -----------------------------------------------------------------------------
# In-kernel decode (shared by both A-operand paths)
# -----------------------------------------------------------------------------


def _decode_quarter(lanes: jax.Array, q: int, dtype) -> jax.Array:
  """Decodes nibble ``q`` of uint16 ``lanes [R, C]`` into ``dtype [R, C]``.

  Exact for every code and free of subnormals (so XLA:CPU's flush-to-zero
  does not matter). With ``em`` the 3-bit magnitude code and ``s`` the
  mantissa width minus one (6 for bf16, 9 for f16), ``(em << s) + bits(0.5)``
  is the bit pattern of ``2^(e-1) * (1 + m/2)``, the E2M1 value of every
  ``em >= 2``; ``em`` in {0, 1} (0 and the E2M1 subnormal 0.5) are selected.
  The code's sign bit (bit 3) moves to bit 15.
  """
  mant_shift = jnp.finfo(dtype).nmant - 1
  half = np.uint16(np.array(0.5, dtype).view(np.uint16))
  code = lanes >> np.uint16(4 * q) if q else lanes
  em = code & np.uint16(7)
  normal = (em << np.uint16(mant_shift)) + half
  subnormal = jnp.where(em == 0, np.uint16(0), half)
  bits = jnp.where(em < 2, subnormal, normal)
  bits = bits | ((code & np.uint16(8)) << np.uint16(12))
  return lax.bitcast_convert_type(bits, dtype)


def _swizzle_transforms(minor_elems: int, dtype) -> tuple:
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor_elems * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)),
          plgpu.SwizzleTransform(swizzle))


# -----------------------------------------------------------------------------
# The kernel
# -----------------------------------------------------------------------------


def _gemm_kernel(
    data_gmem, scales_gmem, x_gmem, ts_gmem, bias_gmem,  # inputs
    out_gmem,  # output
    a_smem, o_smem, bias_smem, bias_barrier,  # scratch
    *, cfg: GemmConfig, tile_m: int, k_group: int, k_steps: int, dtype,
    fused_epilogue: bool,
):
  """One CTA: output tile (n, m), K range of split s.

  Refs (GMEM): data uint16 [K_pad/kg, N_pad, kg/4]; scales e4m3 [K_pad/16,
  N_pad]; x [M, K]; ts f32 [1]; bias [N_pad] or None; out [M, N_out]
  (``fused_epilogue``) or f32 partials [split_k, M, N_out].
  """
  num_wgs, rows = cfg.num_compute_wgs, cfg.wg_rows
  lanes = k_group // _CODES_PER_LANE  # columns of one quarter
  groups_per_step = cfg.tile_k // k_group
  quarters = cfg.tile_k // lanes
  blocks_per_quarter = lanes // _BLOCK

  n_idx = lax.axis_index("n")
  m_idx = lax.axis_index("m")
  s_idx = lax.axis_index("s")
  wg = lax.axis_index("wg")
  k0 = s_idx * k_steps  # first pipeline step of this split

  data_spec = plgpu.BlockSpec(
      (groups_per_step, cfg.tile_n, lanes),
      lambda k: (k0 + k, n_idx, 0),
      transforms=_swizzle_transforms(lanes, jnp.uint16),
  )
  scales_spec = plgpu.BlockSpec(
      (cfg.tile_k // _BLOCK, cfg.tile_n), lambda k: (k0 + k, n_idx))
  x_spec = plgpu.BlockSpec(
      (tile_m, cfg.tile_k),
      lambda k: (m_idx, k0 + k),
      transforms=_swizzle_transforms(lanes, dtype),
  )
  row_slice = pl.ds(wg * rows, rows)

  def decode(w_smem, s_smem, quarter):
    """The dequantized weights of one quarter: dtype [rows, lanes], WGMMA layout."""
    g, q = divmod(quarter, _CODES_PER_LANE)
    w = w_smem[g, row_slice, :]
    a = _decode_quarter(w, q, dtype)
    parts = []
    for b in range(blocks_per_quarter):
      block = quarter * blocks_per_quarter + b
      s = plgpu.load(s_smem.at[block, row_slice], layout=plgpu.Layout.WGMMA.reduce(1))
      s = s.astype(jnp.float32).astype(dtype)
      s = plgpu.layout_cast(lax.broadcast_in_dim(s, (rows, _BLOCK), (0,)),
                            plgpu.Layout.WGMMA)
      parts.append(a[:, b * _BLOCK:(b + 1) * _BLOCK] * s)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

  def mma_body(_, w_smem, s_smem, x_smem, acc_ref):
    for quarter in range(quarters):
      a = decode(w_smem, s_smem, quarter)
      x_t = x_smem.at[:, pl.ds(quarter * lanes, lanes)].T
      if cfg.a_operand == "smem":
        a_ref = a_smem.at[wg, quarter]
        a_ref[...] = a
        plgpu.commit_smem()
        plgpu.wgmma(acc_ref, a_ref, x_t)
      else:
        plgpu.wgmma(acc_ref, a, x_t)
    plgpu.wgmma_wait(0)
    return acc_ref

  def epilogue(acc):
    """acc: f32 [rows, tile_m] (WGMMA layout) -> transposed TMA store."""
    n0 = n_idx * cfg.tile_n + wg * rows
    if fused_epilogue:
      acc = acc * ts_gmem[0]
      if bias_gmem is not None:
        plgpu.barrier_wait(bias_barrier.at[wg])
        bias = plgpu.load(bias_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        bias = lax.broadcast_in_dim(bias.astype(jnp.float32), acc.shape, (0,))
        acc = acc + plgpu.layout_cast(bias, plgpu.Layout.WGMMA)
      dst = out_gmem.at[pl.ds(m_idx * tile_m, tile_m), pl.ds(n0, rows)]
    else:
      dst = out_gmem.at[s_idx, pl.ds(m_idx * tile_m, tile_m), pl.ds(n0, rows)]
    o_ref = o_smem.at[wg]
    o_ref.T[...] = plgpu.layout_cast(acc.astype(o_smem.dtype),
                                     plgpu.Layout.WGMMA_TRANSPOSED)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_ref, dst)
    plgpu.wait_smem_to_gmem(0)

  def compute_context(eval_pipeline):
    if fused_epilogue and bias_gmem is not None:  # overlaps with the main loop
      plgpu.copy_gmem_to_smem(
          bias_gmem.at[pl.ds(n_idx * cfg.tile_n + wg * rows, rows)],
          bias_smem.at[wg], bias_barrier.at[wg])

    def acc_scope(acc_ref):
      eval_pipeline(acc_ref)
      return acc_ref[...]
    epilogue(pl.run_scoped(acc_scope, plgpu.ACC((rows, tile_m), jnp.float32)))

  plgpu.emit_pipeline_warp_specialized(
      mma_body,
      grid=(k_steps,),
      memory_registers=40,
      in_specs=[data_spec, scales_spec, x_spec],
      wg_axis="wg",
      num_compute_wgs=num_wgs,
      max_concurrent_steps=min(cfg.stages, k_steps),
      compute_context=compute_context,
  )(data_gmem, scales_gmem, x_gmem)


def smem_bytes(cfg: GemmConfig, tile_m: int, dtype, out_dtype, k_group: int = 64) -> int:
  """Approximate SMEM footprint of one CTA (pipeline buffers + scratch)."""
  itemsize = jnp.dtype(dtype).itemsize
  stage = (cfg.tile_n * cfg.tile_k // 2  # packed codes
           + cfg.tile_n * cfg.tile_k // _BLOCK  # e4m3 scales
           + tile_m * cfg.tile_k * itemsize)  # activations
  out = cfg.num_compute_wgs * tile_m * cfg.wg_rows * jnp.dtype(out_dtype).itemsize
  a = cfg.tile_n * cfg.tile_k * itemsize if cfg.a_operand == "smem" else 0
  return min(cfg.stages, 1 << 30) * stage + out + a


@functools.partial(
    jax.jit,
    static_argnames=("n", "k", "out_dtype", "config", "interpret"))
def nvfp4_matmul(
    x2d: jax.Array,
    prepared: PreparedWeight,
    *,
    n: int,
    k: int,
    bias: jax.Array | None = None,
    out_dtype=None,
    config: GemmConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
  """``x2d[M, K] @ W[K, N] (* tensor_scale) (+ bias)`` with an NVFP4 weight.

  Args:
    x2d: bf16 or f16 ``[M, K]``.
    prepared: the output of :func:`prepare_weight` for ``W`` (``N`` features,
      ``K`` inputs).
    n, k: the logical N and K of the weight.
    bias: optional ``[N]``, added in fp32.
    out_dtype: bf16 or f16; defaults to ``x2d.dtype``.
    config: tiling; :func:`default_config` when None.
    interpret: run in the Mosaic GPU CPU interpreter (requires
      ``config.a_operand == "smem"``).

  Returns:
    ``[M, N]`` in ``out_dtype``; fp32 accumulation.
  """
  if x2d.ndim != 2 or x2d.shape[1] != k:
    raise ValueError(f"x2d must be [M, {k}], got {list(x2d.shape)}")
  dtype = x2d.dtype
  if dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"x2d must be bf16 or f16, got {dtype}")
  out_dtype = jnp.dtype(out_dtype or dtype)
  if out_dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"out_dtype must be bf16 or f16, got {out_dtype}")
  k_group = prepared.k_group
  k_pad = prepared.data.shape[0] * k_group
  n_pad = prepared.data.shape[1]
  if n_pad != _round_up(n, 16) or k_pad != _round_up(k, k_group):
    raise ValueError(
        f"prepared weight {prepared.data.shape} does not match n={n}, k={k}")
  if bias is not None and bias.shape != (n,):
    raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
  m = x2d.shape[0]
  cfg = config or default_config(m, n, k)
  if cfg.tile_k % k_group:
    raise ValueError(f"tile_k={cfg.tile_k} must be a multiple of k_group={k_group}")
  if interpret and cfg.a_operand != "smem":
    raise NotImplementedError(
        "the Mosaic GPU interpreter cannot run register-operand wgmma; use"
        " GemmConfig(a_operand='smem') with interpret=True")

  m_out = m
  if m > 8 and m % 8:  # TMA of (8, .)-tiled GMEM views needs M % 8 == 0
    m_out = _round_up(m, 8)
    x2d = jnp.pad(x2d, ((0, m_out - m), (0, 0)))
  tile_m = min(cfg.tile_m, _round_up(max(m, 1), 8))
  m_tiles = -(-m // tile_m)
  n_tiles = -(-n // cfg.tile_n)
  total_k_steps = -(-k // cfg.tile_k)
  if total_k_steps % cfg.split_k:
    raise ValueError(
        f"split_k={cfg.split_k} must divide the number of K steps {total_k_steps}")
  k_steps = total_k_steps // cfg.split_k
  fused = cfg.split_k == 1

  # TMA needs 16-byte GMEM strides: pad the output's minor dim if needed.
  store_dtype = out_dtype if fused else jnp.dtype(jnp.float32)
  n_out = _round_up(n, 16 // store_dtype.itemsize)
  if fused and bias is not None:
    bias = jnp.pad(bias, (0, n_tiles * cfg.tile_n - n))
  out_shape = (m_out, n_out) if fused else (cfg.split_k, m_out, n_out)

  num_wgs, rows = cfg.num_compute_wgs, cfg.wg_rows
  lanes = k_group // _CODES_PER_LANE
  scratch = [plgpu.SMEM((num_wgs, tile_m, rows), store_dtype)]
  if cfg.a_operand == "smem":
    scratch.append(plgpu.SMEM((num_wgs, cfg.tile_k // lanes, rows, lanes), dtype,
                              transforms=_swizzle_transforms(lanes, dtype)))
  has_bias = bias is not None
  if has_bias and fused:
    scratch += [plgpu.SMEM((num_wgs, rows), bias.dtype),
                plgpu.Barrier(num_barriers=num_wgs)]

  def kernel_body(*refs):
    data, scales, x, ts, *refs = refs
    bias_ref = refs.pop(0) if has_bias else None
    out, o_smem, *refs = refs
    a_smem = refs.pop(0) if cfg.a_operand == "smem" else None
    bias_smem, bias_barrier = refs if refs else (None, None)
    _gemm_kernel(
        data, scales, x, ts, bias_ref, out, a_smem, o_smem, bias_smem,
        bias_barrier, cfg=cfg, tile_m=tile_m, k_group=k_group, k_steps=k_steps,
        dtype=dtype, fused_epilogue=fused)

  kernel = plgpu.kernel(
      kernel_body,
      out_type=jax.ShapeDtypeStruct(out_shape, store_dtype),
      scratch_types=scratch,
      grid=(n_tiles, m_tiles, cfg.split_k),
      grid_names=("n", "m", "s"),
      num_threads=num_wgs + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )
  args = (prepared.data, prepared.scales, x2d, prepared.tensor_scale)
  out = kernel(*args) if bias is None else kernel(*args, bias)
  if not fused:
    out = out.sum(axis=0) * prepared.tensor_scale[0]
    if bias is not None:
      out = out + bias.astype(jnp.float32)
    out = out.astype(out_dtype)
  if (m_out, n_out) != (m, n):
    out = out[:m, :n]
  return out


# -----------------------------------------------------------------------------
# Reference
# -----------------------------------------------------------------------------


def dequantize_reference(data, scales, tensor_scale) -> jax.Array:
  """Canonical NVFP4 ``[N, K/2]`` -> float32 ``W^T [N, K]`` (plain jnp)."""
  n, half_k = data.shape
  codes = jnp.stack([data & 0xF, data >> 4], axis=-1).reshape(n, 2 * half_k)
  values = jnp.asarray(_E2M1_VALUES)[codes]
  s = jnp.repeat(scales.astype(jnp.float32), _BLOCK, axis=1)
  return values * (s * jnp.asarray(tensor_scale, jnp.float32))


def reference(x2d, data, scales, tensor_scale, *, bias=None, out_dtype=None):
  """Same contract as :func:`nvfp4_matmul`, on canonical storage, in plain jnp."""
  w_t = dequantize_reference(data, scales, tensor_scale)
  y = jnp.dot(x2d.astype(jnp.float32), w_t.T, precision=lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(out_dtype or x2d.dtype)
