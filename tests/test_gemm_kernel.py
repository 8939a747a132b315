"""Tests of the Mosaic GPU NVFP4 weight-only GEMM (nvfp4_jax/kernels/gemm.py).

Tiers:
* CPU, always: prepared-layout bits, exact decode of all codes, the kernel's
  "smem" variant (portable decode) in the Mosaic GPU interpreter on tiny
  shapes, and cross-lowering of the GPU variants for sm_90 (the whole
  Pallas -> Mosaic GPU lowering: layouts, dtypes, SMEM budget; no ptxas).
* ``@pytest.mark.gpu``: compile and run the "registers" variant on an H100
  (all passed on an H100 80GB HBM3 with jax 0.11.2, 2026-11-23).

Tolerance policy: kernel outputs are compared with a float64 numpy reference
by relative Frobenius error; bf16 outputs carry one bf16 rounding (2^-9
relative), so the bound is 1e-2 for bf16 and 2e-3 for f16. Layout and decode
tests are exact.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from cross_lowering import cross_lower, h100_mesh
from hypothesis import given
from hypothesis import strategies as st
from race_detection import RACES, races_found

from nvfp4_jax.kernels import gemm, gemm_tuned

# The value of every E2M1 code 0..15 (independent of the code under test).
E2M1_BY_CODE = np.array(
    [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32
)

G = gemm.GemmConfig
# GPU tests are skipped by tests/conftest.py unless a Hopper GPU is present.
gpu = pytest.mark.gpu


# -----------------------------------------------------------------------------
# Helpers
# -----------------------------------------------------------------------------


# Fresh inputs every run: each helper's seed is mixed with a per-run salt (printed with a
# failing test's output).
_SALT = int.from_bytes(os.urandom(4), "little")


@pytest.fixture(autouse=True)
def _print_salt():
    print(f"random salt {_SALT}")


def _random_weight(n, k, seed):
    rng = np.random.default_rng((_SALT, seed))
    data = rng.integers(0, 256, size=(n, k // 2), dtype=np.uint8)
    # Random positive E4M3 values: every finite positive byte, normals and
    # subnormals alike (0x01..0x7E).
    scales = rng.integers(1, 0x7F, size=(n, k // 16), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    # Keep products in a moderate range so that bf16 outputs do not overflow.
    scales = (scales.astype(np.float32) / 64).astype(ml_dtypes.float8_e4m3fn)
    tensor_scale = np.float32(rng.uniform(0.25, 4.0))
    return data, scales, tensor_scale


def _random_x(m, k, dtype, seed):
    rng = np.random.default_rng((_SALT, seed + 1000))
    return jnp.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype(dtype)


def _random_problem(m, n, k, seed):
    """Random weight (canonical and prepared) and bf16 activations ``[m, k]``."""
    data, scales, ts = _random_weight(n, k, seed)
    x = _random_x(m, k, jnp.bfloat16, seed)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts)
    return data, scales, ts, x, prep


def _dequant64(data, scales, tensor_scale):
    codes = np.stack([data & 0xF, data >> 4], axis=-1).reshape(data.shape[0], -1)
    values = E2M1_BY_CODE.astype(np.float64)[codes]
    s = np.repeat(np.asarray(scales).astype(np.float64), 16, axis=1)
    return values * s * np.float64(tensor_scale)  # W^T [N, K]


def _reference64(x, data, scales, tensor_scale, bias=None):
    y = np.asarray(x.astype(jnp.float32), np.float64) @ _dequant64(data, scales, tensor_scale).T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def _rel_err(y, ref):
    y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
    return np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30)


def _tolerance(out_dtype):
    return 1e-2 if jnp.dtype(out_dtype) == jnp.bfloat16 else 2e-3


# -----------------------------------------------------------------------------
# Layout and decode (exact)
# -----------------------------------------------------------------------------


def _place_code(code, q):
    """Lane bits of E2M1 ``code`` as quarter ``q`` (the documented prepared layout)."""
    return sum(((code >> i) & 1) << pos for i, pos in enumerate(gemm._LANE_BITS[q]))


def _lane_code(lane, q):
    return sum(((int(lane) >> pos) & 1) << i for i, pos in enumerate(gemm._LANE_BITS[q]))


@pytest.mark.parametrize("k_group", [64, 128])
def test_prepared_layout_bits(k_group):
    n, k = 40, 160  # K % 32 == 0, as k-group 128 needs; pads to whole k-groups
    data, scales, ts = _random_weight(n, k, seed=3)
    prep = gemm.prepare_weight(
        jnp.asarray(data), jnp.asarray(scales), ts, dtype=jnp.bfloat16, k_group=k_group
    )
    k_pad, n_pad, lanes = -(-k // k_group) * k_group, 48, k_group // 4
    assert prep.data.shape == (k_pad // k_group, n_pad, lanes)
    assert prep.data.dtype == jnp.uint16
    assert prep.scales.shape == (k_pad // k_group, n_pad // 16, k_group)
    codes = np.zeros((n_pad, k_pad), np.uint16)
    codes[:n, :k] = np.stack([data & 0xF, data >> 4], -1).reshape(n, k)
    packed = np.asarray(prep.data)
    for g, nn, j, q in [
        (0, 0, 0, 0),
        (0, 5, 3, 2),
        (k_pad // k_group - 1, n - 1, lanes - 1, 3),
        (1, 17, 7, 1),
    ]:
        kk = g * k_group + q * lanes + j
        assert _lane_code(packed[g, nn, j], q) == codes[nn, kk]
    # Full check against a vectorized re-derivation.
    c = codes.reshape(n_pad, k_pad // k_group, 4, lanes)
    expect = sum(_place_code(c[:, :, q, :].astype(np.uint32), q) for q in range(4))
    np.testing.assert_array_equal(packed, expect.transpose(1, 0, 2))
    assert sorted(b for q in gemm._LANE_BITS for b in q) == list(range(16))
    s = np.zeros((n_pad, k_pad // 16), np.float32)
    s[:n, : k // 16] = scales.astype(np.float32)
    got = np.asarray(prep.scales.astype(jnp.float32)) * 2.0 ** -gemm.scale_exponent(jnp.bfloat16)
    blocks = k_group // 16
    for g, nn, j in [(0, 0, 0), (0, 17, blocks - 1), (k_pad // k_group - 1, n - 1, 1), (1, 9, 2)]:
        # scales[g, p, r * kg/16 + j] is block j of k-group g of feature 16 p + r
        assert got[g, nn // 16, (nn % 16) * blocks + j] == s[nn, g * blocks + j]
    rows = np.asarray(gemm.scale_rows(prep.scales).astype(jnp.float32))
    rows = rows * 2.0 ** -gemm.scale_exponent(jnp.bfloat16)
    np.testing.assert_array_equal(rows, s.reshape(n_pad, -1, blocks).transpose(1, 0, 2))
    np.testing.assert_array_equal(gemm.scales_from_rows(gemm.scale_rows(prep.scales)), prep.scales)
    np.testing.assert_array_equal(
        gemm.block_major_scales(prep.scales).astype(jnp.float32),
        rows.transpose(0, 2, 1).reshape(-1, n_pad) * 2.0 ** gemm.scale_exponent(jnp.bfloat16),
    )
    with pytest.raises(ValueError, match=r"prepared \[\.\.\., K_pad/kg, N_pad/16, kg\]"):
        gemm.scale_rows(prep.scales[..., :5])
    with pytest.raises(ValueError, match="N_pad a multiple of 16"):
        gemm.scales_from_rows(gemm.scale_rows(prep.scales)[:, :40])


def test_compact_scales_every_e4m3_value():
    """Every E4M3 byte: the compact byte widens back to the exact scale (times the decode's
    power of two, for bf16 and f16), NaN to inf with the block's codes zeroed, and a zero or
    negative scale moves into the codes."""
    e4m3 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).reshape(1, 256)
    data = np.random.default_rng((_SALT, 40)).integers(0, 256, (1, 256 * 8), dtype=np.uint8)
    new_data, compact = gemm.compact_scales(jnp.asarray(data), jnp.asarray(e4m3))
    assert compact.dtype == jnp.uint8 and compact.shape == (1, 256)
    s = e4m3[0].astype(np.float64)
    for dtype in (jnp.bfloat16, jnp.float16):
        for exp in (0, gemm.scale_exponent(dtype)):
            wide = gemm._widen_compact(compact[0], dtype, exp).astype(jnp.float32)
            wide = np.asarray(wide, np.float64)
            live = np.isfinite(s) & (s != 0)
            np.testing.assert_array_equal(wide[live], np.abs(s[live]) * 2.0**exp)
            assert np.all(np.isposinf(wide[np.isnan(s)]))
    per_byte = np.repeat(s, 8)
    new_data = np.asarray(new_data)[0]
    np.testing.assert_array_equal(new_data[(per_byte == 0) | np.isnan(per_byte)], 0)
    np.testing.assert_array_equal(new_data[per_byte > 0], data[0][per_byte > 0])
    np.testing.assert_array_equal(new_data[per_byte < 0], data[0][per_byte < 0] ^ 0x88)
    with pytest.raises(TypeError, match="scales float8_e4m3fn"):
        gemm.compact_scales(jnp.asarray(data), jnp.asarray(e4m3).astype(jnp.float32))
    with pytest.raises(ValueError, match=r"scales must be \[\.\.\., N, K/16\]"):
        gemm.compact_scales(jnp.asarray(data), jnp.asarray(e4m3)[:, :255])


def test_interpret_compact_scales_signs_zeros_and_nans():
    _check_compact_specials(jnp.bfloat16, _interp_config(8, 64, 256), interpret=True)


def _check_compact_specials(dtype, config, interpret=False):
    """A weight with negative, zero, subnormal and NaN block scales, prepared with compact
    scales: the product matches float64 where finite and is NaN exactly in the outputs
    whose dot product touches a NaN block."""
    m, n, k = 8, 64, 256
    data, scales, ts = _random_weight(n, k, seed=41)
    rng = np.random.default_rng((_SALT, 42))
    s = scales.astype(np.float32)
    s = np.where(rng.random(s.shape) < 0.3, -s, s)
    s[rng.random(s.shape) < 0.1] = 0.0
    s[rng.random(s.shape) < 0.1] = 2.0**-9  # the smallest subnormal
    s = s.astype(ml_dtypes.float8_e4m3fn)
    s[3, 5] = np.nan
    x = _random_x(m, k, dtype, seed=43)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(s), ts, dtype=None)
    y = gemm.nvfp4_matmul(x, prep, n=n, k=k, config=config, interpret=interpret)
    y = np.asarray(y.astype(jnp.float32), np.float64)
    ref = _reference64(x, data, s, ts)
    assert np.all(np.isnan(y[:, 3])) and np.isnan(y).sum() == m
    finite = np.ones(n, bool)
    finite[3] = False
    rel = np.linalg.norm(y[:, finite] - ref[:, finite]) / np.linalg.norm(ref[:, finite])
    assert rel <= 1e-2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_prepared_widened_scales(dtype):
    data, scales, ts = _random_weight(32, 64, seed=4)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts, dtype=dtype)
    assert prep.scales.dtype == dtype
    rows = gemm.scale_rows(prep.scales)  # [K_pad/128, N_pad, 8]
    got = np.asarray(rows.astype(jnp.float32)) * 2.0 ** -gemm.scale_exponent(dtype)
    np.testing.assert_array_equal(got[0, :, :4], scales.astype(np.float32))
    np.testing.assert_array_equal(got[0, :, 4:], 0)  # K padded to the 128-wide k-group


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_portable_decode_is_exact(dtype):
    # Every code in every quarter, with a different code in each other quarter.
    codes = np.arange(16, dtype=np.uint32)
    lanes = sum(_place_code((codes + 5 * q) % 16, q) for q in range(4))
    lanes = jnp.asarray(lanes.astype(np.uint16)).reshape(16, 1)
    for q in range(4):
        got = np.asarray(gemm._decode_quarter(lanes, q, dtype).astype(jnp.float32))[:, 0]
        expect = E2M1_BY_CODE[(np.arange(16) + 5 * q) % 16]
        np.testing.assert_array_equal(got, expect)
        assert np.array_equal(np.signbit(got), np.signbit(expect))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_fast_decode_plan_places_every_code(dtype):
    """The fast decode's shift/mask terms, run on uint32 in numpy, give ``sign << 15 |
    em << s`` in both 16-bit halves for every code of every quarter (the GPU runs the
    same terms in inline PTX-level arith)."""
    s = jnp.finfo(dtype).nmant - 1
    rng = np.random.default_rng()
    lo, hi = rng.integers(0, 16, (2, 4, 4096), dtype=np.uint32)
    lanes_lo = sum(_place_code(lo[q], q) for q in range(4))
    lanes_hi = sum(_place_code(hi[q], q) for q in range(4))
    r = (lanes_lo | lanes_hi << 16).astype(np.uint32)
    for q, terms in enumerate(gemm._fast_decode_plan(dtype)):
        bits = np.zeros_like(r)
        for amount, mask in terms:
            shifted = r << np.uint32(amount) if amount >= 0 else r >> np.uint32(-amount)
            bits |= shifted & np.uint32(mask)
        for half, code in ((bits & 0xFFFF, lo[q]), (bits >> 16, hi[q])):
            np.testing.assert_array_equal(half, ((code & 8) << 12) | ((code & 7) << s))



@pytest.mark.parametrize("dtype,alu,imad", [(jnp.bfloat16, 7, 4), (jnp.float16, 8, 6)])
def test_fast_decode_plan_keeps_integer_alu_ops_low(dtype, alu, imad):
    """Per register (eight weights) the plan costs one LOP3 per term and one SHF per right
    shift on the integer ALU pipe, which binds the decode, and one IMAD.SHL per left shift
    (benchmarks/results/ab_decode-2026-12-03.md); the lane layout is chosen for the bf16
    minimum of 7 ALU ops within 11."""
    plan = gemm._fast_decode_plan(dtype)
    terms = [amount for quarter in plan for amount, _ in quarter]
    assert len(terms) + sum(a < 0 for a in terms) == alu
    assert sum(a > 0 for a in terms) == imad

def test_fast_decode_bit_pattern_is_exact():
    """The fast decode's placement ``sign<<15 | em<<s`` times the folded scale."""
    for dtype in (jnp.bfloat16, jnp.float16):
        s = jnp.finfo(dtype).nmant - 1
        codes = np.arange(16, dtype=np.uint16)
        bits = ((codes & 8) << 12) | ((codes & 7) << s)
        placed = jnp.asarray(bits).view(dtype).astype(jnp.float32)
        # XLA:CPU flushes bf16 subnormals, so rebuild the value in float64.
        exact = np.where(
            (codes & 7) == 1,
            2.0 ** (1 - (1 - jnp.finfo(dtype).minexp)) / 2,
            np.asarray(placed, np.float64),
        )
        exact = np.copysign(np.abs(exact), np.where(codes & 8, -1.0, 1.0))
        scaled = exact * 2.0 ** (gemm.scale_exponent(dtype) + gemm._FAST_SHIFT)
        np.testing.assert_array_equal(scaled, E2M1_BY_CODE)


