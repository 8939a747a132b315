"""NVFP4 dequantization (and FP4 nibble pack/unpack) kernels in Pallas Mosaic GPU.

* ``dequantize(packed, scales, tensor_scale, *, out_dtype, swizzled=False)``:
  ``packed uint8 [..., R, K/2]``, ``scales float8_e4m3fn [..., R, K/16]`` (or 128x4
  swizzled ``[..., round_up(R, 128), round_up(K/16, 4)]``), ``tensor_scale`` float32 scalar
  or one per leading batch entry -> ``out_dtype [..., R, K]`` with
  ``out = e2m1 * (float32(scale) * tensor_scale)`` in float32, rounded once.
* ``pack_codes(codes uint8 [..., K]) -> uint8 [..., K/2]`` and ``unpack_codes`` (its
  inverse), ``K % 16 == 0``: element ``2i`` in the low nibble of byte ``i``.

Layouts (free XLA views, see ``quantize.py`` for the tiling scheme shared by all kernels):
the packed bytes of one 16-element scale block are one ``[8]`` row of
``uint8 [B, R, KB, 8]``; a bf16/fp16 output block is a row of ``uint32 [B, R, KB, 8]``
(word ``i`` = elements ``2i`` and ``2i+1`` = the two nibbles of packed byte ``i``).

* bf16/fp16 output with row-major scales (``K >= 64``): each thread owns a *half* block, its
  4 code bytes (``uint8 [B, R, KB, 2, 4]``) and 4 output words (16 bytes), the two halves of
  a block on neighbouring lanes (both load the block's scale). A warp's 16-byte stores then
  cover whole 32-byte sectors: with a whole block per thread each sector took two partial
  writes (two 16-byte stores) and the L2, not DRAM, was the bottleneck on an H200.
  Sub-tile 16 rows x 4 blocks, :data:`HALF_BLOCK_CONFIG` sub-tiles per CTA.
* Otherwise each thread owns whole blocks (sub-tile 32 rows x 4 blocks, or 128 x 1). For an
  fp32 output the packed block is read as two little-endian words ``uint32 [B, R, KB, 2]``
  and expanded to ``float32 [B, R, KB, 2, 8]``.

Loads and stores go directly between GMEM and registers; edge tiles are shifted back in
bounds. Swizzled scales are read directly when ``R % 128 == 0`` and ``K % 64 == 0`` (whole
blocks per thread); otherwise XLA unswizzles them first (one extra pass over the scales).

Measured on an H200 (copy ceiling 4.3 TB/s r+w, ``benchmarks/results/sweep_dequantize-
2026-12-02.md``): to bf16, 28672 x 8192 in 159 us (88% of the ceiling; whole blocks per
thread: 182 us, 77%), 14336 x 4096 42.2 us (83%), 4096 x 4096 13.6 us (74%). On an H100
(8192 x 8192, copy ceiling 2.89 TB/s, whole blocks per thread): to bf16/fp16 62.7 us (94.9%;
XLA's reference 240 us), swizzled scales 96.0%; to fp32 203 us (52%: the PTX is tight, one
8-byte load and four 16-byte stores per block, cause not found); pack_codes / unpack_codes 93%.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nvfp4_jax import layouts
from nvfp4_jax.kernels.quantize import (
    BLOCK,
    DEFAULT_CONFIG,
    TileConfig,
    block_layout,
    e2m1_decode_bits,
    e4m3_to_f32,
    f32_to_half_bits,
    kernel_call,
    make_plan,
    minor_iota,
    pin,
    split_batch,
    subtile_shape,
    swizzle_supported,
    swizzled_ref_at,
    swizzled_view_shape,
    tiled_layout,
)

#: Tiles measured fastest (see the module notes): four half-block sub-tiles along K per CTA
#: (bf16/fp16 output, row-major scales); one block sub-tile per CTA otherwise.
HALF_BLOCK_CONFIG = TileConfig(1, 4)
DEQUANT_CONFIG = TileConfig(1, 1)

_OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def _pad_rows(arrays, rows, kb):
    """Zero-pad ``[B, R, ...]`` arrays smaller than one sub-tile (tiny inputs only)."""
    rs, _ = subtile_shape(kb)
    if rows >= rs:
        return arrays, rows
    out = []
    for a in arrays:
        pad = [(0, 0)] * a.ndim
        pad[1] = (0, rs - rows)
        out.append(jnp.pad(a, pad))
    return out, rs


def _value(code, bscale):
    """E2M1 code (uint32) times the block's float32 scale factor."""
    return lax.bitcast_convert_type(e2m1_decode_bits(code), jnp.float32) * bscale


