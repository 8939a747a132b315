"""NVFP4 quantization kernels for Hopper, written in Pallas Mosaic GPU (``plgpu.kernel``).

Public functions (the numeric contract is vLLM's reference quantizer, see ``reference.py``):

* ``quantize(x, global_scale, *, swizzled=False)`` -> ``(packed uint8 [..., K/2],
  scales float8_e4m3fn [..., K/16])``, or with ``swizzled=True`` the scales in CUTLASS's
  128x4 layout ``[..., round_up(R, 128), round_up(K/16, 4)]`` (zero padded).
* ``quant_dequant(x, global_scale)`` -> NVFP4-rounded ``x`` (same shape and dtype), one pass.

``x`` is bf16, fp16 or fp32 ``[..., K]`` with ``K % 16 == 0``. ``global_scale`` is the
quantize-direction float32 scale (``448*6/amax``): a scalar, or one value per leading batch
entry (shape = a prefix of ``x.shape[:-1]``).

How the kernels see the data (all views are free reshapes/bitcasts done by XLA outside):

* The rows of ``x`` are flattened to ``[B, R, K]`` (``B`` = number of global scales).
* 16-bit input is viewed as ``uint32 [B, R, KB, 8]`` (``KB = K/16`` scale blocks): one row
  of the last axis is one 16-element scale block, and each word holds elements ``2i`` (low
  half) and ``2i+1`` (high half), so a packed FP4 byte is ``code(lo) | code(hi) << 4``.
  fp32 input is viewed as ``uint32 [B, R, KB, 16]``.
* Every thread of the single warpgroup owns whole scale blocks (``block_layout``): the
  block amax is a reduction inside one thread, with no shuffles and no shared memory.
* Work unit ("tile"): ``tr`` rows x ``tc`` blocks, processed as sub-tiles of 128 blocks
  (``rs x cs`` = 32 x 4, or 128 x 1 when K < 64). One CTA per tile (grid over tiles and
  batch). Loads go straight from GMEM to registers (32-byte vectors per thread, all issued
  before any math), stores straight from registers to GMEM; no SMEM, no barriers.
* Ragged edges: the last tile in each dimension is shifted back so that it ends at the array
  edge (it overlaps its neighbour, which writes identical bytes), so every access is in
  bounds and needs no masking. Arrays smaller than one sub-tile are zero padded here.
* Swizzled scales are written directly by the kernel when ``R % 128 == 0`` and
  ``K % 64 == 0`` (then a 32x4 sub-tile is one ``[:, k, :]`` slice of a 512-byte swizzle
  atom viewed as ``[32, 4, 4]``). Other shapes quantize with plain scales and swizzle them
  with XLA (one extra pass over the scales, 1/32 of the input bytes for bf16).
* Bit-exactness: the float ops run in the recipe's order with IEEE semantics on both the
  GPU and the interpreter (see ``pin`` and ``div_rn``); E2M1 rounding uses an exact
  magic-number FMA (``e2m1_magnitude``). Inputs whose global scale makes ``1/gs`` or the
  block reciprocal subnormal or infinite (``gs`` beyond ~1e37) are outside the contract,
  and subnormal bf16/fp32 inputs are flushed by XLA on CPU (interpreter only).

Measured on an H100 (8192 x 8192, one kernel launch each, copy ceiling 2.89 TB/s r+w):
quantize bf16 65.7 us (90.6% of the ceiling), fp16 88.6%, fp32 101%; with swizzled scales
89.1%; quant_dequant bf16 99.0%, fp32 85.2%. The XLA reference quantizer takes 150 us.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith

from nvfp4_jax import layouts

BLOCK = 16
E4M3_MAX = 448.0
_SUPPORTED = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Work per CTA: ``row_subtiles x col_subtiles`` sub-tiles of 128 scale blocks.

    A sub-tile is 32 rows x 4 blocks (K >= 64) or 128 rows x 1 block. Larger tiles put more
    bytes in flight per thread (each thread loads 32 B of bf16 per sub-tile) at the cost of
    registers.
    """

    row_subtiles: int = 4
    col_subtiles: int = 1

    def __post_init__(self):
        if self.row_subtiles < 1 or self.col_subtiles < 1:
            raise ValueError(f"sub-tile counts must be positive, got {self}")