# -----------------------------------------------------------------------------
# Interpreter: the "smem" variant with the portable decode
# -----------------------------------------------------------------------------


def _interp_config(m, n, k, split_k=1, tile_k=None):
    return G(
        tile_n=64 if n <= 64 else 128,
        tile_m=min(64, -(-m // 8) * 8),
        tile_k=tile_k or gemm.default_k_group(k),
        stages=2,
        split_k=split_k,
        a_operand="smem",
    )


@pytest.mark.parametrize("m", [1, 3, 16, 70])
@pytest.mark.parametrize("n", [64, 200])
@pytest.mark.parametrize("k", [48, 256])
def test_interpret_matches_reference(m, n, k):
    data, scales, ts = _random_weight(n, k, seed=m * 7 + n + k)
    x = _random_x(m, k, jnp.bfloat16, seed=m + n + k)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts)
    split_k = 2 if k == 256 and m < 16 else 1
    y = gemm.nvfp4_matmul(
        x, prep, n=n, k=k, config=_interp_config(m, n, k, split_k), interpret=True
    )
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel_err(y, _reference64(x, data, scales, ts)) <= _tolerance(jnp.bfloat16)


@pytest.mark.parametrize(
    "dtype,scale_dtype,split_k",
    [
        (jnp.bfloat16, jnp.bfloat16, 1),
        (jnp.bfloat16, None, 2),
        (jnp.float16, jnp.float16, 1),
        (jnp.float16, jnp.bfloat16, 2),
    ],
)
def test_interpret_bias_and_dtypes(dtype, scale_dtype, split_k):
    m, n, k = 16, 200, 256
    data, scales, ts = _random_weight(n, k, seed=11)
    x = _random_x(m, k, dtype, seed=12)
    bias = jnp.asarray(np.random.default_rng((_SALT, 13)).standard_normal(n).astype(np.float32))
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts, dtype=scale_dtype)
    y = gemm.nvfp4_matmul(
        x,
        prep,
        n=n,
        k=k,
        bias=bias,
        out_dtype=dtype,
        config=_interp_config(m, n, k, split_k=split_k),
        interpret=True,
    )
    assert y.dtype == dtype
    assert _rel_err(y, _reference64(x, data, scales, ts, bias)) <= _tolerance(dtype)


def test_interpret_multi_warpgroup_tiles():
    """tile_n=192 as 3 warpgroups x 64 rows and tile_n=256 as 2 x 128 rows."""
    m, n, k = 24, 256, 512
    data, scales, ts = _random_weight(n, k, seed=21)
    x = _random_x(m, k, jnp.bfloat16, seed=22)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts)
    ref = _reference64(x, data, scales, ts)
    for cfg in (
        G(tile_n=192, compute_wgs=3, tile_m=24, tile_k=128, stages=2, split_k=2, a_operand="smem"),
        G(tile_n=256, compute_wgs=2, tile_m=24, tile_k=128, stages=3, a_operand="smem"),
    ):
        y = gemm.nvfp4_matmul(x, prep, n=n, k=k, config=cfg, interpret=True)
        assert _rel_err(y, ref) <= _tolerance(jnp.bfloat16), cfg


def test_interpret_prefill_token_tiles():
    """Token tiles that prefill_token_tile (64..176 of 256 features) and prefill_tiling
    (64..256 of 128 features, 16-token output chunks) pick, over a token count that leaves
    the last tile partly empty."""
    m, n, k = 250, 256, 256
    data, scales, ts = _random_weight(n, k, seed=23)
    x = _random_x(m, k, jnp.bfloat16, seed=24)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts)
    ref = _reference64(x, data, scales, ts)
    for cfg in (
        G(tile_n=256, tile_m=112, tile_k=128, stages=2, a_operand="smem"),
        G(tile_n=256, tile_m=152, tile_k=128, stages=2, a_operand="smem"),
        G(tile_n=128, tile_m=200, tile_k=128, stages=3, out_chunk=16, a_operand="smem"),
    ):
        y = gemm.nvfp4_matmul(x, prep, n=n, k=k, config=cfg, interpret=True)
        assert y.shape == (m, n) and np.isfinite(np.asarray(y, np.float32)).all(), cfg
        assert _rel_err(y, ref) <= _tolerance(jnp.bfloat16), cfg


@pytest.mark.parametrize(
    "tile_m,out_chunk,split_k,dtype",
    [
        (56, 16, 1, jnp.bfloat16),  # chunks of 16, 16, 16, 8 tokens; bias in the epilogue
        (64, 24, 1, jnp.float16),  # chunks of 24, 24, 16
        (48, 16, 2, jnp.bfloat16),  # f32 partial sums in chunks of 16
    ],
)
def test_interpret_chunked_output(tile_m, out_chunk, split_k, dtype):
    """The output tile stored ``out_chunk`` tokens at a time through one SMEM buffer, over
    two token tiles of which the last is partly empty, against the float64 reference."""
    m, n, k = tile_m + 21, 136, 256
    data, scales, ts = _random_weight(n, k, seed=tile_m + out_chunk)
    x = _random_x(m, k, dtype, seed=tile_m + split_k)
    bias = jnp.asarray(np.random.default_rng((_SALT, 41)).standard_normal(n).astype(np.float32))
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts)
    cfg = G(
        tile_n=128,
        tile_m=tile_m,
        tile_k=128,
        stages=2,
        split_k=split_k,
        out_chunk=out_chunk,
        a_operand="smem",
    )
    y = gemm.nvfp4_matmul(x, prep, n=n, k=k, bias=bias, out_dtype=dtype, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, _reference64(x, data, scales, ts, bias)) <= _tolerance(dtype)


