"""Pallas Mosaic GPU kernels (``nvfp4_jax.kernels``) against an independent numpy oracle.

* CPU: every kernel runs in the Mosaic GPU interpreter on small, awkward shapes (rows not a
  multiple of any tile, K = 16 * odd, batched inputs) and must match the oracle bit for bit:
  code bytes, scale bytes, output values.
* CPU: every kernel variant is cross-lowered for sm_90 (the whole Pallas -> Mosaic GPU
  lowering: layouts, dtypes) under an abstract H100 mesh.
* GPU (``@pytest.mark.gpu``): the compiled kernels, same checks, bigger shapes.

The oracle below is written from the numeric contract only (numpy + ml_dtypes); it shares
no code with the package. E2M1 rounding is a nearest-value search with ties broken towards
the even code, which is a different algorithm from the kernels' threshold chain.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from cross_lowering import cross_lower
from race_detection import RACES, races_found

from nvfp4_jax import layouts
from nvfp4_jax.formats import encode_e2m1
from nvfp4_jax.kernels import dequantize as kd
from nvfp4_jax.kernels import quantize as kq

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
NP_DTYPES = {jnp.bfloat16: ml_dtypes.bfloat16, jnp.float16: np.float16, jnp.float32: np.float32}
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# -- the oracle ----------------------------------------------------------------------------


def _e2m1_code(v: np.ndarray) -> np.ndarray:
    """float32 in [-6, 6] -> E2M1 code: nearest magnitude, ties to the even code, sign bit kept."""
    mag = np.abs(v)
    dist = np.abs(mag[..., None] - E2M1)
    best = dist.min(-1, keepdims=True)
    tied = dist == best
    # Prefer the even index among the nearest ones (at most two are tied).
    idx = np.where(
        tied[..., ::2].any(-1), np.argmax(tied & (np.arange(8) % 2 == 0), -1), np.argmax(tied, -1)
    )
    return (idx | (np.signbit(v) << 3)).astype(np.uint8)


def oracle_quantize(x, gs):
    """x [..., K] (numpy, any float dtype), gs float32 scalar or prefix-shaped ->
    (codes uint8 [..., K], scale bytes uint8 [..., K/16], scales as float32)."""
    x = np.asarray(x).astype(np.float32)
    gs = np.asarray(gs, np.float32)
    *lead, k = x.shape
    blocks = x.reshape(*lead, k // 16, 16)
    g = gs.reshape(gs.shape + (1,) * (blocks.ndim - 1 - gs.ndim))
    with np.errstate(all="ignore"):
        amax = np.max(np.abs(blocks), -1)
        sf = g * (amax * np.float32(1.0 / 6.0))
        s = np.minimum(sf, np.float32(448.0)).astype(ml_dtypes.float8_e4m3fn)
        finite = np.isfinite(amax)
        s = np.where(finite, s, np.array(np.nan, ml_dtypes.float8_e4m3fn))
        s32 = s.astype(np.float32)
        den = s32 * (np.float32(1.0) / g)
        inv = np.where(den == 0, np.float32(0.0), np.float32(1.0) / np.where(den == 0, 1, den))
        v = np.clip(blocks * inv[..., None], -6.0, 6.0).astype(np.float32)
    codes = _e2m1_code(np.where(finite[..., None], v, 0.0))
    codes = np.where(finite[..., None], codes, 0).astype(np.uint8)
    return codes.reshape(*lead, k), s.view(np.uint8), s32


def oracle_pack(codes):
    return ((codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)).astype(np.uint8)


def oracle_unpack(packed):
    return np.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:-1], -1)


def oracle_decode(codes):
    v = E2M1[codes & 7]
    return np.where(codes & 8, -v, v).astype(np.float32)


def oracle_dequantize(packed, scale_bytes, ts, dtype):
    codes = oracle_unpack(np.asarray(packed))
    *lead, k = codes.shape
    s = np.asarray(scale_bytes).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    ts = np.asarray(ts, np.float32)
    t = ts.reshape(ts.shape + (1,) * (s.ndim - ts.ndim))
    with np.errstate(all="ignore"):
        bs = s * t
        out = oracle_decode(codes).reshape(*lead, k // 16, 16) * bs[..., None]
    return out.reshape(*lead, k).astype(NP_DTYPES[dtype])


def oracle_quant_dequant(x, gs, ts=None):
    codes, _, s32 = oracle_quantize(x, gs)
    *lead, k = codes.shape
    g = np.asarray(gs, np.float32)
    g = g.reshape(g.shape + (1,) * (s32.ndim - g.ndim))
    with np.errstate(all="ignore"):
        if ts is None:
            bs = s32 / g
        else:
            t = np.asarray(ts, np.float32)
            bs = s32 * t.reshape(t.shape + (1,) * (s32.ndim - t.ndim))
        out = oracle_decode(codes).reshape(*lead, k // 16, 16) * bs[..., None]
    return out.reshape(*lead, k).astype(np.asarray(x).dtype)


def oracle_swizzle(scale_bytes):
    """Plain [..., R, C] -> 128x4 swizzled [..., R_pad, C_pad], by the byte-offset formula."""
    *lead, r, c = scale_bytes.shape
    rp, cp = -(-r // 128) * 128, -(-c // 4) * 4
    out = np.zeros((*lead, rp * cp), np.uint8)
    rr, cc = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
    off = (
        ((rr >> 7) * (cp // 4) + (cc >> 2)) * 512 + (rr & 31) * 16 + ((rr >> 5) & 3) * 4 + (cc & 3)
    )
    out[..., off] = scale_bytes
    return out.reshape(*lead, rp, cp)


# -- inputs --------------------------------------------------------------------------------


def special_input(shape, dtype, rng):
    """Random data with planted edge cases, one per 16-element block where room allows:
    exact E2M1 ties (block scale 1 with gs = 1 -> inv = 1), all-zero and -0 blocks, tiny
    blocks whose E4M3 scale is subnormal, blocks saturating the scale, and NaN/Inf blocks."""
    x = rng.standard_normal(shape).astype(np.float32) * rng.choice(
        [0.01, 1.0, 30.0], shape[:-1] + (1,)
    )
    flat = x.reshape(-1, 16)
    ties = np.array(
        [6, 0.25, -0.25, 0.75, -0.75, 1.25, -1.25, 1.75, -1.75, 2.5, -2.5, 3.5, -3.5, 5, -5, 0.5],
        np.float32,
    )
    planted = [
        ties,
        ties * 0.5,  # block scale 0.5
        np.zeros(16, np.float32),
        -np.zeros(16, np.float32),
        ties * 2.0**-8,  # e4m3 scale 2^-8: subnormal (min normal 2^-6)
        np.linspace(-1, 1, 16).astype(np.float32) * 2.0**-9,  # scale rounds to 0
        ties * 1e5,  # scale saturates at 448
    ]
    for i, blk in enumerate(planted):
        if i < len(flat):
            flat[i] = blk
    if len(flat) > len(planted) + 2:
        flat[len(planted), 3] = np.nan
        flat[len(planted) + 1, 7] = -np.inf
    if dtype == jnp.float16:
        flat[np.abs(flat) > 60000] = 60000.0
    return flat.reshape(shape).astype(NP_DTYPES[dtype])


def near_threshold_input(shape, gs, rng):
    """float32 blocks whose elements land within a few ulps of the E2M1 rounding thresholds
    after scaling by the block's reciprocal ``1 / (s * (1 / gs))``: any inexact reciprocal
    or division in a kernel flips codes here."""
    n_blocks = int(np.prod(shape)) // 16
    sbytes = rng.integers(0x20, 0x70, n_blocks).astype(np.uint8)
    s32 = sbytes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    g = np.float32(gs)
    inv = np.float32(1) / (s32 * (np.float32(1) / g))
    thresholds = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    t = rng.choice(thresholds, (n_blocks, 15))
    x = (t / inv[:, None]).astype(np.float32)
    steps = rng.integers(-2, 3, x.shape)
    for k in (-2, -1, 1, 2):
        towards = np.float32(np.inf) if k > 0 else np.float32(-np.inf)
        for _ in range(abs(k)):
            x = np.where(steps == k, np.nextafter(x, towards), x)
        steps = np.where(steps == k, 0, steps)
    amax = (s32 * np.float32(6) / g).astype(np.float32)
    blocks = np.concatenate([amax[:, None], x], 1)
    blocks *= rng.choice(np.array([-1, 1], np.float32), blocks.shape)
    blocks = blocks[:, rng.permutation(16)]
    return blocks.reshape(shape).astype(np.float32)


def assert_bits_equal(actual, expected, what):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a = actual.view(np.uint8).reshape(-1, actual.dtype.itemsize)
    e = expected.view(np.uint8).reshape(-1, expected.dtype.itemsize)
    bad = np.any(a != e, axis=-1)
    if np.issubdtype(actual.dtype, np.floating) or actual.dtype in (ml_dtypes.bfloat16,):
        # NaN payloads are not part of the contract: compare NaN positions, bits elsewhere.
        an = np.isnan(actual.astype(np.float32)).reshape(-1)
        en = np.isnan(expected.astype(np.float32)).reshape(-1)
        assert np.array_equal(an, en), f"{what}: NaN positions differ"
        bad &= ~an
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} elements differ, first at flat index "
        f"{np.argmax(bad)}: {actual.reshape(-1)[np.argmax(bad)]} vs {expected.reshape(-1)[np.argmax(bad)]}"
    )


GS = np.float32(1.0)  # planted ties assume gs = 1


def _gs_for(shape, batched):
    if not batched:
        return GS
    return np.linspace(0.5, 2.0, shape[0]).astype(np.float32)


def check_quantize(x, gs, *, swizzled, interpret, config=kq.DEFAULT_CONFIG):
    codes, sbytes, _ = oracle_quantize(x, gs)
    q, s = kq.quantize(
        jnp.asarray(x), jnp.asarray(gs), swizzled=swizzled, interpret=interpret, config=config
    )
    assert q.dtype == jnp.uint8 and s.dtype == jnp.float8_e4m3fn
    assert_bits_equal(q, oracle_pack(codes), "packed codes")
    if swizzled:
        gs_rank = np.ndim(gs)
        lead = sbytes.shape[:gs_rank]
        expect = oracle_swizzle(sbytes.reshape(*lead, -1, sbytes.shape[-1]))
    else:
        expect = sbytes
    assert_bits_equal(np.asarray(s).view(np.uint8), expect, "scale bytes")
    # No unexpected NaN: only non-finite input blocks may carry the NaN scale.
    n_nan = int(np.sum(np.asarray(s).view(np.uint8) & 0x7F == 0x7F))
    assert n_nan == int(np.sum(expect & 0x7F == 0x7F))


SHAPES = [  # (shape, batched global scale)
    ((5, 48), False),  # smaller than one tile, K = 16*3
    ((130, 80), False),  # rows 128 + 2, K = 16*5
    ((256, 128), False),  # swizzled scales written directly by the kernel
    ((3, 40, 64), True),  # one global scale per batch entry
    ((2, 3, 37, 16), False),  # K = 16 (one block), rank 4
]


# -- interpreter tests ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape,batched", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("swizzled", [False, True], ids=["plain", "swizzled"])
def test_quantize_interpret(shape, batched, dtype, swizzled, rng):
    x = special_input(shape, dtype, rng)
    check_quantize(x, _gs_for(shape, batched), swizzled=swizzled, interpret=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_quantize_random_global_scale_interpret(dtype, rng):
    x = special_input((70, 96), dtype, rng)
    amax = np.nanmax(np.where(np.isfinite(x.astype(np.float32)), np.abs(x.astype(np.float32)), 0))
    check_quantize(x, np.float32(448 * 6) / np.float32(amax), swizzled=False, interpret=True)


@pytest.mark.parametrize("gs", [0.37, 1.0, 2.6], ids=str)
def test_near_threshold_interpret(gs, rng):
    x = near_threshold_input((64, 160), gs, rng)
    check_quantize(x, np.float32(gs), swizzled=False, interpret=True)
    for ts in (None, np.float32(1) / np.float32(gs)):
        out = kq.quant_dequant(jnp.asarray(x), np.float32(gs), ts, interpret=True)
        assert_bits_equal(out, oracle_quant_dequant(x, np.float32(gs), ts), "fake-quant values")


def test_quantize_tile_configs_interpret(rng):
    x = special_input((200, 208), jnp.bfloat16, rng)  # K/16 = 13 blocks: shifted column tiles
    for cfg in (kq.TileConfig(1, 1), kq.TileConfig(2, 3), kq.TileConfig(8, 2)):
        check_quantize(x, GS, swizzled=False, interpret=True, config=cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape,batched", SHAPES[:4], ids=lambda s: str(s))
@pytest.mark.parametrize("with_ts", [False, True], ids=["s_over_gs", "s_times_ts"])
def test_quant_dequant_interpret(shape, batched, dtype, with_ts, rng):
    x = special_input(shape, dtype, rng)
    gs = _gs_for(shape, batched)
    ts = (np.float32(1.0) / gs).astype(np.float32) if with_ts else None
    out = kq.quant_dequant(
        jnp.asarray(x), jnp.asarray(gs), None if ts is None else jnp.asarray(ts), interpret=True
    )
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_bits_equal(out, oracle_quant_dequant(x, gs, ts), "fake-quant values")


def _random_packed(shape, rng, nan_scales=True):
    """Random code bytes and E4M3 scale bytes (some NaN) for ``packed`` of ``shape``."""
    packed = rng.integers(0, 256, shape, dtype=np.uint8)
    sb = rng.integers(0, 0x7F, (*shape[:-1], shape[-1] // 8), dtype=np.uint8)  # positive, finite
    sb |= (rng.random(sb.shape) < 0.1).astype(np.uint8) << 7  # some negative scales
    if nan_scales:
        sb.reshape(-1)[::17] = 0x7F
    return packed, sb


DEQ_SHAPES = [  # (packed shape, batched tensor scale)
    ((5, 24), False),
    ((37, 152), False),  # 19 blocks: the half-block path's last tile shifted back
    ((130, 40), False),
    ((256, 64), False),
    ((3, 40, 32), True),
    ((2, 128, 8), True),
]


def _dequantize_vs_oracle(shape, batched, dtype, swizzled, rng, *, interpret, config=None):
    """Random packed codes, scales (plain or swizzled) and tensor scale(s) -> (kernel
    output, oracle output)."""
    packed, sb = _random_packed(shape, rng)
    ts = rng.uniform(0.01, 4, shape[:1] if batched else ()).astype(np.float32)
    lead = shape[:1] if batched else ()
    sb_in = oracle_swizzle(sb.reshape(*lead, -1, sb.shape[-1])) if swizzled else sb
    out = kd.dequantize(
        jnp.asarray(packed),
        jnp.asarray(sb_in.view(ml_dtypes.float8_e4m3fn)),
        jnp.asarray(ts),
        out_dtype=dtype,
        swizzled=swizzled,
        interpret=interpret,
        config=config,
    )
    return out, oracle_dequantize(packed, sb, ts, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape,batched", DEQ_SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("swizzled", [False, True], ids=["plain", "swizzled"])
def test_dequantize_interpret(shape, batched, dtype, swizzled, rng):
    out, expect = _dequantize_vs_oracle(shape, batched, dtype, swizzled, rng, interpret=True)
    assert out.dtype == dtype
    assert_bits_equal(out, expect, "dequantized values")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (3, 2)], ids=str)
def test_dequantize_tiles_interpret(tile, dtype, rng):
    """Other sub-tiles per CTA than the default, on ragged rows and blocks (the half-block
    path for bf16, whole blocks for fp32)."""
    out, expect = _dequantize_vs_oracle(
        (70, 200), False, dtype, False, rng, interpret=True, config=kq.TileConfig(*tile)
    )
    assert_bits_equal(out, expect, "dequantized values")


def test_kernels_have_no_races(rng):
    """quantize (plain and swizzled scales), quant_dequant and dequantize under the
    interpreter's race detector. The shape is a whole number of tiles: on ragged shapes the
    last tile is shifted back in bounds and rewrites some of its neighbour's outputs with the
    same bytes (a benign write-write overlap the detector reports)."""
    x = special_input((256, 128), jnp.bfloat16, rng)
    for swizzled in (False, True):
        q, s = kq.quantize(jnp.asarray(x), GS, swizzled=swizzled, interpret=RACES)
        assert not races_found(), f"quantize(swizzled={swizzled})"
    assert_bits_equal(
        np.asarray(s).view(np.uint8), oracle_swizzle(oracle_quantize(x, GS)[1]), "scales"
    )
    kq.quant_dequant(jnp.asarray(x), GS, np.float32(1), interpret=RACES)
    assert not races_found(), "quant_dequant"
    out = kd.dequantize(q, s, np.float32(1), out_dtype=jnp.bfloat16, swizzled=True, interpret=RACES)
    assert not races_found(), "dequantize"
    assert_bits_equal(out, oracle_quant_dequant(x, GS, np.float32(1)), "round trip")
    plain = oracle_quantize(x, GS)[1].view(ml_dtypes.float8_e4m3fn)
    out = kd.dequantize(q, jnp.asarray(plain), np.float32(1), interpret=RACES)  # half blocks
    assert not races_found(), "dequantize (half blocks per thread)"
    assert_bits_equal(out, oracle_quant_dequant(x, GS, np.float32(1)), "round trip, plain")


def test_dequantize_roundtrip_interpret(rng):
    """dequantize(quantize(x)) == quant_dequant(x, gs, 1/gs), through the kernels."""
    x = special_input((66, 112), jnp.bfloat16, rng)
    gs = np.float32(3.0)
    q, s = kq.quantize(jnp.asarray(x), gs, interpret=True)
    out = kd.dequantize(q, s, 1 / gs, out_dtype=jnp.bfloat16, interpret=True)
    assert_bits_equal(out, oracle_quant_dequant(x, gs, np.float32(1) / gs), "round trip")


@pytest.mark.parametrize("shape", [(5, 48), (130, 80), (2, 3, 16)], ids=str)
def test_pack_unpack_interpret(shape, rng):
    codes = rng.integers(0, 16, shape, dtype=np.uint8)
    packed = kd.pack_codes(jnp.asarray(codes), interpret=True)
    assert_bits_equal(packed, oracle_pack(codes), "packed")
    assert_bits_equal(kd.unpack_codes(packed, interpret=True), codes, "unpacked")
    # High nibbles of the input codes are ignored.
    noisy = codes | (rng.integers(0, 16, shape, dtype=np.uint8) << 4)
    assert_bits_equal(
        kd.pack_codes(jnp.asarray(noisy), interpret=True), oracle_pack(codes), "masked"
    )


def test_e2m1_rounding_helpers():
    """The kernels' magic-number rounding equals the oracle on every float32 within 64 ulps of
    each rounding threshold and of each E2M1 value, plus a coarse sweep of [0, 8]."""
    pts = np.concatenate([np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32), E2M1])
    grid = [np.linspace(0, 8, 20001, dtype=np.float32)]
    for p in pts:
        lo = hi = np.float32(p)
        for _ in range(64):
            lo, hi = np.nextafter(lo, np.float32(-1)), np.nextafter(hi, np.float32(9))
            grid.append(np.array([lo, hi], np.float32))
    a = np.abs(np.concatenate(grid + [pts]))
    expect = _e2m1_code(np.minimum(a, 6)) & 7
    got = np.asarray(jax.jit(kq.e2m1_magnitude)(jnp.asarray(a)))
    assert np.array_equal(got, expect)
    got = np.asarray(jax.jit(encode_e2m1)(jnp.asarray(a))) & 7  # the reference's threshold chain
    assert np.array_equal(got, expect)
    codes = np.arange(16, dtype=np.uint32)
    bits = np.asarray(kq.e2m1_decode_bits(jnp.asarray(codes)))
    assert np.array_equal(bits.view(np.float32), oracle_decode(codes.astype(np.uint8)))


def test_swizzle_helpers_match_formula(rng):
    sb = rng.integers(0, 256, (2, 130, 5), dtype=np.uint8)
    sw = np.asarray(layouts.swizzle(jnp.asarray(sb)))
    assert_bits_equal(sw, oracle_swizzle(sb), "swizzle")
    assert_bits_equal(layouts.unswizzle(jnp.asarray(sw), 130, 5), sb, "unswizzle")


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        kq.quantize(jnp.zeros((4, 40), jnp.bfloat16), 1.0)
    with pytest.raises(ValueError):
        kq.quantize(jnp.zeros((4, 32), jnp.int32), 1.0)
    with pytest.raises(ValueError):
        kq.quantize(jnp.zeros((4, 32), jnp.bfloat16), jnp.ones((3,)))
    with pytest.raises(ValueError):
        kd.dequantize(jnp.zeros((4, 16), jnp.uint8), jnp.zeros((4, 3), jnp.float8_e4m3fn), 1.0)
    with pytest.raises(TypeError, match="config must be a TileConfig"):
        kd.dequantize(
            jnp.zeros((4, 16), jnp.uint8), jnp.zeros((4, 2), jnp.float8_e4m3fn), 1.0, config=(1, 4)
        )


# -- cross-lowering for sm_90 (CPU) --------------------------------------------------------


S = jax.ShapeDtypeStruct
F32 = S((), jnp.float32)
LOWER_CASES = {}
for _dt in DTYPES:
    _n = jnp.dtype(_dt).name
    for _shape in [(130, 80), (256, 128), (5, 48), (2, 3, 16)]:
        LOWER_CASES[f"quantize-{_n}-{_shape}"] = (kq.quantize, (S(_shape, _dt), F32))
    LOWER_CASES[f"quantize-swizzled-{_n}"] = (
        functools.partial(kq.quantize, swizzled=True),
        (S((256, 128), _dt), F32),
    )
    LOWER_CASES[f"quantize-swizzled-xla-{_n}"] = (
        functools.partial(kq.quantize, swizzled=True),
        (S((130, 80), _dt), F32),
    )
    LOWER_CASES[f"quantize-batched-{_n}"] = (
        kq.quantize,
        (S((3, 40, 64), _dt), S((3,), jnp.float32)),
    )
    LOWER_CASES[f"quant_dequant-{_n}"] = (kq.quant_dequant, (S((130, 80), _dt), F32))
    LOWER_CASES[f"quant_dequant-ts-{_n}"] = (kq.quant_dequant, (S((130, 80), _dt), F32, F32))
    LOWER_CASES[f"dequantize-{_n}"] = (
        functools.partial(kd.dequantize, out_dtype=_dt),
        (S((130, 40), jnp.uint8), S((130, 5), jnp.float8_e4m3fn), F32),
    )
    LOWER_CASES[f"dequantize-small-{_n}"] = (
        functools.partial(kd.dequantize, out_dtype=_dt),
        (S((5, 24), jnp.uint8), S((5, 3), jnp.float8_e4m3fn), F32),
    )
    LOWER_CASES[f"dequantize-swizzled-{_n}"] = (
        functools.partial(kd.dequantize, out_dtype=_dt, swizzled=True),
        (S((256, 64), jnp.uint8), S((256, 8), jnp.float8_e4m3fn), F32),
    )
    LOWER_CASES[f"dequantize-batched-{_n}"] = (
        functools.partial(kd.dequantize, out_dtype=_dt),
        (S((3, 40, 24), jnp.uint8), S((3, 40, 3), jnp.float8_e4m3fn), S((3,), jnp.float32)),
    )
LOWER_CASES["pack_codes"] = (kd.pack_codes, (S((130, 80), jnp.uint8),))
LOWER_CASES["unpack_codes"] = (kd.unpack_codes, (S((130, 40), jnp.uint8),))
for _cfg in (kq.TileConfig(1, 1), kq.TileConfig(8, 4)):
    LOWER_CASES[f"quantize-{_cfg}"] = (
        functools.partial(kq.quantize, config=_cfg),
        (S((1000, 4096), jnp.bfloat16), F32),
    )
    LOWER_CASES[f"dequantize-{_cfg}"] = (
        functools.partial(kd.dequantize, out_dtype=jnp.bfloat16, config=_cfg),
        (S((1000, 2048), jnp.uint8), S((1000, 256), jnp.float8_e4m3fn), F32),
    )


@pytest.mark.parametrize("name", sorted(LOWER_CASES))
def test_cross_lowers_for_sm90(name):
    fn, args = LOWER_CASES[name]
    text = cross_lower(fn, *args)
    assert "mosaic_gpu" in text, "no Mosaic GPU kernel in the lowered module"


# -- compiled on a GPU ---------------------------------------------------------------------


def _no_gpu():
    try:
        return jax.devices()[0].platform != "gpu"
    except RuntimeError:
        return True


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
    "shape,batched",
    [((4099, 2064), False), ((1024, 4096), False), ((4, 300, 1040), True), ((7, 48), False)],
    ids=str,
)
@pytest.mark.parametrize("swizzled", [False, True], ids=["plain", "swizzled"])
def test_quantize_gpu(shape, batched, dtype, swizzled, rng):
    x = special_input(shape, dtype, rng)
    check_quantize(x, _gs_for(shape, batched), swizzled=swizzled, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("with_ts", [False, True], ids=["s_over_gs", "s_times_ts"])
def test_quant_dequant_gpu(dtype, with_ts, rng):
    x = special_input((2050, 1040), dtype, rng)
    gs = np.float32(0.75)
    ts = np.float32(1) / gs if with_ts else None
    out = kq.quant_dequant(jnp.asarray(x), gs, ts)
    assert_bits_equal(out, oracle_quant_dequant(x, gs, ts), "fake-quant values")


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
    "shape,batched", [((4099, 1032), False), ((1024, 2048), False), ((4, 256, 520), True)], ids=str
)
@pytest.mark.parametrize("swizzled", [False, True], ids=["plain", "swizzled"])
def test_dequantize_gpu(shape, batched, dtype, swizzled, rng):
    out, expect = _dequantize_vs_oracle(shape, batched, dtype, swizzled, rng, interpret=False)
    assert_bits_equal(out, expect, "dequantized values")


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("gs", [0.37, 1.0, 2.6], ids=str)
def test_near_threshold_gpu(gs, rng):
    x = near_threshold_input((4000, 1024), gs, rng)
    check_quantize(x, np.float32(gs), swizzled=False, interpret=False)
    for ts in (None, np.float32(1) / np.float32(gs)):
        out = kq.quant_dequant(jnp.asarray(x), np.float32(gs), ts)
        assert_bits_equal(out, oracle_quant_dequant(x, np.float32(gs), ts), "fake-quant values")


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu(), reason="needs a GPU")
def test_pack_unpack_gpu(rng):
    codes = rng.integers(0, 16, (3001, 1040), dtype=np.uint8)
    packed = kd.pack_codes(jnp.asarray(codes))
    assert_bits_equal(packed, oracle_pack(codes), "packed")
    assert_bits_equal(kd.unpack_codes(packed), codes, "unpacked")