# Measured on an H100 (8192 x 8192 bf16, see the report in the module notes): quantize
# 8x1 65.6 us (4x1 67.6, 2x2 69.5, 1x1 82.1); quant_dequant 4x1 93.6 us (1x1 108.7).
DEFAULT_CONFIG = TileConfig()
QUANTIZE_CONFIG = TileConfig(8, 1)


# -- helpers shared with dequantize.py -------------------------------------------------------


def interpret_params(interpret: Any):
    """``interpret`` argument -> ``plgpu.kernel``'s: False/None, True, or InterpretGPUParams."""
    if interpret is None or interpret is False:
        return None
    if interpret is True:
        return plgpu.InterpretGPUParams()
    return interpret


def tiled_layout(shape, tile, warp_dims, lane_dims, reduce_axes: tuple[int, ...] = ()):
    """A ``plgpu.Layout.TILED`` register layout: ``shape`` tiled by ``tile``, the tiled dims
    ``warp_dims`` / ``lane_dims`` spread over warps / lanes, the last dim vectorised per
    thread. ``reduce_axes``: the layout of the array reduced over those axes (reduced lane
    dims become replicated lanes)."""
    lay = mgpu_fa.TiledLayout(
        mgpu_fa.Tiling((tuple(shape), tuple(tile))),
        warp_dims=warp_dims,
        lane_dims=lane_dims,
        vector_dim=-1,
        _check_canonical=False,
    ).canonicalize()
    if reduce_axes:
        lay = lay.reduce(reduce_axes)
    return plgpu.Layout.TILED(
        lay.tiling, warp_dims=lay.warp_dims, lane_dims=lay.lane_dims, vector_dim=lay.vector_dim
    )