@pytest.mark.parametrize(
    "m,n,k,ctas,dtype,max_tiles",
    [
        (5, 200, 320, 3, jnp.bfloat16, 2),  # 2 tiles x 5 steps: runs 0-2, 3-5 (crosses), 6-9
        (5, 200, 576, 5, jnp.float16, 2),  # 2 tiles x 9 steps in runs of 3-4, one crossing
        (3, 64, 48, 1, jnp.bfloat16, 1),  # one tile of one step, one CTA
        (70, 136, 256, 3, jnp.bfloat16, 2),  # 2 token tiles, a last tile of 8 features
        (3, 520, 128, 2, jnp.bfloat16, 3),  # 5 tiles x 2 steps: each run touches 3 tiles
    ],
)
def test_interpret_stream_k(m, n, k, ctas, dtype, max_tiles):
    """Stream-K runs that end inside a tile or span several, with bias, both dtypes and
    several token tiles, against the float64 reference."""
    data, scales, ts = _random_weight(n, k, seed=m + n + ctas)
    x = _random_x(m, k, dtype, seed=ctas)
    bias = jnp.asarray(np.random.default_rng((_SALT, 17)).standard_normal(n).astype(np.float32))
    # k-group 64 (the layout's smallest): the steps of tile_k 64 set the runs above
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts, dtype=dtype, k_group=64)
    cfg = dataclasses.replace(_interp_config(m, n, k, tile_k=64), stream_k=ctas)
    assert gemm.stream_k_schedule(cfg, n, k).max_tiles == max_tiles  # mid-pipeline stores
    y = gemm.nvfp4_matmul(x, prep, n=n, k=k, bias=bias, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, _reference64(x, data, scales, ts, bias)) <= _tolerance(dtype)


@given(n_tiles=st.integers(1, 40), tile_steps=st.integers(1, 40), data=st.data())
def test_stream_k_terms_cover_every_unit_once(n_tiles, tile_steps, data):
    """Adding sign * (units behind each slot) over a tile's terms gives exactly its units."""
    ctas = data.draw(st.integers(1, n_tiles * tile_steps))
    sched = gemm.StreamK(n_tiles, tile_steps, ctas)
    behind = {}  # slot -> units accumulated into it: the run up to the end of its s-th tile
    for c in range(ctas):
        u0, u1 = sched.run(c)
        assert u1 > u0
        for s, t in enumerate(sched.tiles_of(c)):
            behind[c * sched.max_tiles + s] = np.arange(u0, min(u1, (t + 1) * tile_steps))
    slots, signs = sched.terms()
    for t in range(n_tiles):
        count = np.zeros(sched.units)
        for slot, sign in zip(slots[t], signs[t]):
            if sign:
                np.add.at(count, behind[int(slot)], sign)
        expected = np.zeros(sched.units)
        expected[t * tile_steps : (t + 1) * tile_steps] = 1
        np.testing.assert_array_equal(count, expected)


