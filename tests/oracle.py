"""An independent NVFP4 implementation in numpy + ml_dtypes, used only as a test oracle.

It follows the recipe of vLLM's ``ref_nvfp4_quant`` (float32, same op order) but rounds with
ml_dtypes' own float8_e4m3fn / float4_e2m1fn casts rather than our code's threshold chain.
"""

import ml_dtypes
import numpy as np

F32 = np.float32
E4M3 = ml_dtypes.float8_e4m3fn
E2M1 = ml_dtypes.float4_e2m1fn
E2M1_TABLE = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)


def e2m1_codes(v):
    """float32 -> E2M1 codes via ml_dtypes (RNE, saturating); NaN -> 0."""
    v = np.asarray(v, F32)
    codes = v.astype(E2M1).view(np.uint8) & 0xF
    return np.where(np.isnan(v), 0, codes).astype(np.uint8)


def decode_codes(codes):
    codes = np.asarray(codes, np.uint8)
    mag = E2M1_TABLE[codes & 7]
    return np.where(codes & 8, -mag, mag)


def pack(codes):
    codes = np.asarray(codes, np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed):
    packed = np.asarray(packed, np.uint8)
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.uint8)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    return out


def default_global_scale(x):
    mag = np.abs(np.asarray(x, F32))
    mag = mag[np.isfinite(mag)]
    amax = F32(mag.max()) if mag.size else F32(0)
    if amax == 0:
        return F32(1), F32(1)
    gs = F32(2688) / amax
    return gs, F32(1) / gs


def quantize(x, gs):
    """x [..., K] (last axis blocked), gs float32 scalar or per-leading-batch array.

    Returns (codes uint8 [..., K], scales uint8 bytes [..., K/16])."""
    x = np.asarray(x, F32)
    *lead, k = x.shape
    b = x.reshape(*lead, k // 16, 16)
    gs = np.asarray(gs, F32)
    gs = gs.reshape(gs.shape + (1,) * (b.ndim - 1 - gs.ndim))
    with np.errstate(all="ignore"):
        amax = np.max(np.abs(b), axis=-1).astype(F32)
        sf = (gs * (amax * F32(1.0 / 6.0))).astype(F32)
        s = np.minimum(sf, F32(448)).astype(E4M3)
        s = np.where(np.isfinite(amax), s, np.array(np.nan, F32).astype(E4M3))
        s32 = s.astype(F32)
        denom = (s32 * (F32(1) / gs)).astype(F32)
        inv = np.where(denom == 0, F32(0), F32(1) / np.where(denom == 0, F32(1), denom)).astype(F32)
        v = np.clip(b * inv[..., None], F32(-6), F32(6)).astype(F32)
    codes = e2m1_codes(v).reshape(*lead, k)
    return codes, s.view(np.uint8)


def dequantize(codes, scale_bytes, ts, dtype):
    s = np.asarray(scale_bytes, np.uint8).view(E4M3).astype(F32)
    ts = np.asarray(ts, F32)
    ts = ts.reshape(ts.shape + (1,) * (s.ndim - ts.ndim))
    vals = decode_codes(codes).astype(F32)
    *lead, k = vals.shape
    out = vals.reshape(*lead, k // 16, 16) * (s * ts).astype(F32)[..., None]
    return out.reshape(*lead, k).astype(dtype)


def quant_dequant(x, gs, ts):
    """dequantize(quantize(x)) in x's dtype (our fake-quant contract)."""
    codes, s = quantize(x, gs)
    return dequantize(codes, s, ts, np.asarray(x).dtype)


def swizzle(scales):
    s = np.asarray(scales)
    x = s if s.ndim == 3 else s[None]
    b, m, c = x.shape
    mp, cp = -(-m // 128) * 128, -(-c // 4) * 4
    out = np.zeros((b, mp * cp), s.dtype)
    for bi in range(b):
        for r in range(m):
            for col in range(c):
                off = (
                    ((r >> 7) * (cp // 4) + (col >> 2)) * 512
                    + (r & 31) * 16
                    + ((r >> 5) & 3) * 4
                    + (col & 3)
                )
                out[bi, off] = x[bi, r, col]
    return out.reshape(s.shape[:-2] + (mp, cp))