def block_layout(shape: tuple[int, ...], reduce_axes: tuple[int, ...] = ()):
    """Register layout for ``[rs, cs, *tail]`` arrays in which each of the 128 threads owns
    one ``(row, block)`` pair and its whole ``tail`` (the last tail axis vectorised).

    Warps split the rows in 4 groups of ``rs/4``; lanes take ``rs/4 x cs`` pairs (row-major).
    ``reduce_axes`` gives the layout of the array reduced over those (tail) axes.
    """
    rs, cs, *tail = shape
    n = len(shape)
    lanes = (-n, -(n - 1)) if cs > 1 else (-n,)
    return tiled_layout(shape, (rs // 4, cs, *tail), (-2 * n,), lanes, reduce_axes)


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Static tiling of a ``[batch, rows, kb]`` grid of scale blocks."""

    batch: int
    rows: int
    kb: int
    rs: int  # sub-tile rows
    cs: int  # sub-tile blocks
    tr: int  # tile rows
    tc: int  # tile blocks

    @property
    def n_r(self) -> int:
        return -(-self.rows // self.tr)

    @property
    def n_c(self) -> int:
        return -(-self.kb // self.tc)

    @property
    def grid(self) -> int:
        return self.batch * self.n_r * self.n_c

    def origin(self, item):
        """Tile index -> (batch, first row, first block); edge tiles are shifted back in bounds."""
        per_batch = self.n_r * self.n_c
        b = item // per_batch
        rem = item % per_batch
        i, j = rem // self.n_c, rem % self.n_c
        r0 = jnp.minimum(i * self.tr, self.rows - self.tr)
        c0 = jnp.minimum(j * self.tc, self.kb - self.tc)
        return b, r0, c0

    def subtiles(self, r0, c0):
        for i in range(self.tr // self.rs):
            for j in range(self.tc // self.cs):
                yield r0 + i * self.rs, c0 + j * self.cs


def subtile_shape(kb: int) -> tuple[int, int]:
    """(rows, blocks) of a 128-block sub-tile: 32 x 4 when possible, else 128 x 1."""
    return (32, 4) if kb >= 4 else (128, 1)


def make_plan(
    batch: int, rows: int, kb: int, config: TileConfig, subtile: tuple[int, int] | None = None
) -> TilePlan:
    """Assumes ``rows >= rs`` (callers pad smaller arrays). ``subtile``: (rows, blocks) of a
    sub-tile, default :func:`subtile_shape`."""
    rs, cs = subtile or subtile_shape(kb)
    assert rows >= rs and kb >= cs, (rows, kb)
    tr = rs * max(1, min(config.row_subtiles, rows // rs))
    tc = cs * max(1, min(config.col_subtiles, kb // cs))
    return TilePlan(batch, rows, kb, rs, cs, tr, tc)


def kernel_call(body, plan: TilePlan, out_type, interpret, name: str):
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(plan.grid,),
        grid_names=("tile",),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane,
            # Every thread reads and writes only its own blocks: no barriers needed.
            unsafe_no_auto_barriers=True,
        ),
        interpret=interpret_params(interpret),
        kernel_name=name,
    )


def swizzle_supported(rows: int, kb: int) -> bool:
    """Whether the kernels read/write the 128x4 swizzled scale layout directly."""
    return rows % 128 == 0 and kb % 4 == 0


def swizzled_view_shape(batch: int, rows: int, kb: int) -> tuple[int, ...]:
    """``[B, R_pad, C_pad]`` swizzled scales viewed as ``[B, R_pad/128, C_pad/4, 32, 4, 4]``:
    ``[.., rg, cq, r % 32, (r // 32) % 4, c % 4]`` is the scale of row ``128 rg + r``,
    block ``4 cq + c``."""
    return (batch, -(-rows // 128), -(-kb // 4), 32, 4, 4)


def swizzled_ref_at(ref, b, r, c):
    """The ``[32, 4]`` slice of a swizzled view for the sub-tile at row ``r``, block ``c``."""
    return ref.at[b, r // 128, c // 4, :, (r // 32) % 4, :]


def split_batch(x_shape, gs_shape) -> tuple[int, int]:
    """(B, R): the global scale's shape is a prefix of the row dims ``x.shape[:-1]``."""
    lead = tuple(x_shape[:-1])
    if tuple(gs_shape) != lead[: len(gs_shape)]:
        raise ValueError(
            f"global/tensor scale of shape {tuple(gs_shape)} must be a scalar or match the "
            f"leading dims of {tuple(x_shape)}"
        )
    return math.prod(gs_shape), math.prod(lead[len(gs_shape) :])


def e2m1_magnitude(a):
    """|v| (float32, >= 0, finite) -> E2M1 magnitude code 0..7, round-half-even, saturating.

    E2M1 magnitudes are integers n / k with k = 2 on [0, 2), 1 on [2, 4) and 1/2 on [4, 6],
    and the code is n + (0, 2, 4) there. ``a * k + 2^23`` rounds ``a * k`` to the nearest
    integer, ties to even (``a * k`` is exact, so a fused multiply-add gives the same bits),
    and leaves it in the low mantissa bits: ~7 instructions instead of 7 compare-and-adds.
    Non-finite ``a`` gives garbage; callers mask non-finite blocks.
    """
    a = jnp.minimum(a, np.float32(6.0))
    small, mid = a < np.float32(2.0), a < np.float32(4.0)
    k = jnp.where(small, np.float32(2.0), jnp.where(mid, np.float32(1.0), np.float32(0.5)))
    bias = jnp.where(small, jnp.uint32(0), jnp.where(mid, jnp.uint32(2), jnp.uint32(4)))
    rounded = lax.bitcast_convert_type(a * k + np.float32(2.0**23), jnp.uint32)
    return rounded - jnp.uint32(0x4B000000) + bias


def minor_iota(shape, layout, interpret: bool):
    """uint32 iota along the last axis, which ``layout`` vectorises in full.

    ``plgpu.broadcasted_iota`` computes every element's index from the thread index with
    integer divisions; here each register is the constant vector ``[0, 1, ..., n-1]``.
    """
    if interpret:
        return plgpu.broadcasted_iota(jnp.uint32, shape, len(shape) - 1, layout=layout)

    @plgpu.inline_mgpu(return_type=plgpu.ShapeDtypeStruct(shape, jnp.uint32, layout=layout))
    def _iota(_):
        lay = layout.to_mgpu()
        n = shape[-1]
        assert lay.vector_length == n, (lay, shape)
        i32 = ir.IntegerType.get_signless(32)
        vec_ty = ir.VectorType.get((n,), i32)
        vec = arith.constant(
            vec_ty, ir.DenseElementsAttr.get(np.arange(n, dtype=np.int32), type=vec_ty)
        )
        regs = np.full(lay.registers_shape(shape), vec, dtype=object)
        return mgpu_fa.FragmentedArray(_registers=regs, _layout=lay, _is_signed=False)

    return _iota()


def e2m1_decode_bits(code):
    """E2M1 code (uint32, bits 0..3) -> float32 bit pattern of its value (exact, no
    subnormals): magnitudes 0 and 0.5 by a multiply, the rest as 2^e (1 + m/2)."""
    m = code & 7
    mag = jnp.where(m < 2, m * jnp.uint32(0x3F000000), (m << 22) + jnp.uint32(0x3F000000))
    return mag | ((code & 8) << 28)


def pin(v):
    """Keep the float op order exactly as written.

    In interpret mode the kernel body runs through XLA, whose algebraic simplifier rewrites
    ``g * (a * c)`` into ``a * (g * c)`` and ``a / g`` into ``a * (1 / g)`` when ``g`` is a
    broadcast scalar: not IEEE-exact. An optimization barrier stops it; on the GPU (Mosaic
    emits the ops in order anyway) it costs no instruction.
    """
    return lax.optimization_barrier(v)


def div_rn(a, b, layout, interpret: bool):
    """IEEE (correctly rounded) float32 ``a / b`` for arrays of one ``layout``.

    A plain ``/`` is not IEEE in either place the kernel runs: on an H100 it came out 1 ulp
    off (the NVPTX backend is configured for a fast, non-IEEE f32 division), and in the
    interpreter XLA rewrites ``a / broadcast(g)`` into ``a * (1 / g)``. On the GPU this emits
    ``div.rn.f32`` (inline PTX); in the interpreter an XLA division whose divisor is hidden
    behind an optimization barrier.
    """
    shape = jnp.shape(a)
    a = jnp.broadcast_to(a, shape)
    b = jnp.broadcast_to(b, shape)
    if interpret:
        return a / pin(b)

    @plgpu.inline_mgpu(
        arg_types=(layout, layout),
        return_type=plgpu.ShapeDtypeStruct(shape, jnp.float32, layout=layout),
    )
    def _div(_, x, y):
        return x._pointwise(mgpu_fa.FragmentedArray._lift_fast_instr("div.rn.f32"), y)

    return _div(plgpu.layout_cast(a, layout), plgpu.layout_cast(b, layout))


def e4m3_to_f32(s):
    # float8 -> float32 goes through f16 (the hardware convert on sm_89+).
    return s.astype(jnp.float16).astype(jnp.float32)


def half_bits_to_f32(bits, dtype):
    """16-bit float bit patterns held in the low half of uint32 -> float32 values."""
    if dtype == jnp.bfloat16:
        return lax.bitcast_convert_type(bits << 16, jnp.float32)
    h = lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16)
    return h.astype(jnp.float32)


def f32_to_half_bits(v, dtype):
    """float32 -> RNE-rounded 16-bit float, its bits in the low half of uint32."""
    return lax.bitcast_convert_type(v.astype(dtype), jnp.uint16).astype(jnp.uint32)


# -- the quantizer --------------------------------------------------------------------------


def _block_scale(amax, nonfinite, gs, inv_gs, *, layout, interpret):
    """Per-block E4M3 scale and the reciprocal that maps the block onto [-6, 6]."""
    one = jnp.ones(amax.shape, jnp.float32)
    sf = gs * pin(amax * np.float32(1.0 / 6.0))
    sf = jnp.where(nonfinite, np.float32(np.nan), jnp.minimum(sf, np.float32(E4M3_MAX)))
    scale = sf.astype(jnp.float8_e4m3fn)
    s32 = e4m3_to_f32(scale)
    den = s32 * inv_gs
    safe = jnp.where(den == 0, one, den)
    inv = jnp.where(den == 0, np.float32(0.0), div_rn(one, safe, layout, interpret))
    return scale, s32, inv


def _quantize_subtile(w, gs, inv_gs, ts, *, dtype, want_codes, want_values, interpret):
    """One sub-tile of raw input words -> (packed codes, e4m3 scales, fake-quant words).

    16-bit: ``w`` is uint32 ``[rs, cs, 8]``; fp32: ``w`` is uint32 ``[rs, cs, 16]``.
    """
    shape = w.shape
    lay = block_layout(shape)
    bcast = lambda v: plgpu.layout_cast(lax.broadcast_in_dim(v, shape, (0, 1)), lay)
    if dtype == jnp.float32:
        mags = (w & 0x7FFFFFFF,)
        signs = (w >> 28) & 8
        amax_bits = jnp.max(mags[0], axis=2)
        nonfinite = amax_bits >= 0x7F800000
        amax = lax.bitcast_convert_type(amax_bits, jnp.float32)
        to_f32 = lambda m: lax.bitcast_convert_type(m, jnp.float32)
    else:
        mags = (w & 0x7FFF, (w >> 16) & 0x7FFF)  # |element 2i|, |element 2i+1|
        signs = ((w >> 12) & 8) | ((w >> 24) & 0x80)  # their sign bits at bits 3 and 7
        amax_bits = jnp.max(jnp.maximum(*mags), axis=2)  # integer max == float max for |x|
        nonfinite = amax_bits >= (0x7F80 if dtype == jnp.bfloat16 else 0x7C00)
        amax = half_bits_to_f32(amax_bits, dtype)
        to_f32 = lambda m: half_bits_to_f32(m, dtype)
    block_lay = block_layout(shape, (2,))
    scale, s32, inv = _block_scale(
        amax, nonfinite, gs, inv_gs, layout=block_lay, interpret=interpret
    )
    inv_b = bcast(inv)
    bad = bcast(nonfinite)
    codes = [e2m1_magnitude(to_f32(m) * inv_b) for m in mags]

    packed = values = None
    if want_codes:
        if dtype == jnp.float32:
            # Pair elements (2i, 2i+1) into bytes and bytes into little-endian words with a
            # shift-and-sum over the 8 elements of each half block.
            code = jnp.where(bad, jnp.uint32(0), codes[0] | signs)
            col = minor_iota(shape, lay, interpret)
            shifted = code << ((col & 7) * 4)
            zero = jnp.zeros(shape, jnp.uint32)
            words = [jnp.sum(jnp.where((col >> 3) == h, shifted, zero), axis=2) for h in (0, 1)]
            out_shape = shape[:2] + (2,)
            out_lay = block_layout(out_shape)
            half = minor_iota(out_shape, out_lay, interpret)
            wb = [
                plgpu.layout_cast(lax.broadcast_in_dim(v, out_shape, (0, 1)), out_lay)
                for v in words
            ]
            packed = jnp.where(half == 0, wb[0], wb[1])
        else:
            code = codes[0] | (codes[1] << 4) | signs
            packed = jnp.where(bad, jnp.uint32(0), code).astype(jnp.uint8)
    if want_values:
        # e2m1 * (float32(s) * tensor_scale), or vLLM's e2m1 * (float32(s) / gs), rounded once.
        dq = bcast(pin(div_rn(s32, gs, block_lay, interpret) if ts is None else s32 * ts))
        if dtype == jnp.float32:
            code = jnp.where(bad, jnp.uint32(0), codes[0] | signs)
            values = lax.bitcast_convert_type(e2m1_decode_bits(code), jnp.float32) * dq
        else:
            halves = []
            for k, c in enumerate(codes):
                c = jnp.where(bad, jnp.uint32(0), c | ((signs >> (4 * k)) & 8))
                v = lax.bitcast_convert_type(e2m1_decode_bits(c), jnp.float32) * dq
                halves.append(f32_to_half_bits(v, dtype))
            values = halves[0] | (halves[1] << 16)
    return packed, scale, values


def _input_words(x: jax.Array, batch: int, rows: int) -> jax.Array:
    """``x [..., K]`` -> uint32 ``[B, R, KB, 8]`` (16-bit) or ``[B, R, KB, 16]`` (fp32)."""
    kb = x.shape[-1] // BLOCK
    if x.dtype == jnp.float32:
        return lax.bitcast_convert_type(x, jnp.uint32).reshape(batch, rows, kb, 16)
    return lax.bitcast_convert_type(x.reshape(batch, rows, kb, 8, 2), jnp.uint32)


def _check_input(x, global_scale):
    x = jnp.asarray(x)
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] % BLOCK or x.shape[-1] == 0:
        raise ValueError(
            f"x must have a last dimension that is a positive multiple of 16, got {x.shape}"
        )
    gs = jnp.asarray(global_scale, jnp.float32)
    split_batch(x.shape, gs.shape)  # validates the shape
    return x, gs


def _pad_rows(words, rows, kb):
    """Zero-pad arrays smaller than one sub-tile (tiny inputs only)."""
    rs, _ = subtile_shape(kb)
    if rows >= rs:
        return words, rows
    pad = [(0, 0)] * words.ndim
    pad[1] = (0, rs - rows)
    return jnp.pad(words, pad), rs


@functools.partial(jax.jit, static_argnames=("mode", "swizzled", "interpret", "config"))
def _quantize_impl(x, gs, ts, *, mode, swizzled, interpret, config):
    """``mode``: "quantize" -> (packed, scales), "quant_dequant" -> values (x's shape)."""
    dtype = x.dtype
    batch, rows = split_batch(x.shape, gs.shape)
    gs_lead = gs.shape
    gs = gs.reshape(batch)
    scale_args = (gs,) if ts is None else (gs, ts.reshape(batch))
    kb = x.shape[-1] // BLOCK
    words, prows = _pad_rows(_input_words(x, batch, rows), rows, kb)
    plan = make_plan(batch, prows, kb, config)
    want_codes = mode == "quantize"
    direct_swizzle = want_codes and swizzled and swizzle_supported(rows, kb)
    is_f32 = dtype == jnp.float32

    out_type = []
    if want_codes:
        out_type.append(
            jax.ShapeDtypeStruct((batch, prows, kb, 2), jnp.uint32)
            if is_f32
            else jax.ShapeDtypeStruct((batch, prows, kb, 8), jnp.uint8)
        )
        out_type.append(
            jax.ShapeDtypeStruct(
                swizzled_view_shape(batch, prows, kb) if direct_swizzle else (batch, prows, kb),
                jnp.float8_e4m3fn,
            )
        )
    else:
        out_type.append(jax.ShapeDtypeStruct(words.shape, jnp.float32 if is_f32 else jnp.uint32))
    width = words.shape[-1]

    def body(x_ref, gs_ref, *refs):
        ts_ref, out_refs = (None, refs) if ts is None else (refs[0], refs[1:])
        b, r0, c0 = plan.origin(lax.axis_index("tile"))
        g = gs_ref[b]
        t = None if ts_ref is None else ts_ref[b]
        layout = block_layout((plan.rs, plan.cs, width))
        block_lay = block_layout((plan.rs, plan.cs, width), (2,))
        inv_g = div_rn(jnp.ones((plan.rs, plan.cs), jnp.float32), g, block_lay, bool(interpret))
        subtiles = list(plan.subtiles(r0, c0))
        # Issue every load before any store: stores could alias the inputs as far as the
        # compiler knows, so loads after them would not be hoisted.
        loaded = [
            plgpu.load(
                x_ref.at[b, pl.ds(r, plan.rs), pl.ds(c, plan.cs)], layout=layout, optimized=False
            )
            for r, c in subtiles
        ]
        for (r, c), w in zip(subtiles, loaded):
            packed, scale, values = _quantize_subtile(
                w,
                g,
                inv_g,
                t,
                dtype=dtype,
                want_codes=want_codes,
                want_values=not want_codes,
                interpret=bool(interpret),
            )
            rows_sl, cols_sl = pl.ds(r, plan.rs), pl.ds(c, plan.cs)
            if want_codes:
                q_ref, s_ref = out_refs
                q_ref[b, rows_sl, cols_sl] = packed
                if direct_swizzle:
                    swizzled_ref_at(s_ref, b, r, c)[...] = scale
                else:
                    s_ref[b, rows_sl, cols_sl] = scale
            else:
                (v_ref,) = out_refs
                v_ref[b, rows_sl, cols_sl] = values

    outs = kernel_call(body, plan, tuple(out_type), interpret, f"nvfp4_{mode}")(words, *scale_args)

    lead = x.shape[:-1]
    if not want_codes:
        (v,) = outs
        v = v[:, :rows]
        if is_f32:
            return v.reshape(x.shape)
        return lax.bitcast_convert_type(v, dtype).reshape(x.shape)
    packed, scales = outs
    packed = packed[:, :rows]
    if is_f32:
        packed = lax.bitcast_convert_type(packed, jnp.uint8)
    packed = packed.reshape(*lead, kb * 8)
    if direct_swizzle:
        scales = scales.reshape(*gs_lead, -(-rows // 128) * 128, -(-kb // 4) * 4)
    else:
        scales = scales[:, :rows].reshape(*lead, kb)
        if swizzled:
            scales = layouts.swizzle(scales.reshape(*gs_lead, rows, kb))
    return packed, scales


def quantize(
    x: jax.Array,
    global_scale: jax.Array,
    *,
    swizzled: bool = False,
    interpret: Any = False,
    config: TileConfig = QUANTIZE_CONFIG,
) -> tuple[jax.Array, jax.Array]:
    """Quantize ``x [..., K]`` (bf16/fp16/fp32, ``K % 16 == 0``) to NVFP4.

    Args:
      x: the array; the block axis is last.
      global_scale: float32 quantize-direction scale (``448*6/amax``): a scalar or one per
        leading batch entry (its shape a prefix of ``x.shape[:-1]``).
      swizzled: return the block scales in the 128x4 swizzled layout
        ``[*gs.shape, round_up(R, 128), round_up(K/16, 4)]`` (R = the remaining row dims
        flattened), zero padded.
      interpret: run in the Mosaic GPU interpreter (True or a ``plgpu.InterpretGPUParams``).
      config: tile sizes.

    Returns:
      ``(packed uint8 [..., K/2], scales float8_e4m3fn [..., K/16] or swizzled)``.
    """
    x, gs = _check_input(x, global_scale)
    if swizzled and x.ndim < 2:
        raise ValueError("swizzled scales need at least 2-D x")
    return _quantize_impl(
        x, gs, None, mode="quantize", swizzled=swizzled, interpret=interpret, config=config
    )


def quant_dequant(
    x: jax.Array,
    global_scale: jax.Array,
    tensor_scale: jax.Array | None = None,
    *,
    interpret: Any = False,
    config: TileConfig = DEFAULT_CONFIG,
) -> jax.Array:
    """Fake quantization in one pass, ``x.dtype`` and ``x.shape``.

    Codes and scales as :func:`quantize`; values ``e2m1 * (float32(s) * tensor_scale)`` (the
    same bits as ``dequantize(quantize(x))``) when ``tensor_scale`` is given, else vLLM's
    ``e2m1 * (float32(s) / global_scale)`` (a true IEEE division). Float32 math, one rounding.
    ``tensor_scale`` has the shape of ``global_scale``.
    """
    x, gs = _check_input(x, global_scale)
    ts = None
    if tensor_scale is not None:
        ts = jnp.asarray(tensor_scale, jnp.float32)
        if ts.shape != gs.shape:
            raise ValueError(f"tensor_scale shape {ts.shape} != global_scale shape {gs.shape}")
    return _quantize_impl(
        x, gs, ts, mode="quant_dequant", swizzled=False, interpret=interpret, config=config
    )