def test_zero_weight_gives_bias():
    m, n, k = 8, 64, 64
    prep = gemm.prepare_weight(
        jnp.zeros((n, k // 2), jnp.uint8), jnp.zeros((n, k // 16), jnp.float8_e4m3fn), 1.0
    )
    bias = jnp.arange(n, dtype=jnp.float32)
    y = gemm.nvfp4_matmul(
        jnp.ones((m, k), jnp.bfloat16),
        prep,
        n=n,
        k=k,
        bias=bias,
        config=G(tile_n=64, tile_m=8, tile_k=128, a_operand="smem"),
        interpret=True,
    )
    np.testing.assert_array_equal(
        np.asarray(y.astype(jnp.float32)), np.broadcast_to(np.arange(n, dtype=np.float32), (m, n))
    )


def test_race_detector_sees_a_race():
    """The check below is not vacuous: two warpgroups writing one SMEM tile unordered."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(x_gmem, o_gmem, smem):
        wg = jax.lax.axis_index("wg")
        smem[...] = jnp.full((8, 128), wg.astype(jnp.float32), jnp.float32)

        @pl.when(wg == 0)
        def _():
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, o_gmem)
            plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        scratch_types=[plgpu.SMEM((8, 128), jnp.float32)],
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=RACES,
    )
    kernel(jnp.zeros((8, 128), jnp.float32)).block_until_ready()
    assert races_found()


@pytest.mark.parametrize(
    "cfg",
    [
        # two compute warpgroups, more K steps than stages (buffer reuse), bias
        G(tile_n=128, tile_m=16, tile_k=128, stages=2, a_operand="smem", fast_decode=False),
        # split-K partials, a k-group spanning two steps' worth of blocks
        G(
            tile_n=128,
            tile_m=8,
            tile_k=128,
            stages=2,
            split_k=2,
            a_operand="smem",
            fast_decode=False,
        ),
        # stream-K: 3 CTAs over 2 tiles x 4 steps; the second run crosses into tile 1
        G(tile_n=128, tile_m=8, tile_k=128, stages=2, stream_k=3, a_operand="smem"),
        # the output tile in chunks through one SMEM buffer (each reused after its store)
        G(tile_n=128, tile_m=24, tile_k=128, stages=2, out_chunk=8, a_operand="smem"),
    ],
    ids=["two_wgs_stages2", "split_k2", "stream_k3", "out_chunk8"],
)
def test_interpreter_finds_no_races(cfg):
    m, n, k = 20, 136, 512
    data, scales, ts, x, prep = _random_problem(m, n, k, seed=21)
    bias = jnp.asarray(np.random.default_rng((_SALT, 21)).standard_normal(n).astype(np.float32))
    y = gemm.nvfp4_matmul(x, prep, n=n, k=k, bias=bias, config=cfg, interpret=RACES)
    assert not races_found()
    assert _rel_err(y, _reference64(x, data, scales, ts, bias)) <= _tolerance(jnp.bfloat16)


def _fold_config(fold, tile_n, tile_k, compute_wgs=None):
    return G(
        tile_n=tile_n,
        tile_m=64,
        tile_k=tile_k,
        stages=2,
        k_fold=fold,
        compute_wgs=compute_wgs,
        a_operand="smem",
        fast_decode=False,
    )


@pytest.mark.parametrize(
    "m,n,k,fold,tile_n,tile_k,compute_wgs,dtype,bias",
    [
        (1, 64, 256, 2, 32, 64, None, jnp.bfloat16, False),  # one warpgroup, 2 parts
        (3, 64, 256, 4, 16, 64, None, jnp.bfloat16, True),  # 12 x rows
        (16, 80, 512, 4, 32, 128, None, jnp.bfloat16, True),  # N past the last tile
        (5, 48, 512, 4, 16, 128, 1, jnp.float16, False),  # 4 parts in one warpgroup
        (24, 64, 1024, 4, 32, 128, None, jnp.bfloat16, True),  # 96 x rows: 2 token tiles
        (7, 128, 512, 2, 64, 64, None, jnp.float16, True),  # 2 warpgroups of 1 part
    ],
)
def test_interpret_k_fold(m, n, k, fold, tile_n, tile_k, compute_wgs, dtype, bias):
    """K-folded tiles (``GemmConfig.k_fold``) against the float64 reference."""
    data, scales, ts = _random_weight(n, k, seed=31 + m)
    x = _random_x(m, k, dtype, seed=32 + m)
    b = None
    if bias:
        b = jnp.asarray(np.random.default_rng((_SALT, 33)).standard_normal(n).astype(np.float32))
    prep = gemm.prepare_weight(
        jnp.asarray(data), jnp.asarray(scales), ts, k_group=min(tile_k, gemm.DEFAULT_K_GROUP)
    )
    cfg = _fold_config(fold, tile_n, tile_k, compute_wgs)
    y = gemm.nvfp4_matmul(x, prep, n=n, k=k, bias=b, out_dtype=dtype, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, _reference64(x, data, scales, ts, b)) <= _tolerance(dtype)


def test_interpreter_finds_no_races_k_fold():
    """The accumulator hand-over of the K-folded epilogue is ordered (barrier)."""
    m, n, k = 5, 40, 1024
    data, scales, ts, x, prep = _random_problem(m, n, k, seed=34)
    bias = jnp.asarray(np.random.default_rng((_SALT, 34)).standard_normal(n).astype(np.float32))
    cfg = _fold_config(4, 16, 128)  # two K steps in two stages
    y = gemm.nvfp4_matmul(x, prep, n=n, k=k, bias=bias, config=cfg, interpret=RACES)
    assert not races_found()
    assert _rel_err(y, _reference64(x, data, scales, ts, bias)) <= _tolerance(jnp.bfloat16)


# -----------------------------------------------------------------------------
# Validation
# -----------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError):
        G(tile_n=96)
    with pytest.raises(ValueError):
        G(tile_m=12)
    with pytest.raises(ValueError):
        G(tile_k=48)
    with pytest.raises(ValueError):
        G(tile_n=256, compute_wgs=1)
    with pytest.raises(ValueError):  # would deadlock in setmaxnreg
        G(tile_n=256, compute_wgs=4)
    with pytest.raises(ValueError):
        G(a_operand="tmem")
    with pytest.raises(ValueError, match="overlap_decode needs a_operand='registers'"):
        G(a_operand="smem", overlap_decode=True)
    with pytest.raises(ValueError, match="group_wgmma needs a_operand='registers'"):
        G(a_operand="smem", group_wgmma=True)
    for bad in (12, -8, 264):
        with pytest.raises(ValueError, match=f"out_chunk must be 0 .* got {bad}"):
            G(out_chunk=bad)
    with pytest.raises(ValueError, match="out_chunk=32 needs k_fold=1"):
        G(tile_n=32, k_fold=4, out_chunk=32)


def test_k_fold_validation():
    assert G(tile_n=32, k_fold=4).cta_rows == 128 and G(tile_n=32, k_fold=4).num_compute_wgs == 2
    assert G(tile_n=16, k_fold=4).num_compute_wgs == 1
    with pytest.raises(ValueError, match="k_fold must be 1, 2 or 4"):
        G(tile_n=32, k_fold=3)
    with pytest.raises(ValueError, match="tile_n must be a multiple of 16"):
        G(tile_n=24, k_fold=4)
    with pytest.raises(ValueError, match="tile_n must be a multiple of 16"):
        G(tile_n=128, k_fold=4)  # 512 rows
    with pytest.raises(ValueError, match="split_k=1 and stream_k=0"):
        G(tile_n=32, k_fold=4, split_k=2)
    with pytest.raises(ValueError, match="split_k=1 and stream_k=0"):
        G(tile_n=32, k_fold=4, stream_k=132)
    with pytest.raises(ValueError, match="whole K parts"):
        G(tile_n=48, k_fold=4, compute_wgs=3)  # 64-row warpgroups of 48-feature parts
    data, scales, ts = _random_weight(64, 512, seed=0)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts)
    x = jnp.ones((2, 512), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of k_fold \\* tile_k = 1024"):
        gemm.nvfp4_matmul(x, prep, n=64, k=512, config=G(tile_n=32, tile_k=256, k_fold=4))
    with pytest.raises(NotImplementedError, match="k_fold on the GPU needs the fast decode"):
        cfg = G(tile_n=32, tile_k=128, k_fold=2, fast_decode=False)
        gemm.nvfp4_matmul(x, prep, n=64, k=512, config=cfg)
    stack = gemm.prepare_weight(
        jnp.asarray(np.stack([data] * 2)), jnp.asarray(np.stack([scales] * 2)), ts
    )
    with pytest.raises(ValueError, match="neither stream-K nor k_fold"):
        gemm.nvfp4_grouped_matmul(
            x, stack, jnp.array([1, 1]), n=64, k=512, config=G(tile_n=32, k_fold=2)
        )


def test_launch_rows_and_fold_view():
    assert [gemm.launch_rows(m) for m in (0, 1, 8, 9, 16)] == [0, 1, 8, 16, 16]
    assert [gemm.launch_rows(m, 4) for m in (1, 2, 3, 5)] == [1, 2, 4, 6]
    assert [gemm.launch_rows(m, 2) for m in (4, 5, 13)] == [4, 8, 16]
    assert gemm.fold_view(jnp.zeros((8, 16, 32), jnp.uint16), 4).shape == (4, 2, 16, 32)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="m must be an int"):
            gemm.launch_rows(bad)
    with pytest.raises(ValueError, match="k_fold must be 1, 2 or 4"):
        gemm.launch_rows(3, 3)
    with pytest.raises(ValueError, match=r"shape \(6, 16\)"):
        gemm.fold_view(jnp.zeros((6, 16)), 4)
    with pytest.raises(ValueError, match="k_fold=1"):
        gemm.fold_view(jnp.zeros((8, 16)), 1)


def test_group_wgmma_default():
    # one wgmma per k-group from 3 pipeline stages on, with register operands only
    assert G(stages=3).use_group_wgmma and G(stages=4).use_group_wgmma
    assert not G(stages=2).use_group_wgmma
    assert not G(stages=4, a_operand="smem").use_group_wgmma
    assert G(stages=2, group_wgmma=True).use_group_wgmma
    assert not G(stages=4, group_wgmma=False).use_group_wgmma


def test_wrapper_validation():
    data, scales, ts = _random_weight(64, 128, seed=0)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts, k_group=64)
    x = jnp.zeros((4, 128), jnp.bfloat16)
    wide = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts)  # k-group 128
    with pytest.raises(ValueError, match="tile_k=64 must be a multiple of k_group=128"):
        gemm.nvfp4_matmul(x, wide, n=64, k=128, config=G(tile_k=64))
    with pytest.raises(ValueError, match="k_group must be"):
        gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts, k_group=32)
    odd_data, odd_scales, _ = _random_weight(64, 48, seed=0)  # K = 48: x rows of 16 only
    assert gemm.prepare_weight(jnp.asarray(odd_data), jnp.asarray(odd_scales), ts).k_group == 64
    with pytest.raises(ValueError, match="multiple of 32"):
        gemm.prepare_weight(jnp.asarray(odd_data), jnp.asarray(odd_scales), ts, k_group=128)
    with pytest.raises(ValueError, match="k_group must be"):
        gemm.default_config(1, 64, 128, k_group=96)
    with pytest.raises(ValueError):
        gemm.nvfp4_matmul(x, prep, n=64, k=256)
    with pytest.raises(ValueError):
        gemm.nvfp4_matmul(x.astype(jnp.float32), prep, n=64, k=128)
    with pytest.raises(ValueError):
        gemm.nvfp4_matmul(x, prep, n=64, k=128, config=G(split_k=3, tile_k=64))
    with pytest.raises(NotImplementedError):
        gemm.nvfp4_matmul(x, prep, n=64, k=128, config=G(), interpret=True)
    cluster = G(tile_k=64, split_k=2, split_k_reduce="cluster", a_operand="smem")
    with pytest.raises(NotImplementedError, match="cluster"):
        gemm.nvfp4_matmul(x, prep, n=64, k=128, config=cluster, interpret=True)
    with pytest.raises(ValueError, match="split_k <= 8"):
        G(split_k=9, split_k_reduce="cluster")
    with pytest.raises(ValueError, match="split_k_reduce"):
        G(split_k=2, split_k_reduce="atomic")
    with pytest.raises(ValueError):
        gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales[:, :3]), ts)
    with pytest.raises(ValueError, match="stream_k"):
        G(split_k=2, stream_k=4)
    with pytest.raises(ValueError, match="stream_k"):
        G(stream_k=-1)
    # N = 200, K = 128: 2 tiles of 128 features x 1 step of 128 = 2 units
    with pytest.raises(ValueError, match=r"stream_k=3 must be at most .* = 2 units"):
        gemm.nvfp4_matmul(
            x,
            gemm.prepare_weight(*map(jnp.asarray, _random_weight(200, 128, 1))),
            n=200,
            k=128,
            config=G(tile_k=128, stream_k=3),
        )


def test_default_config_buckets():
    for m in (1, 16, 64, 256, 1024, 4096):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)):
            cfg = gemm.default_config(m, n, k, num_sms=132)
            tile_m = min(cfg.tile_m, -(-m // 8) * 8)
            assert gemm.smem_bytes(cfg, tile_m) <= gemm._SMEM_BYTES
            assert (-(-k // cfg.tile_k)) % cfg.split_k == 0
            if m <= 64:
                assert cfg.tile_m == -(-m // 8) * 8
    # Decode while 128-feature tiles fit in one wave: 64-row warpgroups, split-K to fill it,
    # inside the CTA (K-folded) at M <= 8
    for m in (1, 16, 64):
        narrow = gemm.default_config(m, 4096, 4096, num_sms=132, tuned=False)
        if m == 1:
            assert (narrow.tile_n, narrow.k_fold, narrow.split_k, narrow.tile_m) == (32, 4, 1, 8)
        else:
            assert (narrow.tile_n, narrow.tile_k, narrow.split_k, narrow.k_fold) == (128, 128, 4, 1)
        one_wave = gemm.default_config(m, 14336, 4096, num_sms=132, tuned=False)  # 112 tiles
        assert (one_wave.tile_n, one_wave.split_k, one_wave.stream_k) == (128, 1, 0)
    folded = gemm.default_config(8, 8192, 4096, num_sms=132, tuned=False)  # 64 tiles x 2
    assert (folded.tile_n, folded.k_fold, folded.tile_m, folded.num_compute_wgs) == (64, 2, 16, 2)
    narrow64 = gemm.default_config(1, 4096, 4096, num_sms=132, k_group=64, tuned=False)
    assert (narrow64.tile_n, narrow64.tile_k, narrow64.k_fold) == (32, 128, 4)
    # Beyond a wave: 256-feature tiles; at M <= 8 where their one wave leaves >10% of the
    # SMs idle, stream-K over all of them, unless ruled out
    stream = gemm.default_config(1, 28672, 8192, num_sms=132, tuned=False)  # 112 tiles
    assert (stream.tile_n, stream.tile_k, stream.split_k, stream.stream_k) == (256, 128, 1, 132)
    for m, flag in ((1, False), (16, True), (64, True)):
        plain = gemm.default_config(m, 28672, 8192, num_sms=132, tuned=False, stream_k=flag)
        assert (plain.tile_n, plain.tile_k, plain.split_k, plain.stream_k) == (256, 256, 1, 0)
    assert gemm.default_config(1, 57344, 8192, num_sms=132, tuned=False).stream_k == 0
    assert gemm.single_kernel_config(stream, 1, 8192).stream_k == 0
    # Prefill: 256 x 128 tiles with split-K, unless the f32 partial sums would outweigh
    # the weight (4 splits of 256-feature tiles at N = K = 4096, M = 256): 128 x 128 tiles
    # and half the splits. 128-token f32 partials are stored 64 tokens at a time.
    small = gemm.default_config(256, 4096, 4096, num_sms=132, tuned=False)
    assert (small.tile_n, small.tile_m, small.split_k) == (128, 128, 2)
    long_k = gemm.default_config(256, 4096, 14336, num_sms=132, tuned=False)
    assert (long_k.tile_n, long_k.tile_m, long_k.split_k) == (256, 128, 4)
    assert gemm.smem_bytes(long_k, 128) <= gemm._SMEM_BYTES
    assert gemm._out_chunk(long_k, 128) == 64 and gemm._out_chunk(long_k, 104) == 64
    # 256 x 128 tiles at tile_k 128: the output in 32-token chunks buys a fourth stage
    # (not where it buys fewer, nor where the whole tile already leaves room for 4)
    for m, n, chunk, stages in (
        (1024, 4096, 32, 4),
        (4096, 28672, 32, 4),
        (768, 14336, 32, 4),  # 112-token tiles
        (1024, 14336, 0, 2),  # 152-token tiles: the chunks would buy a third stage only
    ):
        cfg = gemm.default_config(m, n, 4096, num_sms=132, tuned=False)
        assert (cfg.out_chunk, cfg.stages) == (chunk, stages), (m, n)
        assert gemm.smem_bytes(cfg, cfg.tile_m) <= gemm._SMEM_BYTES
    prefill = gemm.default_config(1024, 4096, 4096, num_sms=132, tuned=False)
    assert gemm._out_chunk(prefill, 128) == 32
    assert gemm._out_chunk(G(tile_m=128, out_chunk=32), 24) == 24
    k64 = gemm.default_config(1024, 4096, 4096, num_sms=132, tuned=False, k_group=64)
    assert (k64.stages, k64.out_chunk) == (4, 0)
    # M in [256, 2048) at tile_k 128: prefill_tiling's cost model over 128- and 256-feature
    # tiles (its SMEM, stage and tie rules: test_prefill_tiling)
    for m, n, scale_itemsize, tiling in (
        (768, 4096, 1, (128, 192, 3, 1, 16)),  # 128 tiles, not 96 of 128 x 256
        (1024, 4096, 1, (128, 256, 3, 1, 16)),
        (1024, 4096, 2, (256, 128, 4, 1, 32)),  # 3 stages of 128 x 256 need compact scales
        (1536, 14336, 1, (128, 224, 3, 1, 16)),  # 784 tiles: 5.94 waves
        (768, 14336, 1, (256, 112, 4, 1, 32)),  # the rule's tiling is the cheapest
        (2048, 4096, 1, (256, 128, 4, 1, 32)),  # the dequantize route's range: old rule
        (256, 4096, 1, (128, 128, 4, 2, 0)),  # the split-K rule's tiling, as cheap
        (320, 4096, 1, (128, 160, 4, 2, 16)),  # 128 x 160 in 2 splits, not 128 x 128 in 3
        (192, 4096, 1, (128, 128, 4, 2, 0)),  # below the range: the split-K rule
    ):
        cfg = gemm.default_config(
            m, n, 4096, num_sms=132, tuned=False, scale_itemsize=scale_itemsize
        )
        assert (cfg.tile_n, cfg.tile_m, cfg.stages, cfg.split_k, cfg.out_chunk) == tiling, (m, n)
        assert gemm.smem_bytes(cfg, cfg.tile_m, scale_itemsize=scale_itemsize) <= gemm._SMEM_BYTES
    k64 = gemm.default_config(1024, 4096, 4096, num_sms=132, tuned=False, k_group=64)
    assert (k64.tile_n, k64.tile_m, k64.tile_k) == (256, 128, 64)  # modelled at tile_k 128
    no_split = gemm.default_config(1024, 4096, 4096, num_sms=132, tuned=False, split_k=False)
    assert (no_split.tile_n, no_split.tile_m, no_split.out_chunk) == (256, 128, 0)
    with pytest.raises(ValueError, match="scale_itemsize must be 1 or 2"):
        gemm.default_config(1024, 4096, 4096, scale_itemsize=4)
    assert (small.out_chunk, long_k.out_chunk) == (0, 0)  # no stage to gain
    # Prefill beyond a wave outside prefill_tiling's range: the token tile with the least
    # waves * (tile_m + 64) where that is predicted at least 8% faster than 128
    for m, n, tile_m in (
        (1024, 14336, 152),  # 392 tiles, 3 waves (128 tokens: 448 tiles, 4 waves)
        (1536, 14336, 176),
        (384, 14336, 96),
        (768, 14336, 112),
        (640, 14336, 160),
        (768, 28672, 112),
        (1024, 28672, 128),  # 152 tokens: 6 waves instead of 7, predicted only 4% faster
        (512, 14336, 128),
        (4096, 4096, 128),
        (256, 14336, 128),  # one wave
        (100, 28672, 128),  # one token tile
    ):
        assert gemm.prefill_token_tile(m, n, 132) == tile_m, (m, n)
        if not 256 <= m < 2048:
            cfg = gemm.default_config(m, n, 4096, num_sms=132, tuned=False)
            assert (cfg.tile_n, cfg.tile_m) == (256, tile_m), (m, n)
            assert gemm.smem_bytes(cfg, tile_m) <= gemm._SMEM_BYTES
    assert [gemm.prefill_token_tile(1024, 14336, sms) for sms in (132, 114)] == [152, 128]
    for bad in ((-1, 256, 132, "m"), (8, 0, 132, "n"), (8, 256, 0, "num_sms"), (8.0, 256, 1, "m")):
        with pytest.raises(ValueError, match=f"{bad[3]} must be an int"):
            gemm.prefill_token_tile(*bad[:3])
    # split_k=False (the grouped kernel sizes its own split): the tiles without either rule
    for m, n, k, tile_n in ((256, 4096, 4096, 256), (1, 28672, 8192, 256), (1, 4096, 4096, 128)):
        cfg = gemm.default_config(m, n, k, num_sms=132, tuned=False, split_k=False)
        assert (cfg.tile_n, cfg.split_k, cfg.stream_k) == (tile_n, 1, 0)
    grouped = gemm.default_grouped_config(6144, 64, 2816, 2048, num_sms=132)
    assert (grouped.tile_n, grouped.tile_m, grouped.split_k) == (256, 128, 1)


def test_prefill_tiling():
    """prefill_tiling's candidates, cost model and choice (without a kernel)."""
    for m, n, k, itemsize in (
        (512, 4096, 4096, 1),
        (768, 14336, 4096, 2),
        (1000, 200, 1040, 1),
        (2047, 28672, 8192, 1),
    ):
        tilings = gemm.prefill_tilings(m, n, k, num_sms=132, scale_itemsize=itemsize)
        assert tilings and len({(c.tile_n, -(-m // c.tile_m)) for c in tilings}) == len(tilings)
        for cfg in tilings:
            assert cfg.tile_k == 128 and cfg.tile_n in (128, 256) and 64 <= cfg.tile_m <= 256
            assert gemm.smem_bytes(cfg, cfg.tile_m, scale_itemsize=itemsize) <= gemm._SMEM_BYTES
            assert (-(-k // 128)) % cfg.split_k == 0
            ctas = -(-n // cfg.tile_n) * -(-m // cfg.tile_m)
            assert cfg.split_k == 1 or ctas * cfg.split_k <= 132
            if cfg.tile_n == 128:
                assert cfg.stages >= 3 and cfg.out_chunk == 16
            else:
                assert cfg.tile_m <= 176
        cheapest = min(gemm.prefill_tiling_cost(c, m, n, k, 132) for c in tilings)
        pick = gemm.prefill_tiling(m, n, k, num_sms=132, scale_itemsize=itemsize)
        assert pick in tilings
        assert gemm.prefill_tiling_cost(pick, m, n, k, 132) <= 1.03 * cheapest
    # The model's pick replaces default_config's rule only where predicted 3% cheaper:
    # 14336x4096 at M = 1024, 448 tiles of 128 x 256 (4 waves) are predicted cheaper than
    # the rule's 392 of 256 x 152 (3 waves), by less than that
    tilings = gemm.prefill_tilings(1024, 14336, 4096, num_sms=132, scale_itemsize=1)
    pick = gemm.prefill_tiling(1024, 14336, 4096, num_sms=132, scale_itemsize=1)
    assert (pick.tile_n, pick.tile_m) == (128, 256)
    rule = next(c for c in tilings if (c.tile_n, c.tile_m) == (256, 152))
    cost = [gemm.prefill_tiling_cost(c, 1024, 14336, 4096, 132) for c in (pick, rule)]
    assert cost[0] < cost[1] < cost[0] / 0.97
    kept = gemm.prefill_tiling(
        1024, 14336, 4096, num_sms=132, scale_itemsize=1, incumbent=rule
    )
    assert kept == rule == gemm.default_config(1024, 14336, 4096, num_sms=132, tuned=False)
    worse = dataclasses.replace(rule, tile_m=64)  # 896 tiles, 7 waves
    assert gemm.prefill_tiling(1024, 14336, 4096, incumbent=worse, scale_itemsize=1) == pick
    for unmodelled in (
        dataclasses.replace(rule, tile_k=256),
        dataclasses.replace(rule, tile_n=128, stages=2),
        dataclasses.replace(rule, tile_n=64),
    ):
        with pytest.raises(ValueError, match="prefill_tiling_cost models 128-feature tiles"):
            gemm.prefill_tiling(1024, 14336, 4096, incumbent=unmodelled)
    narrow = gemm.default_config(512, 64, 4096, num_sms=132, tuned=False)  # no candidate
    assert (narrow.tile_n, narrow.tile_m) == (64, 128)
    # waves: 96 and 128 tiles of one shape cost one wave each; split-K adds its partial sums
    one = gemm.GemmConfig(tile_n=128, tile_m=192, tile_k=128, stages=3, out_chunk=16)
    assert gemm.prefill_tiling_cost(one, 768, 4096, 4096, 132) == pytest.approx(
        gemm.prefill_tiling_cost(one, 576, 4096, 4096, 132)
    )
    assert gemm.prefill_tiling_cost(one, 768, 4096, 4096, 64) == pytest.approx(
        2 * gemm.prefill_tiling_cost(one, 768, 4096, 4096, 132)
    )
    split = dataclasses.replace(one, split_k=2)
    halves = gemm.prefill_tiling_cost(split, 384, 4096, 4096, 132)
    assert halves > gemm.prefill_tiling_cost(one, 384, 4096, 4096, 132) / 2
    # no 128-feature warpgroup has output features at N <= 64
    assert gemm.prefill_tiling(1024, 64, 4096) is None
    for bad, name in (((0, 4096, 4096), "m"), ((512, 0, 4096), "n"), ((512, 64, 0.5), "k")):
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            gemm.prefill_tiling(*bad)
    with pytest.raises(ValueError, match="num_sms must be an int"):
        gemm.prefill_tilings(512, 4096, 4096, num_sms=True)
    with pytest.raises(ValueError, match="num_sms must be an int"):
        gemm.prefill_tiling_cost(one, 768, 4096, 4096, 0)
    with pytest.raises(ValueError, match="k must be an int"):
        gemm.prefill_tiling_cost(one, 768, 4096, -16, 132)
    with pytest.raises(ValueError, match="scale_itemsize must be 1 or 2"):
        gemm.prefill_tiling(512, 4096, 4096, scale_itemsize=4)


def test_token_tile_and_sm_count():
    cfg = G(tile_n=256, tile_m=128, tile_k=64)
    assert [gemm.token_tile(cfg, m) for m in (0, 1, 9, 128, 300)] == [8, 8, 16, 128, 128]
    assert gemm.sm_count(7) == 7 and gemm.sm_count() >= 1


def test_tuned_table_entries_are_valid():
    for device, entries in gemm_tuned.TUNED.items():
        for (bucket, n, k), e in entries.items():
            assert bucket in gemm_tuned.M_BUCKETS, (device, bucket)
            cfg = gemm.tuned_config(e)
            assert (-(-k // cfg.tile_k)) % cfg.split_k == 0, (device, bucket, n, k)
            assert gemm.smem_bytes(cfg, min(cfg.tile_m, bucket)) <= gemm._SMEM_BYTES
            assert e.us > 0 and e.date
            if "H100" in device:  # lowers for sm_90 at the bucket's largest M
                data = jnp.zeros((n, k // 2), jnp.uint8)
                prep = gemm.prepare_weight(
                    data, jnp.ones((n, k // 16), jnp.float8_e4m3fn), 1.0, k_group=e.k_group
                )
                x = jnp.zeros((bucket, k), jnp.bfloat16)
                text = cross_lower(
                    lambda x, p, n=n, k=k, cfg=cfg: gemm.nvfp4_matmul(x, p, n=n, k=k, config=cfg),
                    x,
                    prep,
                )
                assert "mosaic_gpu" in text


def test_single_kernel_config_reduces_split_k_in_clusters():
    xla = G(tile_n=256, tile_m=8, tile_k=64, split_k=8)
    one = gemm.single_kernel_config(xla, 1, 4096)
    assert (one.split_k, one.split_k_reduce, one.tile_n, one.tile_k) == (4, "cluster", 256, 64)
    # The largest divisor of the K steps (6 of 64) up to 4.
    assert (
        gemm.single_kernel_config(G(tile_n=256, tile_m=8, tile_k=64, split_k=6), 1, 384).split_k
        == 3
    )
    assert gemm.single_kernel_config(G(tile_n=256, tile_m=8, tile_k=64), 1, 384).split_k == 1
    tall = gemm.single_kernel_config(G(tile_n=128, tile_m=64, tile_k=128, split_k=8), 64, 4096)
    assert gemm.smem_bytes(tall, 64) <= gemm._SMEM_BYTES and tall.stages >= 2  # red buffer fits
    # Prefill tiles: no split whose partial sums fit SMEM next to the pipeline.
    wide = gemm.single_kernel_config(G(tile_n=256, tile_m=128, tile_k=64, split_k=8), 300, 1024)
    assert wide.split_k == 1 and gemm.smem_bytes(wide, 128) <= gemm._SMEM_BYTES
    # Decode, M <= 16: 2 or 4 splits of 128-feature tiles run inside the CTA (K-folded)
    narrow = G(tile_n=128, tile_m=8, tile_k=128, split_k=4)
    for m, tile_m in ((1, 8), (16, 64)):  # x rows: 4 per token
        folded = gemm.single_kernel_config(narrow, m, 4096, n=4096)
        assert (folded.tile_n, folded.k_fold, folded.split_k, folded.tile_m) == (32, 4, 1, tile_m)
    # other splits become 256-feature tiles with twice the splits (fewer, faster clusters),
    # where N has 256 features
    narrow8 = dataclasses.replace(narrow, split_k=8)
    wider = gemm.single_kernel_config(narrow8, 1, 4096, n=4096)
    assert (wider.tile_n, wider.split_k, wider.split_k_reduce) == (256, 4, "cluster")
    assert gemm.single_kernel_config(narrow8, 1, 4096, n=192).tile_n == 128
    assert (
        gemm.single_kernel_config(dataclasses.replace(narrow, tile_m=64), 64, 4096, n=4096).tile_n
        == 128
    )
    assert gemm.k_fold_config(narrow, 1, 4096 - 128) is None  # K parts of whole steps
    for cfg in (one, tall, wide, wider, folded):  # no XLA work after the kernel
        assert not gemm._stores_partials(cfg)


def test_default_config_consults_the_tuned_table():
    assert [gemm_tuned.m_bucket(m) for m in (1, 8, 9, 16, 17, 4096, 10**5)] == [
        8,
        8,
        16,
        16,
        32,
        4096,
        4096,
    ]
    (bucket, n, k), e = next(iter(gemm_tuned.TUNED["NVIDIA H100 80GB HBM3"].items()))
    other = 128 if e.k_group == 64 else 64
    with jax.sharding.use_abstract_mesh(h100_mesh()):  # an H100 as seen from this CPU
        cfg = gemm.default_config(bucket, n, k, k_group=e.k_group)
        heuristic = gemm.default_config(bucket, n, k, tuned=False, k_group=e.k_group)
        # an entry measured on another prepared layout is not used
        assert gemm.default_config(bucket, n, k, k_group=other) == gemm.default_config(
            bucket, n, k, tuned=False, k_group=other
        )
    assert (cfg.tile_n, cfg.tile_m, cfg.tile_k, cfg.stages, cfg.split_k) == e[:5]
    assert cfg.split_k_reduce == e.split_k_reduce
    # CPU: no table entry
    assert heuristic == gemm.default_config(bucket, n, k, num_sms=132, k_group=e.k_group)
    assert gemm_tuned.lookup("some other GPU", bucket, n, k, e.k_group) is None


def test_sass_mix_finds_the_wgmma_loop():
    """benchmarks/sass_mix.py counts the innermost backward-branch loop holding an HGMMA."""
    from benchmarks import sass_mix

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDS.U16 R2, [R3] ;
.L_x_2:
        /*0020*/                   LOP3.LUT R4, R2, 0x1, RZ, 0xc0, !PT ;
        /*0030*/                   HGMMA.64x8x16.F32.BF16 R8, R4, gdesc[UR4], R8 ;
        /*0040*/              @P0 BRA `(.L_x_2) ;
        /*0050*/                   HMUL2.BF16_V2 R5, R2.H0_H0, R4 ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
    """
    loop = sass_mix.main_loop(sass)
    assert [op for _, op, _ in loop] == ["LOP3", "HGMMA", "BRA"]


def test_ab_configs_parses_variants():
    """benchmarks/ab_configs.py turns ``field=value,...`` into GemmConfig replacements and
    rejects names that are not GemmConfig fields."""
    from benchmarks import ab_configs

    fields = ab_configs.parse_variant("tile_n=192,compute_wgs=3,overlap_decode=False")
    assert fields == {"tile_n": 192, "compute_wgs": 3, "overlap_decode": False}
    assert ab_configs.parse_variant("split_k_reduce=cluster,fast_decode=None") == {
        "split_k_reduce": "cluster",
        "fast_decode": None,
    }
    assert dataclasses.replace(G(), **fields).num_compute_wgs == 3
    for bad in ("tile_x=3", "stages"):
        with pytest.raises(SystemExit, match="not a GemmConfig field=value"):
            ab_configs.parse_variant(bad)
    assert ab_configs.base_config(4096, 4096, 4096) == gemm.default_config(4096, 4096, 4096)
    assert ab_configs.speedup(11.2, 7.0, 2) == "1.60x"
    assert ab_configs.speedup(11.2, float("nan"), 3) == "-"


def test_trace_phases_from_a_trace_file(tmp_path):
    """benchmarks/trace_matmul.py recovers phase times from a Mosaic GPU trace file, whose
    timestamps are a warpgroup's global-timer start (ns) plus SM cycles since its first
    event, both over 1000."""
    import json

    from benchmarks import trace_matmul

    def ev(name, ph, ts, tid):
        return {"name": name, "ph": ph, "ts": ts, "pid": 1, "tid": tid}

    events = [ev("setup", "B", 100.0, 1), ev("setup", "E", 100.02, 1)]  # the TMA warpgroup
    events += [ev("setup", "B", 100.5, 2), ev("setup", "E", 100.52, 2)]
    events += [ev("step", ph, t, 2) for ph, t in zip("BEBE", (102.5, 103.5, 104.5, 105.5))]
    events += [ev("epilogue", "B", 106.5, 2), ev("epilogue", "E", 108.5, 2)]
    path = tmp_path / "1-trace.json"
    path.write_text(json.dumps({"displayTimeUnit": "ns", "traceEvents": events}))
    got = trace_matmul.phases(str(path), clock_ghz=2.0)  # 1000 cycles: 0.5 us
    want = {
        "CTA start": [0.0, 0.5],
        "first step begins": [1.5],
        "step": [0.5, 0.5],
        "wait between steps": [0.5],
        "last step end to epilogue": [0.5],
        "epilogue": [1.0],
        "compute warpgroup ends": [4.5],
    }
    assert {k: pytest.approx(v) for k, v in want.items()} == dict(got)
    assert trace_matmul.parse_overrides("tile_n=128,split_k_reduce=cluster") == {
        "tile_n": 128,
        "split_k_reduce": "cluster",
    }
    with pytest.raises(ValueError, match="unknown GemmConfig field 'tile_x'"):
        trace_matmul.parse_overrides("tile_x=1")


def test_tune_script_rewrites_only_the_table(tmp_path):
    from benchmarks import tune_matmul

    path = tmp_path / "gemm_tuned.py"
    with open(tune_matmul.TABLE_PATH) as f:
        source = f.read()
    path.write_text(source)
    tune_matmul.write_table(gemm_tuned.TUNED, str(path))
    assert path.read_text() == source  # the checked-in table is in the script's format
    table = {d: dict(e) for d, e in gemm_tuned.TUNED.items()}
    table.setdefault("NVIDIA H200", {})[(64, 512, 1024)] = gemm_tuned.Tuned(
        128, 64, 128, 4, 2, 3.5, "2026-11-24", "cluster"
    )
    table["NVIDIA H200"][(8, 512, 1024)] = gemm_tuned.Tuned(128, 8, 64, 4, 4, 2.5, "2026-11-24")
    tune_matmul.write_table(table, str(path))
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102 (our own table)
    assert namespace["TUNED"] == table
    assert path.read_text().split("# BEGIN TUNED")[0] == source.split("# BEGIN TUNED")[0]


# -----------------------------------------------------------------------------
# Cross-lowering for sm_90 (CPU): the GPU variants must lower
# -----------------------------------------------------------------------------

_LOWER_CASES = {
    "decode_registers": (16, 4096, 4096, None, False),
    # K not a multiple of 64: the x tile keeps a quarter's swizzle width (TMA of a tiled view)
    "odd_k_group_wgmma": (3, 4104, 4112, G(tile_n=128, tile_m=8, tile_k=128, stages=4), False),
    "odd_k_prefill": (130, 1000, 1040, G(tile_n=256, tile_m=128, tile_k=128, stages=3), True),
    "decode_k_fold4_bias": (16, 4096, 4096, G(tile_n=32, tile_m=64, tile_k=128, k_fold=4), True),
    "decode_k_fold4_m1": (1, 4096, 4096, G(tile_n=32, tile_m=256, tile_k=256, k_fold=4), False),
    "decode_k_fold2_1wg": (3, 200, 1024, G(tile_n=32, tile_m=8, tile_k=128, k_fold=2), True),
    "decode_registers_m1_bias": (1, 4096, 4096, None, True),
    "decode_splitk_registers": (
        8,
        4096,
        4096,
        G(tile_n=192, compute_wgs=3, tile_m=8, tile_k=128, split_k=4),
        True,
    ),
    "decode_registers_portable_decode": (16, 4096, 4096, G(tile_m=16, fast_decode=False), False),
    "decode_smem": (16, 4096, 4096, G(tile_n=128, tile_m=16, stages=2, a_operand="smem"), True),
    "prefill_registers_default": (4096, 4096, 4096, None, True),
    "prefill_registers_128x256": (
        1024,
        4096,
        4096,
        G(tile_n=128, tile_m=256, tile_k=64, stages=4),
        False,
    ),
    "prefill_registers_256x128": (
        1024,
        4096,
        4096,
        G(tile_n=256, tile_m=128, tile_k=64, stages=4),
        True,
    ),
    "prefill_smem_128x256": (
        1024,
        4096,
        4096,
        G(tile_n=128, tile_m=256, tile_k=64, stages=3, a_operand="smem"),
        False,
    ),
    "odd_shapes": (70, 200, 48, G(tile_m=72, tile_k=64), True),
    "prefill_token_tile_112": (
        768,
        14336,
        4096,
        G(tile_n=256, tile_m=112, tile_k=128, stages=3),
        True,
    ),
    "prefill_token_tile_176": (
        1000,
        4096,
        4096,
        G(tile_n=256, tile_m=176, tile_k=128, stages=2),
        True,
    ),
    "decode_overlap": (16, 4096, 4096, G(tile_n=256, tile_m=16, overlap_decode=True), False),
    "decode_per_quarter_wgmmas": (16, 4096, 4096, G(tile_m=16, group_wgmma=False), True),
    "prefill_grouped_wgmma_2_stages": (
        1000,
        4096,
        4096,
        G(tile_n=256, tile_m=176, tile_k=128, stages=2, group_wgmma=True),
        False,
    ),
    "splitk_m1_bias": (1, 4096, 4096, G(tile_m=8, tile_k=128, split_k=4), True),
    "splitk_odd": (3, 200, 1024, G(tile_n=256, tile_m=8, tile_k=128, split_k=8), True),
    "cluster_m1_bias": (
        1,
        4096,
        4096,
        G(tile_n=256, tile_m=8, tile_k=64, split_k=8, split_k_reduce="cluster"),
        True,
    ),
    "stream_k_m1": (1, 28672, 8192, G(tile_n=256, tile_m=8, tile_k=256, stream_k=132), False),
    "stream_k_m64_bias": (
        64,
        4096,
        14336,
        G(tile_n=256, tile_m=64, tile_k=64, stream_k=132, stages=4),
        True,
    ),
    "cluster_m16": (
        16,
        4096,
        4096,
        G(tile_n=128, tile_m=16, tile_k=128, split_k=4, split_k_reduce="cluster"),
        False,
    ),
    # the prefill default: 4 stages next to an output stored 32 tokens at a time
    "prefill_out_chunk_4_stages": (
        1000,
        4096,
        4096,
        G(tile_n=256, tile_m=128, tile_k=128, stages=4, out_chunk=32),
        True,
    ),
    # prefill_tiling's 128-feature tiles: 3 stages of 256 tokens next to 16-token output
    # chunks (compact scales), 200 tokens (m64n200 wgmmas), and split-K at N = 200
    "prefill_narrow_200": (
        1000,
        4096,
        4096,
        G(tile_n=128, tile_m=200, tile_k=128, stages=3, out_chunk=16),
        True,
    ),
    "prefill_narrow_split_k": (
        512,
        200,
        4096,
        G(tile_n=128, tile_m=64, tile_k=128, stages=4, split_k=8, out_chunk=16),
        True,
    ),
    "prefill_wide_tokens": (
        1000,
        4096,
        4096,
        G(tile_n=128, tile_m=256, tile_k=128, stages=3, out_chunk=16),
        True,
    ),
    # f32 partial sums of 128-token tiles, staged through SMEM 64 tokens at a time
    "prefill_split_k_chunked_store": (
        200,
        4096,
        14336,
        G(tile_n=256, tile_m=128, tile_k=128, stages=3, split_k=4),
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(_LOWER_CASES))
def test_cross_lowers_for_sm90(case):
    m, n, k, cfg, with_bias = _LOWER_CASES[case]
    data, scales, ts = _random_weight(n, k, seed=1)
    prep = gemm.prepare_weight(
        jnp.asarray(data), jnp.asarray(scales), ts, k_group=_k_group_for(cfg, k)
    )
    x = jnp.zeros((m, k), jnp.bfloat16)
    bias = jnp.zeros((n,), jnp.float32) if with_bias else None
    text = cross_lower(
        lambda x, p: gemm.nvfp4_matmul(x, p, n=n, k=k, bias=bias, config=cfg), x, prep
    )
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("case", ["odd_k_group_wgmma", "odd_k_prefill", "decode_registers"])
def test_wide_x_rows_cross_lower(case, monkeypatch):
    """The 128-byte x rows (``gemm._WIDE_X_ROWS``) lower for sm_90 also where K is not a
    multiple of 64 (the quarter width is kept there), and are used where it is."""
    monkeypatch.setattr(gemm, "_WIDE_X_ROWS", True)
    m, n, k, cfg, with_bias = _LOWER_CASES[case]
    cfg = cfg or gemm.default_config(m, n, k, num_sms=132)
    width = gemm._x_transforms(cfg, 128, k, jnp.bfloat16)[0].tiling[-1]
    assert width == (64 if k % 64 == 0 else 32)
    data, scales, ts = _random_weight(n, k, seed=1)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts)
    bias = jnp.zeros((n,), jnp.float32) if with_bias else None
    text = cross_lower(
        lambda x, p: gemm.nvfp4_matmul(x, p, n=n, k=k, bias=bias, config=cfg),
        jnp.zeros((m, k), jnp.bfloat16),
        prep,
    )
    assert "mosaic_gpu" in text


def test_ablate_decode_stand_in_cross_lowers():
    """benchmarks/ablate_decode.py's decode stand-in (code lanes bitcast to bf16) fits the
    kernel in place of the fast decode: the patched prefill kernel lowers for sm_90."""
    from unittest import mock

    from benchmarks import ablate_decode

    m, n, k = 256, 512, 512
    data, scales, ts = _random_weight(n, k, seed=1)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts)
    cfg = G(tile_n=256, tile_m=128, tile_k=128, stages=3)
    lower = lambda: cross_lower(
        lambda x, p: gemm.nvfp4_matmul(x, p, n=n, k=k, config=cfg),
        jnp.zeros((m, k), jnp.bfloat16),
        prep,
    )
    full = lower()
    jax.clear_caches()  # trace the kernel anew, with the stand-in
    with mock.patch.object(gemm, "_decode_scaled_fast", ablate_decode.bitcast_quarters):
        ablated = lower()
    jax.clear_caches()
    assert "mosaic_gpu" in ablated
    assert len(ablated) < len(full)  # the stand-in replaced the decode's instructions


@pytest.mark.parametrize(
    "dtype,scale_dtype", [(jnp.float16, jnp.float16), (jnp.bfloat16, None), (jnp.float16, None)]
)
def test_cross_lowers_scale_formats(dtype, scale_dtype):
    m, n, k = 16, 1024, 1024
    data, scales, ts = _random_weight(n, k, seed=2)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts, dtype=scale_dtype)
    x = jnp.zeros((m, k), dtype)
    text = cross_lower(lambda x, p: gemm.nvfp4_matmul(x, p, n=n, k=k), x, prep)
    assert "mosaic_gpu" in text


def test_oversized_config_is_rejected_at_lowering():
    m, n, k = 1024, 4096, 4096
    data, scales, ts = _random_weight(n, k, seed=1)
    prep = gemm.prepare_weight(jnp.asarray(data), jnp.asarray(scales), ts)
    x = jnp.zeros((m, k), jnp.bfloat16)
    cfg = G(tile_n=256, tile_m=256, tile_k=256, stages=4)
    with pytest.raises(Exception, match="shared memory"):
        cross_lower(lambda x, p: gemm.nvfp4_matmul(x, p, n=n, k=k, config=cfg), x, prep)


# -----------------------------------------------------------------------------
# GPU (H100): compile and run the register variant
# -----------------------------------------------------------------------------


def _k_group_for(cfg, k):
    """The default k-group for ``k``, or 64 for a config whose tile_k is 64 (kept in the
    tests so that the k-group 64 layout stays covered)."""
    return 64 if cfg is not None and cfg.tile_k % 128 else gemm.default_k_group(k)


def _gpu_check(
    m, n, k, cfg=None, bias=False, dtype=jnp.bfloat16, scale_dtype=jnp.bfloat16, k_group=None
):
    data, scales, ts = _random_weight(n, k, seed=m + n + k)
    x = _random_x(m, k, dtype, seed=m * 3 + k)
    b = (
        jnp.asarray(np.random.default_rng((_SALT, 5)).standard_normal(n).astype(np.float32))
        if bias
        else None
    )
    prep = gemm.prepare_weight(
        jnp.asarray(data),
        jnp.asarray(scales),
        ts,
        dtype=scale_dtype,
        k_group=k_group or _k_group_for(cfg, k),
    )
    y = gemm.nvfp4_matmul(x, prep, n=n, k=k, bias=b, config=cfg)
    assert y.shape == (m, n) and y.dtype == dtype
    err = _rel_err(y, _reference64(x, data, scales, ts, b))
    assert err <= _tolerance(dtype), err


@gpu
@pytest.mark.parametrize(
    "m,n,tile_m,stages", [(1000, 520, 256, 3), (990, 520, 200, 3), (700, 4104, 152, 4)]
)
def test_gpu_prefill_narrow_tiles(m, n, tile_m, stages):
    """128-feature prefill tiles (two 64-row warpgroups, 16-token output chunks) with the
    compact block scales they are planned for: the last token tile and feature tile ragged."""
    cfg = G(tile_n=128, tile_m=tile_m, tile_k=128, stages=stages, out_chunk=16)
    _gpu_check(m, n, 4096, cfg, bias=True, scale_dtype=None)


@gpu
@pytest.mark.parametrize(
    "m,n,k,tiling",
    [
        (768, 4096, 4096, (128, 192, 1)),
        (1024, 4096, 4096, (128, 256, 1)),
        (1100, 3072, 4096, (128, 224, 1)),
        (512, 200, 4096, (128, 64, 8)),
        (320, 4096, 4096, (128, 160, 2)),
        (768, 14336, 4096, (256, 112, 1)),
    ],
)
def test_gpu_prefill_tiling_plans(m, n, k, tiling):
    """``prefill_tiling``'s plans (compact scales, the default layout) in fp16, bias on odd
    sizes: 128 x 192, 128 x 256, 128 x 224 tiles, 128-feature split-K at N = 200 and of
    160-token tiles, and a 256 x 112 tiling."""
    plan = gemm.default_config(m, n, k, num_sms=132, tuned=False, scale_itemsize=1)
    assert (plan.tile_n, plan.tile_m, plan.split_k) == tiling
    _gpu_check(m, n, k, None, bias=n % 7 == 0, scale_dtype=None, dtype=jnp.float16)


@gpu
@pytest.mark.parametrize("m", [1, 16, 64, 256, 1024])
def test_gpu_registers_4096(m):
    _gpu_check(m, 4096, 4096, bias=(m % 2 == 0))


@gpu
def test_gpu_tuned_entries_of_this_device():
    """Every tuned tiling of the GPU at hand, at its bucket's largest M (and 3 rows fewer)."""
    entries = gemm_tuned.TUNED.get(jax.devices()[0].device_kind, {})
    if not entries:
        pytest.skip(f"no tuned entries for {jax.devices()[0].device_kind}")
    for (bucket, n, k), entry in entries.items():
        for m in (bucket, bucket - 3):
            cfg = gemm.tuned_config(entry)
            _gpu_check(m, n, k, cfg, bias=m % 2 == 1, k_group=entry.k_group)


@gpu
@pytest.mark.parametrize(
    "m,n,k", [(3, 4104, 4112), (70, 200, 48), (130, 1000, 1040), (17, 14336, 4096)]
)
def test_gpu_registers_odd_shapes(m, n, k):
    _gpu_check(m, n, k, bias=True)


@gpu
def test_gpu_trace_matmul(tmp_path):
    """A profiled launch writes a trace with every warpgroup's setup and every compute
    warpgroup's steps and epilogue, in order."""
    import nvfp4_jax as nv
    from benchmarks import trace_matmul

    m, n, k = 3, 512, 1024
    w = nv.prepare(nv.quantize(jax.random.normal(jax.random.key(_SALT % 2**31), (k, n)), axis=0))
    x = _random_x(m, k, jnp.bfloat16, seed=7)
    cfg = G(tile_n=128, tile_m=8, tile_k=128, split_k=2)
    path = trace_matmul.traced_call(x, w, cfg, str(tmp_path), events=64)
    got = trace_matmul.phases(path, clock_ghz=1.98)
    ctas, steps = (n // 128) * 2, k // 128 // 2
    assert len(got["CTA start"]) == 3 * ctas  # two compute warpgroups and the TMA one
    assert len(got["step"]) == 2 * ctas * steps and len(got["epilogue"]) == 2 * ctas
    assert min(got["step"]) > 0 and min(got["wait between steps"]) >= 0
    assert max(got["CTA start"]) < min(got["first step begins"])
    assert max(got["first step begins"]) < max(got["compute warpgroup ends"])


@gpu
@pytest.mark.parametrize("n", [64, 320])
def test_gpu_warpgroup_past_the_last_feature(n):
    """The last tile's second warpgroup holds no output feature (fused epilogue)."""
    _gpu_check(4, n, 48, G(tile_n=128, tile_m=8, tile_k=64), bias=True)
    _gpu_check(1, n, 48, bias=False)  # default config


@gpu
@pytest.mark.parametrize(
    "cfg",
    [
        G(tile_n=128, tile_m=16, tile_k=256, split_k=4),
        G(tile_n=192, compute_wgs=3, tile_m=16, tile_k=128, split_k=4),
        G(tile_n=256, tile_m=128, tile_k=64, stages=4),
        G(tile_n=128, tile_m=256, tile_k=64, stages=4),
        G(tile_n=128, tile_m=16, fast_decode=False),
        G(tile_n=256, tile_m=16, tile_k=256, overlap_decode=True),
        G(tile_n=256, tile_m=128, tile_k=128, stages=3, overlap_decode=True),
        G(tile_n=128, tile_m=16, stages=2, a_operand="smem"),
        G(tile_n=256, tile_m=152, tile_k=128, stages=2),  # 4 token tiles, the last 56 rows
        G(tile_n=256, tile_m=176, tile_k=128, stages=2),
        G(tile_n=256, tile_m=96, tile_k=128, stages=4),  # 6 token tiles, the last 32 rows
        G(tile_n=256, tile_m=112, tile_k=128, stages=3),
        G(tile_n=128, tile_m=16, tile_k=256, group_wgmma=False),
        G(tile_n=256, tile_m=152, tile_k=128, stages=2, group_wgmma=True),
        G(tile_n=256, tile_m=128, tile_k=128, stages=4, out_chunk=32),  # the prefill default
        G(tile_n=256, tile_m=152, tile_k=128, stages=3, out_chunk=48),  # chunks 48, 48, 48, 8
    ],
    ids=str,
)
def test_gpu_configs(cfg):
    m = 16 if cfg.tile_m <= 16 else 512
    _gpu_check(m, 2048, 4096, cfg, bias=True)


@gpu
@pytest.mark.parametrize(
    "m,n,k,cfg",
    [
        (1, 4096, 4096, G(tile_n=128, tile_m=8, tile_k=128, split_k=4)),
        (3, 200, 1040, G(tile_n=128, tile_m=8, tile_k=64, split_k=17)),  # 17 splits of 1 step
        (17, 1000, 2048, G(tile_n=256, tile_m=24, tile_k=128, split_k=4, stages=2)),
        (64, 4096, 4096, G(tile_n=192, compute_wgs=3, tile_m=64, tile_k=128, split_k=2, stages=3)),
        (130, 320, 4096, G(tile_n=128, tile_m=64, tile_k=128, split_k=4, stages=3)),  # 3 m-tiles
        (1, 4096, 4096, G(tile_n=256, tile_m=8, tile_k=64, split_k=8, split_k_reduce="cluster")),
        (3, 200, 1024, G(tile_n=128, tile_m=8, tile_k=64, split_k=8, split_k_reduce="cluster")),
        (16, 14336, 4096, G(tile_n=256, tile_m=16, tile_k=64, split_k=2, split_k_reduce="cluster")),
        (
            17,
            1000,
            2048,
            G(tile_n=256, tile_m=24, tile_k=128, split_k=4, stages=2, split_k_reduce="cluster"),
        ),
        (
            130,
            320,
            4096,
            G(tile_n=128, tile_m=64, tile_k=128, split_k=4, stages=2, split_k_reduce="cluster"),
        ),
        (1, 28672, 8192, G(tile_n=256, tile_m=8, tile_k=256, stream_k=132)),
        (16, 14336, 4096, G(tile_n=256, tile_m=16, tile_k=64, stream_k=132)),
        (3, 200, 1040, G(tile_n=128, tile_m=8, tile_k=64, stream_k=7)),  # 2 tiles x 17 steps
        (17, 1000, 2048, G(tile_n=256, tile_m=24, tile_k=128, stages=2, stream_k=13)),
        (130, 320, 4096, G(tile_n=128, tile_m=64, tile_k=128, stages=3, stream_k=5)),  # 3 m-tiles
        (64, 4096, 14336, G(tile_n=256, tile_m=64, tile_k=64, stream_k=132)),
        (1, 57344, 8192, G(tile_n=256, tile_m=8, tile_k=64, stream_k=132)),  # 3 tiles a run
        (3, 1000, 1040, G(tile_n=128, tile_m=8, tile_k=64, stream_k=3)),  # up to 4 tiles a run
        # f32 partials of 128-token tiles stored in 64-token chunks (the last one 40 tokens)
        (232, 4096, 14336, G(tile_n=256, tile_m=128, tile_k=128, stages=3, split_k=4)),
        # ... and in 32-token chunks
        (232, 4096, 4096, G(tile_n=256, tile_m=128, tile_k=128, stages=3, split_k=2, out_chunk=32)),
    ],
    ids=lambda v: (
        str(v)
        if not isinstance(v, G)
        else f"n{v.tile_n}m{v.tile_m}k{v.tile_k}sk{v.split_k}"
        + ("c" if v.cluster_reduce else "")
        + (f"st{v.stream_k}" if v.stream_k else "")
    ),
)
def test_gpu_split_k(m, n, k, cfg):
    _gpu_check(m, n, k, cfg, bias=True)
    _gpu_check(m, n, k, cfg, bias=False, dtype=jnp.float16, scale_dtype=jnp.float16)


@gpu
@pytest.mark.parametrize(
    "m,n,k,cfg",
    [
        (1, 4096, 4096, G(tile_n=32, tile_m=256, tile_k=128, k_fold=4)),
        (16, 4096, 4096, G(tile_n=32, tile_m=256, tile_k=128, k_fold=4)),
        (3, 4096, 14336, G(tile_n=32, tile_m=256, tile_k=256, k_fold=4, stages=6)),
        (13, 200, 1024, G(tile_n=32, tile_m=8, tile_k=128, k_fold=2)),  # 4 token tiles
        (40, 1000, 2048, G(tile_n=64, tile_m=64, tile_k=128, k_fold=2, stages=3)),
        (5, 48, 512, G(tile_n=16, tile_m=256, tile_k=128, k_fold=4)),  # one warpgroup
        (32, 4096, 4096, G(tile_n=32, tile_m=256, tile_k=128, k_fold=4, stages=2)),
    ],
    ids=lambda v: str(v) if not isinstance(v, G) else f"n{v.tile_n}k{v.tile_k}f{v.k_fold}",
)
def test_gpu_k_fold(m, n, k, cfg):
    _gpu_check(m, n, k, cfg, bias=True)
    _gpu_check(m, n, k, cfg, bias=False, dtype=jnp.float16, scale_dtype=None)


@gpu
def test_gpu_k_fold_matches_split_k():
    """The folded product equals the unfolded one up to the order of its fp32 sums."""
    m, n, k = 16, 4096, 4096
    _, _, _, x, prep = _random_problem(m, n, k, seed=35)
    fold = G(tile_n=32, tile_m=64, tile_k=128, k_fold=4)
    y_fold = gemm.nvfp4_matmul(x, prep, n=n, k=k, config=fold).astype(jnp.float32)
    y_split = gemm.nvfp4_matmul(x, prep, n=n, k=k, config=G(tile_m=16, tile_k=128, split_k=4))
    y_split = np.asarray(y_split.astype(jnp.float32), np.float64)
    assert np.linalg.norm(np.asarray(y_fold, np.float64) - y_split) <= 4e-3 * np.linalg.norm(y_split)


@gpu
@pytest.mark.parametrize("split_k_reduce", ["xla", "cluster", "stream"])
def test_gpu_split_k_is_deterministic(split_k_reduce):
    """Repeated split-K (and stream-K) calls, also back to back in one program, agree
    bitwise."""
    m, n, k = 16, 2048, 4096
    data, scales, ts, x, prep = _random_problem(m, n, k, seed=11)
    if split_k_reduce == "stream":
        cfg = G(tile_n=128, tile_m=16, tile_k=128, stream_k=132)
    else:
        cfg = G(tile_n=128, tile_m=16, tile_k=128, split_k=8, split_k_reduce=split_k_reduce)
    f = jax.jit(lambda x, p: [gemm.nvfp4_matmul(x, p, n=n, k=k, config=cfg) for _ in range(3)])
    outs = [np.asarray(y) for y in f(x, prep)] + [np.asarray(y) for y in f(x, prep)]
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])
    err = _rel_err(jnp.asarray(outs[0]), _reference64(x, data, scales, ts, None))
    assert err <= _tolerance(jnp.bfloat16), err


@gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fast_decode", [True, False])
def test_gpu_compact_scales_signs_zeros_and_nans(dtype, fast_decode):
    _check_compact_specials(dtype, G(tile_n=64, tile_m=8, tile_k=128, fast_decode=fast_decode))


@gpu
@pytest.mark.parametrize(
    "dtype,scale_dtype",
    [
        (jnp.float16, jnp.float16),
        (jnp.bfloat16, None),
        (jnp.float16, None),
        (jnp.float16, jnp.bfloat16),
    ],
)
def test_gpu_dtypes(dtype, scale_dtype):
    _gpu_check(16, 1024, 2048, bias=True, dtype=dtype, scale_dtype=scale_dtype)


@gpu
def test_gpu_fast_decode_matches_portable_bitwise():
    """Both decodes feed the MMA exact products (up to a power of two)."""
    m, n, k = 64, 1024, 2048
    _, _, _, x, prep = _random_problem(m, n, k, seed=9)
    fast = gemm.nvfp4_matmul(x, prep, n=n, k=k, config=G(tile_m=64, fast_decode=True))
    portable = gemm.nvfp4_matmul(x, prep, n=n, k=k, config=G(tile_m=64, fast_decode=False))
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(portable))
    serial = gemm.nvfp4_matmul(x, prep, n=n, k=k, config=G(tile_m=64, overlap_decode=False))
    np.testing.assert_array_equal(np.asarray(serial), np.asarray(portable))


@gpu
def test_gpu_subnormal_code_and_scale():
    """Code 1 (0.5, a subnormal in the fast placement) with the smallest scale."""
    n, k = 256, 1024
    data = jnp.full((n, k // 2), 0x11, jnp.uint8)
    scales = jnp.full((n, k // 16), 2.0**-9, jnp.float8_e4m3fn)
    prep = gemm.prepare_weight(data, scales, 1.0)
    y = gemm.nvfp4_matmul(jnp.ones((8, k), jnp.bfloat16), prep, n=n, k=k)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), 0.5 * 2.0**-9 * k)