def _half_block_layout(shape, reduce_axes=()):
    """``[16, 4, 2, 4]`` (rows, blocks, halves, words): each thread owns one half-block (8
    codes -> 4 words = 16 bytes), the two halves of a block on neighbouring lanes, so one
    16-byte store per thread writes whole 32-byte sectors across a warp."""
    return tiled_layout(shape, (4, 4, 2, 4), (-8,), (-4, -3, -2), reduce_axes)


@functools.partial(jax.jit, static_argnames=("out_dtype", "swizzled", "interpret", "config"))
def _dequantize_impl(packed, scales, ts, *, out_dtype, swizzled, interpret, config):
    *lead, half_k = packed.shape
    kb = half_k // 8
    batch, rows = split_batch(packed.shape, ts.shape)
    ts = ts.reshape(batch)
    direct_swizzle = swizzled and swizzle_supported(rows, kb)
    if swizzled and not direct_swizzle:
        scales = layouts.unswizzle(scales, rows, kb)
    is_f32 = out_dtype == jnp.float32
    half = not is_f32 and not direct_swizzle and kb >= 4
    if config is None:
        config = HALF_BLOCK_CONFIG if half else DEQUANT_CONFIG

    if half:
        data = packed.reshape(batch, rows, kb, 2, 4)
    elif is_f32:
        data = lax.bitcast_convert_type(packed.reshape(batch, rows, kb, 2, 4), jnp.uint32)
    else:
        data = packed.reshape(batch, rows, kb, 8)
    if direct_swizzle:
        scales = scales.reshape(swizzled_view_shape(batch, rows, kb))
        (data,), prows = _pad_rows([data], rows, kb)
    else:
        (data, scales), prows = _pad_rows([data, scales.reshape(batch, rows, kb)], rows, kb)
    plan = make_plan(batch, prows, kb, config, subtile=(16, 4) if half else None)
    rs, cs = plan.rs, plan.cs
    layout = _half_block_layout if half else block_layout
    if half:
        out_type = jax.ShapeDtypeStruct((batch, prows, kb, 2, 4), jnp.uint32)
        out_shape = (rs, cs, 2, 4)
        data_layout = layout(out_shape)
        scale_layout = layout(out_shape, (2, 3))
    elif is_f32:
        out_type = jax.ShapeDtypeStruct((batch, prows, kb, 2, 8), jnp.float32)
        out_shape = (rs, cs, 2, 8)
        data_layout = block_layout(out_shape, (3,))
        scale_layout = block_layout(out_shape, (2, 3))
    else:
        out_type = jax.ShapeDtypeStruct((batch, prows, kb, 8), jnp.uint32)
        out_shape = (rs, cs, 8)
        data_layout = block_layout(out_shape)
        scale_layout = block_layout(out_shape, (2,))
    out_layout = layout(out_shape)
    bcast = lambda v: plgpu.layout_cast(lax.broadcast_in_dim(v, out_shape, (0, 1)), out_layout)

    def body(data_ref, scale_ref, ts_ref, out_ref):
        b, r0, c0 = plan.origin(lax.axis_index("tile"))
        t = ts_ref[b]
        subtiles = list(plan.subtiles(r0, c0))
        loaded = []
        for r, c in subtiles:  # every load before any store
            rows_sl, cols_sl = pl.ds(r, rs), pl.ds(c, cs)
            d = plgpu.load(data_ref.at[b, rows_sl, cols_sl], layout=data_layout, optimized=False)
            s_ref = (
                swizzled_ref_at(scale_ref, b, r, c)
                if direct_swizzle
                else scale_ref.at[b, rows_sl, cols_sl]
            )
            s = plgpu.load(s_ref, layout=scale_layout, optimized=False)
            loaded.append((d, s))
        for (r, c), (d, s) in zip(subtiles, loaded):
            bscale = bcast(pin(e4m3_to_f32(s) * t))
            if is_f32:
                words = plgpu.layout_cast(lax.broadcast_in_dim(d, out_shape, (0, 1, 2)), out_layout)
                nib = minor_iota(out_shape, out_layout, bool(interpret))
                out = _value((words >> (nib * 4)) & 0xF, bscale)
            else:
                p = d.astype(jnp.uint32)
                lo = f32_to_half_bits(_value(p & 0xF, bscale), out_dtype)
                hi = f32_to_half_bits(_value(p >> 4, bscale), out_dtype)
                out = lo | (hi << 16)
            out_ref[b, pl.ds(r, rs), pl.ds(c, cs)] = out

    out = kernel_call(body, plan, out_type, interpret, "nvfp4_dequantize")(data, scales, ts)
    out = out[:, :rows]
    if not is_f32:
        out = lax.bitcast_convert_type(out, out_dtype)
    return out.reshape(*lead, kb * BLOCK)


def dequantize(
    packed: jax.Array,
    scales: jax.Array,
    tensor_scale: jax.Array,
    *,
    out_dtype: Any = jnp.bfloat16,
    swizzled: bool = False,
    interpret: Any = False,
    config: TileConfig | None = None,
) -> jax.Array:
    """``e2m1 * (float32(scale) * tensor_scale)`` as ``out_dtype``, shape ``[..., R, K]``.

    Args:
      packed: ``uint8 [..., R, K/2]`` (``K % 16 == 0``), two E2M1 codes per byte.
      scales: ``float8_e4m3fn [..., R, K/16]``, or with ``swizzled=True`` the 128x4 layout
        ``[*tensor_scale.shape, round_up(R', 128), round_up(K/16, 4)]`` (R' = the row dims
        after the tensor scale's batch dims, flattened).
      tensor_scale: float32 multiplier, a scalar or one per leading batch entry.
      out_dtype: bfloat16, float16 or float32.
      interpret: run in the Mosaic GPU interpreter (True or a ``plgpu.InterpretGPUParams``).
      config: sub-tiles per CTA; None: :data:`HALF_BLOCK_CONFIG` where threads own half
        blocks (bf16/fp16 output, row-major scales, K >= 64), else :data:`DEQUANT_CONFIG`.
    """
    if config is not None and not isinstance(config, TileConfig):
        raise TypeError(f"config must be a TileConfig or None, got {config!r}")
    packed = jnp.asarray(packed)
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if packed.dtype != jnp.uint8 or packed.ndim < 1 or packed.shape[-1] % 8 or not packed.shape[-1]:
        raise ValueError(
            f"packed must be uint8 [..., K/2] with K % 16 == 0, got {packed.dtype} {packed.shape}"
        )
    ts = jnp.asarray(tensor_scale, jnp.float32)
    _, rows = split_batch(packed.shape, ts.shape)
    kb = packed.shape[-1] // 8
    scales = jnp.asarray(scales)
    if scales.dtype == jnp.uint8:
        scales = lax.bitcast_convert_type(scales, jnp.float8_e4m3fn)
    if scales.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"scales must be float8_e4m3fn, got {scales.dtype}")
    if swizzled:
        want = (*ts.shape, -(-rows // 128) * 128, -(-kb // 4) * 4)
    else:
        want = (*packed.shape[:-1], kb)
    if tuple(scales.shape) != want:
        raise ValueError(f"scales must have shape {want} (swizzled={swizzled}), got {scales.shape}")
    return _dequantize_impl(
        packed,
        scales,
        ts,
        out_dtype=out_dtype,
        swizzled=swizzled,
        interpret=interpret,
        config=config,
    )


# -- nibble packing ------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("unpack", "interpret", "config"))
def _pack_impl(a, *, unpack, interpret, config):
    *lead, n = a.shape
    k = 2 * n if unpack else n
    kb = k // BLOCK
    rows = int(np.prod(lead))
    # One 16-element block = 4 words of codes (one code per byte) = 4 halfwords packed.
    src = (
        lax.bitcast_convert_type(a.reshape(1, rows, kb, 4, 2), jnp.uint16)
        if unpack
        else lax.bitcast_convert_type(a.reshape(1, rows, kb, 4, 4), jnp.uint32)
    )
    (src,), prows = _pad_rows([src], rows, kb)
    plan = make_plan(1, prows, kb, config)
    shape = (plan.rs, plan.cs, 4)
    layout = block_layout(shape)
    out_type = jax.ShapeDtypeStruct((1, prows, kb, 4), jnp.uint32 if unpack else jnp.uint16)

    def body(src_ref, out_ref):
        _, r0, c0 = plan.origin(lax.axis_index("tile"))
        subtiles = list(plan.subtiles(r0, c0))
        loaded = [
            plgpu.load(
                src_ref.at[0, pl.ds(r, plan.rs), pl.ds(c, plan.cs)], layout=layout, optimized=False
            )
            for r, c in subtiles
        ]
        for (r, c), v in zip(subtiles, loaded):
            v = v.astype(jnp.uint32)
            if unpack:  # 4 nibbles -> 4 bytes
                out = (v & 0xF) | ((v & 0xF0) << 4) | ((v & 0xF00) << 8) | ((v & 0xF000) << 12)
            else:  # low nibbles of 4 bytes -> 4 nibbles
                out = (v & 0xF) | ((v >> 4) & 0xF0) | ((v >> 8) & 0xF00) | ((v >> 12) & 0xF000)
                out = out.astype(jnp.uint16)
            out_ref[0, pl.ds(r, plan.rs), pl.ds(c, plan.cs)] = out

    name = "nvfp4_unpack_codes" if unpack else "nvfp4_pack_codes"
    out = kernel_call(body, plan, out_type, interpret, name)(src)[:, :rows]
    return lax.bitcast_convert_type(out, jnp.uint8).reshape(*lead, k if unpack else k // 2)


def pack_codes(
    codes: jax.Array, *, interpret: Any = False, config: TileConfig = DEFAULT_CONFIG
) -> jax.Array:
    """E2M1 codes ``uint8 [..., K]`` (low 4 bits used, ``K % 16 == 0``) -> ``uint8 [..., K/2]``."""
    codes = jnp.asarray(codes)
    if codes.dtype != jnp.uint8 or codes.ndim < 1 or codes.shape[-1] % BLOCK or not codes.shape[-1]:
        raise ValueError(
            f"codes must be uint8 [..., K] with K % 16 == 0, got {codes.dtype} {codes.shape}"
        )
    return _pack_impl(codes, unpack=False, interpret=interpret, config=config)


def unpack_codes(
    packed: jax.Array, *, interpret: Any = False, config: TileConfig = DEFAULT_CONFIG
) -> jax.Array:
    """``uint8 [..., K/2]`` -> codes ``uint8 [..., K]`` (low nibble first), ``K % 16 == 0``."""
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8 or packed.ndim < 1 or packed.shape[-1] % 8 or not packed.shape[-1]:
        raise ValueError(
            f"packed must be uint8 [..., K/2] with K % 16 == 0, got {packed.dtype} {packed.shape}"
        )
    return _pack_impl(packed, unpack=True, interpret=interpret, config=config)
