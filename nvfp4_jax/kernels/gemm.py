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
a *k-group* is the ``k_group`` (128 by default; 64 or 256) consecutive k whose
codes are interleaved into uint16 lanes by :func:`prepare_weight`; a *quarter* is
the ``k_group / 4``-column slice of a k-group that one nibble position of the lanes
covers; a *tile* is the kernel's unit of work (``tile_n x tile_m`` outputs,
``tile_k`` per step).

Kernel structure (``plgpu.kernel``, grid ``(n_tiles, m_tiles, split_k)``):
one memory warpgroup streams packed codes, block scales and x tiles through a
``stages``-deep TMA pipeline (``plgpu.emit_pipeline_warp_specialized``); each
of 1-3 compute warpgroups owns 64 or 128 output features, decodes a k-group's
four quarters (codes -> bf16/f16 bit patterns with integer ops, times the
per-16 scales, widened from compact bytes with a shift and an add; the fast decode
loads each row's scales of a k-group with one vector load),
issues four ``[rows, k_group/4] x [k_group/4, tile_m]`` wgmmas against column slices of
``x_smem.T`` (or, ``group_wgmma``, one ``[rows, k_group]`` wgmma of the four quarters side
by side) and waits for them before decoding the next k-group, or (``overlap_decode``, the
default with register operands) decodes k-group g + 1 while the wgmmas of k-group g run and
waits once per step.
The fp32 epilogue applies tensor scale and bias and stores the transposed
tile through SMEM with TMA; with ``split_k > 1`` it stores fp32 partial sums
(staged 64 tokens at a time, which keeps 128-token tiles within SMEM) that a small XLA
fusion reduces, or adds them within a cluster (below).

Two switches: ``a_operand`` ("registers": register-A wgmma, GPU only;
"smem": the decoded tile goes through swizzled SMEM, which the Mosaic GPU CPU
interpreter can run) and ``fast_decode`` (32-bit register bit tricks via
``inline_mgpu``, GPU only; or the portable select-based jnp decode, exact
everywhere). Both decodes are exact and give bitwise-identical results.

The grouped (MoE) product runs the same kernel over expert-aligned token
tiles: a per-tile expert table picks the weights (a squeezed leading expert
dimension of the stacked prepared weights), unused tiles exit at once.

Split-K partial sums are added by a small XLA fusion, or (``split_k_reduce=
"cluster"``) inside the kernel: the splits of a tile run as one thread-block
cluster and send their accumulators to the first CTA over distributed shared
memory. The cluster sum is one kernel (what a launch from torch needs) and
measured faster with 2-CTA clusters; 8-CTA clusters are 40-100% slower than 8
XLA-reduced splits (benchmarks/results/decode_variants-2026-11-23.md), and a
reduction through GMEM semaphores measured 0.3-0.8 us slower than the XLA fusion
(split_k_reduce-2026-11-23.md).

K-folding (``GemmConfig.k_fold``, 2 or 4) runs the splits of split-K inside one CTA instead:
its wgmma rows hold ``tile_n`` features for each K part (the prepared layout is K-tile-major,
so ``data [k_fold, K_pad/kg/k_fold, N_pad, kg/4]`` is a free view whose TMA box loads every
part), x enters as the free view ``[M * k_fold, K / k_fold]`` (rows (token, part)), one
MMA multiplies all parts with all parts, and the epilogue adds the matching blocks: no f32
partial sums, no second kernel (the XLA reduction costs about 1 us at N = 4096, a sixth of
the decode call there), at ``k_fold`` times the MMA work, which is free while ``M * k_fold``
fits one small wgmma. The decode then loads its code registers itself (a warpgroup's rows
span two 32-row parts, which no tiled SMEM view joins).

Stream-K (``GemmConfig.stream_k``) fills the SMs where whole-tile splits cannot (112
tiles of 256 features on 132 SMs): the CTAs share the (tile, K step) units in equal
contiguous runs, one pipeline each; a run stores its running sum whenever it enters
another tile, and an XLA fusion adds the differences (:class:`StreamK`;
benchmarks/results/stream_k-2026-11-23.md).

Measured on H100 80GB HBM3 (jax 0.11.2, weights rotated beyond L2, device
time incl. the split-K reduction; benchmarks/results/matmul-2026-11-23.md)
against bf16 ``jnp.dot`` (run 8: k-group 128, compact scales): M <= 16 is 1.92-2.05x
faster at N=K=4096 and 2.58-3.06x at 14336x4096 .. 28672x8192; M = 64 2.02-2.40x;
M = 256 0.98-1.11x; M = 1024 0.79-0.94x, so ``nvfp4_jax.matmul`` dequantizes and calls
XLA's dot from M = 2048 on instead (0.86-0.96x at M = 4096;
benchmarks/results/prefill-2026-11-23.md). Tried and
measured worse for prefill: 128-feature x 256-token tiles with 2 stages (1.3-1.45x
slower; with 3 stages next to 16-token output chunks they are among the tilings of
:func:`prefill_tiling`, which picks 128- or 256-feature tiles of 64-256 tokens by a cost
model of waves on the SMs, up to 60% faster than 256-feature tiles alone at M = 256-1792,
benchmarks/results/prefill_tiles-2026-12-03.md) and keeping a step's wgmmas in flight
across pipeline steps (at most 3% faster, up to 60% slower, and wrong with 128-token
tiles), and making the compute warpgroups take
turns at the tensor cores (within 1% at prefill, 2-12% slower at decode;
benchmarks/results/pingpong-2026-12-02.md). With its decode replaced by a bitcast the
kernel matches or beats bf16 at prefill: the decode (11-24% of the time there) is the
whole prefill gap (benchmarks/results/ablate_decode-2026-12-02.md). Widening compact
scales two at a time and splatting them through the multiply's half selectors (17 instead
of 19 instructions per eight weights) made the kernel 0-5% faster on the H200, and one
wgmma per k-group instead of one per quarter (``group_wgmma``, from 3 pipeline stages on)
another 0-3% (benchmarks/results/scale_pairs-2026-12-02.md).

Public entry points: :class:`GemmConfig`, :func:`default_config`,
:func:`single_kernel_config`, :func:`prefill_tiling`, :func:`prefill_token_tile`,
:func:`default_grouped_config`, :class:`StreamK`, :func:`prepare_weight`,
:func:`nvfp4_matmul`, :func:`nvfp4_grouped_matmul` and :func:`reference`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nvfp4_jax import _checks
from nvfp4_jax import reference as nvfp4_reference
from nvfp4_jax.backends import device_info
from nvfp4_jax.kernels import gemm_tuned
from nvfp4_jax.kernels.quantize import interpret_params

# Rows of one wgmma instruction on the M side (= output features here).
_WGMMA_ROWS = 64
# Largest wgmma N (= tokens here).
_MAX_TILE_M = 256
# Elements per scale block.
_BLOCK = 16
# Codes per uint16 lane of the prepared data (one per quarter of a k-group).
_CODES_PER_LANE = 4
# The k-group :func:`prepare_weight` uses by default where K allows it (see
# default_k_group): 128 k per k-group puts 64 bytes in every TMA row of codes and of x
# (k-group 64: 32 bytes), which measured 15-24% faster at M = 16-64 and on MoE shapes
# (benchmarks/results/k_group-2026-11-23.md).
DEFAULT_K_GROUP = 128
_K_GROUPS = (64, 128, 256)
# Lane bit of code bit i (0: mantissa, 1-2: exponent, 3: sign) of quarter q. Chosen (by
# exhaustive search over in-lane layouts) for the fewest integer-ALU ops of the fast bf16
# decode, the pipe it binds on: 7 ALU + 4 IMAD.SHL per register against 8 + 3 for
# ((0, 1, 2, 9), (3, 4, 5, 12), (6, 7, 8, 15), (10, 11, 13, 14)), 0.2-7% faster
# (benchmarks/results/ab_decode-2026-12-03.md).
_LANE_BITS = ((0, 1, 2, 13), (3, 4, 5, 12), (6, 7, 8, 15), (9, 10, 11, 14))
# SMEM per CTA on H100 as reported by the Mosaic GPU lowering.
_SMEM_BYTES = 232448
# With the fast decode the weights enter the MMA scaled by 2^-_FAST_SHIFT (see
# scale_exponent); the epilogue multiplies it back.
_FAST_SHIFT = 7
# Compact block scales (prepare_weight(dtype=None)): byte ``E << 3 | m`` is the scale
# ``2^(E - _COMPACT_BIAS) * (1 + m/8)``, E in 0..17 covering every nonzero E4M3 value
# (subnormals normalized); _COMPACT_INF (E = 18) marks a NaN scale.
_COMPACT_BIAS = 9
_COMPACT_INF = 18 << 3


AOperand = Literal["registers", "smem"]
SplitKReduce = Literal["xla", "cluster"]
# Largest portable thread-block cluster (CTAs), the bound on cluster split-K.
_MAX_CLUSTER = 8


# -----------------------------------------------------------------------------
# Configuration
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiling of one kernel launch.

    Attributes:
      tile_n: output features per CTA, split over ``compute_wgs`` compute
        warpgroups of 64 or 128 rows each.
      tile_m: tokens per CTA (wgmma N); multiple of 8, at most 256. The wrapper
        shrinks it to ``round_up(M, 8)`` when M is smaller.
      tile_k: reduction depth per pipeline step; multiple of the prepared
        weight's ``k_group`` (:data:`DEFAULT_K_GROUP`, 128).
      stages: SMEM pipeline depth (TMA buffers in flight).
      split_k: number of CTAs that share the K range of one output tile.
      split_k_reduce: how their fp32 partial sums are added (``split_k > 1``):
        "xla" stores them to GMEM for a small XLA fusion; "cluster" launches the
        ``split_k`` CTAs of a tile as one thread-block cluster (at most 8), whose
        members send their partial tiles into the first CTA's SMEM (``st.async``
        over distributed shared memory, counted by an mbarrier), which adds them
        in a fixed order and runs the fused epilogue: one kernel, no GMEM round trip.
      a_operand: "registers" feeds the decoded weights to wgmma from registers
        (fast; GPU only); "smem" stores them to swizzled SMEM first (runs in the
        Mosaic GPU interpreter).
      fast_decode: decode the codes with 32-bit register bit tricks
        (``plgpu.inline_mgpu``; GPU only, not interpretable) instead of the
        portable select-based jnp decode. None: fast for "registers", portable
        for "smem".
      compute_wgs: compute warpgroups per CTA (1 to 3; one more warpgroup issues
        the TMA copies). None: ``tile_n * k_fold // 64`` up to 192 rows, else 2.
      overlap_decode: issue the wgmmas of every k-group of a step back to back and
        wait once per step, so a warpgroup decodes k-group ``g + 1`` while the
        tensor cores run k-group ``g`` (ptxas keeps the register operands live
        until the wait); False: wait after each k-group. None: True for
        "registers" (1-10% faster on H100, bitwise the same result), False for
        "smem" (whose one operand buffer the next k-group rewrites).
      group_wgmma: one wgmma per k-group (its four quarters' register operands side by
        side) instead of one per quarter: 7-11% fewer instructions per step (descriptor
        arithmetic and warpgroup arrives), but the k-group's MMAs start only after its
        whole decode. None: True with register operands and ``stages >= 3``; on the H200
        that measured 0-3% faster, and with 2 stages 1-11% slower (the two compute
        warpgroups, one step apart at most, decode in lockstep and leave the tensor cores
        idle; benchmarks/results/scale_pairs-2026-12-02.md).
      stream_k: 0 (off), or the number of CTAs per token tile that share the
        ``n_tiles * K steps`` (tile, step) units of the product in contiguous,
        equal runs ("stream-K"). A run may end inside one output tile and go on in
        the next: the CTA then stores the partial sum so far and goes on. It fills
        every SM where whole tiles and splits cannot (e.g. 112 or 224 256-feature
        tiles on 132 SMs). Needs ``split_k == 1`` and ``stream_k <= n_tiles * K
        steps`` (a unit per CTA); the fp32 partial sums are added by a small XLA
        fusion (:class:`StreamK`).
      k_fold: 1 (off), 2 or 4: "K-folding", split-K inside one CTA with no partial sums
        leaving it. The CTA's ``tile_n * k_fold`` wgmma rows hold ``tile_n`` features
        (16 to 128, a multiple of 16) for each of ``k_fold`` equal parts of K, and x
        enters as the free view ``x.reshape(M * k_fold, K / k_fold)``, whose rows are
        (token, part) pairs: one MMA multiplies every part of the weights with every part
        of x, and the epilogue adds the ``k_fold`` matching (part, part) blocks through
        SMEM and stores the output tile. It fills the SMs at decode sizes where whole
        128-row tiles cannot (N = 4096: 128 CTAs of 32 features) without the XLA
        reduction of split-K; the MMA work grows ``k_fold``-fold, which costs nothing
        while ``M * k_fold`` fits one wgmma (``tile_m`` counts (token, part) rows). Needs
        ``split_k == 1``, no stream-K, warpgroups of whole parts, the fast decode on the
        GPU (the portable decode in the interpreter) and ``K`` a multiple of ``k_fold *
        tile_k``.
      out_chunk: tokens of the output tile each warpgroup stages in SMEM per TMA store
        (a multiple of 8), the stores going one after another through that one buffer;
        0: the whole token tile, or 64 tokens for the f32 partial sums of a larger one.
        32 frees 48 KB next to 256 x 128 tiles, room for a fourth pipeline stage at
        tile_k 128 (:func:`chunked_output_config`; on the H200 1-3% faster at M = 128-4096,
        up to 11% for grouped 136-token tiles,
        benchmarks/results/out_chunk-2026-12-03.md). Not with ``k_fold`` (whose
        epilogue adds the parts in one output tile).
    """

    tile_n: int = 128
    tile_m: int = 64
    tile_k: int = 256
    stages: int = 4
    split_k: int = 1
    split_k_reduce: SplitKReduce = "xla"
    a_operand: AOperand = "registers"
    fast_decode: bool | None = None
    compute_wgs: int | None = None
    overlap_decode: bool | None = None
    stream_k: int = 0
    group_wgmma: bool | None = None
    k_fold: int = 1
    out_chunk: int = 0

    def __post_init__(self):
        if self.k_fold not in (1, 2, 4):
            raise ValueError(f"k_fold must be 1, 2 or 4, got {self.k_fold!r}")
        if self.k_fold == 1 and (self.tile_n % _WGMMA_ROWS or not 64 <= self.tile_n <= 256):
            raise ValueError(f"tile_n must be 64, 128, 192 or 256, got {self.tile_n}")
        if self.k_fold > 1 and (
            self.tile_n % _BLOCK
            or self.tile_n > 128
            or self.cta_rows % _WGMMA_ROWS
            or self.cta_rows > 256
        ):
            raise ValueError(
                f"with k_fold={self.k_fold}, tile_n must be a multiple of 16 of at most 128"
                f" with tile_n * k_fold a multiple of 64 of at most 256, got {self.tile_n}"
            )
        if self.k_fold > 1 and (self.split_k != 1 or self.stream_k):
            raise ValueError(
                f"k_fold={self.k_fold} needs split_k=1 and stream_k=0, got"
                f" split_k={self.split_k}, stream_k={self.stream_k}"
            )
        if self.out_chunk % 8 or not 0 <= self.out_chunk <= _MAX_TILE_M:
            raise ValueError(
                f"out_chunk must be 0 (automatic) or a multiple of 8 in [8, 256], got"
                f" {self.out_chunk}"
            )
        if self.out_chunk and self.k_fold > 1:
            raise ValueError(
                f"out_chunk={self.out_chunk} needs k_fold=1 (a K-folded epilogue stores one"
                f" output tile), got k_fold={self.k_fold}"
            )
        if self.tile_m % 8 or not 8 <= self.tile_m <= _MAX_TILE_M:
            raise ValueError(f"tile_m must be a multiple of 8 in [8, 256], got {self.tile_m}")
        if self.tile_k % 64 or self.tile_k <= 0:
            raise ValueError(f"tile_k must be a positive multiple of 64, got {self.tile_k}")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")
        if self.stream_k < 0 or (self.stream_k and self.split_k != 1):
            raise ValueError(
                f"stream_k must be 0 (off) or a CTA count with split_k=1, got"
                f" stream_k={self.stream_k}, split_k={self.split_k}"
            )
        if self.split_k_reduce not in ("xla", "cluster"):
            raise ValueError(
                f"split_k_reduce must be 'xla' or 'cluster', got {self.split_k_reduce!r}"
            )
        if self.split_k_reduce == "cluster" and self.split_k > _MAX_CLUSTER:
            raise ValueError(
                f"split_k_reduce='cluster' needs split_k <= {_MAX_CLUSTER} (one thread-block"
                f" cluster per output tile), got split_k={self.split_k}"
            )
        if self.a_operand not in ("registers", "smem"):
            raise ValueError(f"a_operand must be 'registers' or 'smem', got {self.a_operand!r}")
        if self.overlap_decode is True and self.a_operand == "smem":
            raise ValueError(
                "overlap_decode needs a_operand='registers' (the SMEM operand buffer is"
                " rewritten by the next k-group)"
            )
        if self.group_wgmma is True and self.a_operand == "smem":
            raise ValueError(
                "group_wgmma needs a_operand='registers' (the SMEM operand buffer holds one"
                " quarter)"
            )
        wgs = self.num_compute_wgs
        # Four compute warpgroups hung on an H100 (observed). Likely cause: the
        # warp-specialized pipeline asks setmaxnreg for (512 - 40) / 4 registers
        # per compute thread, more than a 640-thread launch holds.
        if not 1 <= wgs <= 3 or self.cta_rows % wgs or self.cta_rows // wgs not in (64, 128):
            raise ValueError(
                f"tile_n * k_fold={self.cta_rows} must split into 1..3 compute warpgroups"
                f" of 64 or 128 rows, got compute_wgs={self.compute_wgs}"
            )
        if self.wg_rows % self.tile_n and self.k_fold > 1:
            raise ValueError(
                f"with k_fold, every compute warpgroup holds whole K parts: its"
                f" {self.wg_rows} rows must be a multiple of tile_n={self.tile_n}"
            )

    @property
    def cluster_reduce(self) -> bool:
        """Whether the split-K partial sums are added inside a CTA cluster."""
        return self.split_k > 1 and self.split_k_reduce == "cluster"

    @property
    def use_fast_decode(self) -> bool:
        if self.fast_decode is None:
            return self.a_operand == "registers"
        return self.fast_decode

    @property
    def use_overlap_decode(self) -> bool:
        if self.overlap_decode is None:
            return self.a_operand == "registers"
        return self.overlap_decode

    @property
    def use_group_wgmma(self) -> bool:
        if self.group_wgmma is None:
            return self.a_operand == "registers" and self.stages >= 3
        return self.group_wgmma

    @property
    def cta_rows(self) -> int:
        """wgmma rows per CTA: ``tile_n`` features for each of the ``k_fold`` K parts."""
        return self.tile_n * self.k_fold

    @property
    def num_compute_wgs(self) -> int:
        if self.compute_wgs is not None:
            return self.compute_wgs
        return self.cta_rows // _WGMMA_ROWS if self.cta_rows <= 192 else 2

    @property
    def wg_rows(self) -> int:
        return self.cta_rows // self.num_compute_wgs


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def token_tile(cfg: GemmConfig, m: int) -> int:
    """The token tile a launch over ``m`` rows uses: ``cfg.tile_m``, shrunk to
    ``round_up(m, 8)`` for fewer rows."""
    return min(cfg.tile_m, _round_up(max(m, 1), 8))


def sm_count(num_sms: int | None = None) -> int:
    """``num_sms`` if given, else the device's SM count (132, an H100's, where unknown)."""
    return num_sms or device_info().num_sms or 132


def default_k_group(k: int) -> int:
    """The k-group of a weight with reduction size ``k``: :data:`DEFAULT_K_GROUP` (128),
    or 64 where ``k`` is not a multiple of 32 (the x tile's TMA rows are ``k_group / 4``
    elements of a ``[M, K]`` array, so K must be a multiple of them)."""
    return DEFAULT_K_GROUP if k % (DEFAULT_K_GROUP // _CODES_PER_LANE) == 0 else 64


def _check_k_group(k_group, k: int) -> None:
    if k_group not in _K_GROUPS:
        raise ValueError(f"k_group must be 64, 128 or 256, got {k_group!r}")
    if k % (k_group // _CODES_PER_LANE):
        raise ValueError(
            f"k_group={k_group} needs K to be a multiple of {k_group // _CODES_PER_LANE} (the"
            f" x tile's TMA rows), got K={k}; use k_group=64 (any K % 16 == 0)"
        )


def _largest_divisor_at_most(n: int, bound: int) -> int:
    return max(d for d in range(1, max(1, min(n, bound)) + 1) if n % d == 0)


def default_config(
    m: int,
    n: int,
    k: int,
    *,
    dtype=jnp.bfloat16,
    num_sms: int | None = None,
    tuned: bool = True,
    stream_k: bool = True,
    split_k: bool = True,
    k_group: int | None = None,
    scale_itemsize: int = 2,
) -> GemmConfig:
    """Tiling for one product: the measured best of :mod:`gemm_tuned` for this device and
    shape where the table has one (``tuned``), else a heuristic per shape bucket (decode:
    M <= 64, prefill: M > 64). ``k_group`` is the prepared weight's (None: the default
    for ``k``, :func:`default_k_group`); tile_k is a multiple of it, and table entries
    measured on another k-group are not used. ``scale_itemsize``: bytes per block scale of
    the prepared weight (1: compact, the default layout; 2, the default here, fits either),
    which decides how many pipeline stages fit SMEM.

    Decode is bound by streaming the weights: two compute warpgroups and a token tile of
    ``round_up(M, 8)``. While the 128-feature tiles fit in one wave, 64 rows per
    warpgroup with split-K so that ``n_tiles * split_k`` covers the SMs (measured 3-9%
    faster than 256-feature tiles with twice the splits at N = K = 4096, M <= 16, and
    than stream-K at 14336x4096, H100, k-group 128, compact scales); beyond a wave,
    128-row warpgroups, and at M <= 8 stream-K over all SMs in one-k-group units where
    that one wave leaves more than a tenth of them idle (e.g. 112 tiles of 256 features:
    measured 11% faster than no split at 28672x8192, M = 1; 5% slower at M = 16, the
    tuned table has M = 64; the two waves of 224 tiles at 57344x8192 do not qualify).
    ``stream_k=False`` rules stream-K out (a launch from torch, which runs no XLA
    reduction); ``split_k=False`` rules out stream-K and split-K, and the tile choices
    that follow from them (the grouped kernel, which sizes its own split).

    Prefill is bound by the tensor cores and by the decode ALU work, which is amortized
    over the token tile and the feature rows of the tile: 256 x 128 tiles (beyond a wave,
    the token tile of :func:`prefill_token_tile`), with split-K where the
    tiles do not fill the SMs, unless its f32 partial sums would outweigh the weight
    (N = K = 4096, M = 256: 4 splits write 2x the weight's bytes): then 128 x 128 tiles
    and half the splits (measured 1.17x against 0.95x of bf16 there). At M = 256-2047
    (tile_k 128, ``split_k`` allowed) that tiling is replaced by :func:`prefill_tiling`'s,
    a cost model over 128- and 256-feature tiles of 64-256 tokens and their wave counts,
    where predicted 3% cheaper. Stages are the
    most that fit in SMEM (at most 4). Measured on H100 (jax 0.11.2) with
    ``benchmarks/bench_matmul.py --configs`` (results in
    benchmarks/results/matmul_sweep-*.md and scales-2026-11-23.md).
    """
    if k_group is None:
        k_group = default_k_group(k)
    _check_k_group(k_group, k)
    num_sms = sm_count(num_sms)
    itemsize = _check_scale_itemsize(scale_itemsize)
    entry = gemm_tuned.lookup(device_info().device_kind, m, n, k, k_group) if tuned else None
    if entry is not None and (stream_k or not entry.stream_k):
        return _fit_stages(tuned_config(entry), m, dtype, itemsize)
    if m <= 64:
        tile_m = _round_up(max(m, 1), 8)
        if -(-n // 128) > num_sms:  # more than a wave of 128-feature tiles
            cfg = GemmConfig(tile_n=256, tile_m=tile_m, tile_k=256)
        else:  # 64-row warpgroups, split-K to fill the SMs
            cfg = GemmConfig(tile_n=128, tile_m=tile_m, tile_k=max(128, k_group))
    else:
        cfg = GemmConfig(tile_n=256, tile_m=prefill_token_tile(m, n, num_sms), tile_k=k_group)
    if _round_up(n, _WGMMA_ROWS) < cfg.tile_n:  # no warpgroup without output features
        cfg = dataclasses.replace(cfg, tile_n=_round_up(n, _WGMMA_ROWS))
    if not split_k:
        return _fit_stages(cfg, m, dtype, itemsize)
    k_steps = -(-k // cfg.tile_k)
    ctas = -(-n // cfg.tile_n) * -(-max(m, 1) // cfg.tile_m)  # (M = 0 plans as M = 1)
    splits = _largest_divisor_at_most(k_steps, max(1, num_sms // ctas))
    if (
        stream_k
        and cfg.tile_n == 256
        and m <= 8
        and ctas * splits < 0.9 * num_sms
        and ctas * -(-k // k_group) >= num_sms  # at least one k-group unit per CTA
    ):
        cfg = dataclasses.replace(cfg, tile_k=k_group, stream_k=num_sms)
        return _fit_stages(cfg, m, dtype, itemsize)
    folded = k_fold_config(dataclasses.replace(cfg, split_k=splits), m, k, max_tokens=8)
    if folded is not None:
        return _fit_stages(folded, m, dtype, itemsize)
    partial_bytes = splits * _round_up(m, 8) * n * 4
    if m > 64 and splits > 1 and partial_bytes > n * k // 2 and cfg.tile_n == 256:
        cfg = dataclasses.replace(cfg, tile_n=128)
        splits = _largest_divisor_at_most(k_steps, max(1, num_sms // (2 * ctas)))
    cfg = _fit_stages(dataclasses.replace(cfg, split_k=splits), m, dtype, itemsize)
    if m <= 64:
        return cfg
    cfg = chunked_output_config(cfg, m, dtype, scale_itemsize=itemsize)
    if _PREFILL_MODEL_M[0] <= m < _PREFILL_MODEL_M[1] and _modelled(cfg):
        return prefill_tiling(
            m, n, k, dtype=dtype, num_sms=num_sms, scale_itemsize=itemsize, incumbent=cfg
        )
    return cfg


def chunked_output_config(
    cfg: GemmConfig, m: int, dtype=jnp.bfloat16, *, scale_itemsize: int = 2
) -> GemmConfig:
    """``cfg`` with 4 pipeline stages and its output stored in 32-token chunks
    (``GemmConfig.out_chunk``) where staging the whole output tile leaves SMEM for fewer
    stages and the chunks for 4, else ``cfg``. On the H200: 256 x 128 tiles at tile_k 128
    (3 -> 4 stages) 1-3% faster (dense, M = 128-4096) and 0-2% (grouped); 256 x 136
    grouped tiles (2 -> 4) 10% faster; 152-token tiles, where the chunks buy a third stage
    only, 1-10% slower (benchmarks/results/out_chunk-2026-12-03.md). ``scale_itemsize``:
    bytes per block scale of the prepared weight (:func:`smem_bytes`)."""
    if cfg.k_fold > 1 or cfg.out_chunk or cfg.stages >= 4:
        return cfg
    chunked = dataclasses.replace(cfg, stages=4, out_chunk=32)
    chunked = _fit_stages(chunked, m, dtype, scale_itemsize=scale_itemsize)
    return chunked if chunked.stages == 4 else cfg


# M range of prefill_tiling's cost model in default_config (fit at M = 512-1536, checked at
# 256-1792; the dequantize route takes nvfp4_jax.matmul from M = 2048 on, and below 256 the
# tuned table and the split-K rule do).
_PREFILL_MODEL_M = (256, 2048)
# Largest token tile per tile_n that prefill_tiling considers (the largest measured: 176
# fits 2 pipeline stages next to 256-feature tiles, 256 fits 3 next to 128-feature ones).
_PREFILL_MAX_TOKENS = {128: 256, 256: 176}
# Time of one wave of tiles of T tokens, us on the H200 at tile_k 128 with compact scales:
# (a * T + b) * K / 4096 + c, per (tile_n, pipeline stages >= 3): least squares over 79
# timings of 16 shapes at M = 512-1536, rms error 2.9%, 1.5% and 3.5%, at most 6-8%
# (benchmarks/results/prefill_tiles-2026-12-03.md).
_PREFILL_WAVE_US = {
    (128, True): (0.128, 7.0, 3.55),
    (256, True): (0.231, 12.9, 3.6),
    (256, False): (0.271, 12.0, 5.9),  # T > 128: 2 stages fit
}
# Split-K's f32 partial sums: bytes per us that the XLA reduction adds to a launch.
_PARTIAL_SUM_BYTES_PER_US = 3.0e6
# The least predicted gain for prefill_tiling's pick over default_config's rule without it
# (the model's rms error).
_TILING_MIN_GAIN = 0.03


def _modelled(cfg: GemmConfig) -> bool:
    """Whether :data:`_PREFILL_WAVE_US` has ``cfg``'s tile family (tile_k 128, the default
    warpgroups, no stream-K or K-folding)."""
    return (
        (cfg.tile_n, cfg.stages >= 3) in _PREFILL_WAVE_US
        and cfg.tile_k == 128
        and (cfg.compute_wgs, cfg.stream_k, cfg.k_fold) == (None, 0, 1)
    )


def prefill_tiling_cost(cfg: GemmConfig, m: int, n: int, k: int, num_sms: int) -> float:
    """Predicted time (us, H200) of a prefill launch of ``cfg``: its waves of ``num_sms``
    CTAs (a partly full wave costs a whole one) times the per-wave time of its tile
    (:data:`_PREFILL_WAVE_US`), plus the XLA reduction of split-K partial sums. Raises
    ValueError for tilings the model does not cover: other than 128 features with 3 or more
    stages or 256 features, tile_k 128, default warpgroups, no stream-K or K-folding."""
    _checks.ints_at_least(("m", m, 1), ("n", n, 1), ("k", k, 1), ("num_sms", num_sms, 1))
    if not _modelled(cfg):
        raise ValueError(
            "prefill_tiling_cost models 128-feature tiles with >= 3 stages and 256-feature"
            " tiles at tile_k 128 without compute_wgs, stream_k or k_fold, got"
            f" tile_n={cfg.tile_n}, stages={cfg.stages}, tile_k={cfg.tile_k},"
            f" compute_wgs={cfg.compute_wgs}, stream_k={cfg.stream_k}, k_fold={cfg.k_fold}"
        )
    a, b, c = _PREFILL_WAVE_US[cfg.tile_n, cfg.stages >= 3]
    ctas = -(-n // cfg.tile_n) * -(-m // cfg.tile_m) * cfg.split_k
    us = -(-ctas // num_sms) * ((a * cfg.tile_m + b) * k / cfg.split_k / 4096 + c)
    if cfg.split_k > 1:
        us += cfg.split_k * _round_up(m, 8) * n * 4 / _PARTIAL_SUM_BYTES_PER_US
    return us


def prefill_tilings(
    m: int, n: int, k: int, *, dtype=jnp.bfloat16, num_sms: int = 132, scale_itemsize: int = 2
) -> list[GemmConfig]:
    """The tilings :func:`prefill_tiling` chooses from at tile_k 128: 128- and 256-feature
    tiles of every token count ``ceil(m / T)`` with T from 64 to 256 (128 features, two
    64-row warpgroups, m64nT wgmmas, output in 16-token chunks, at least 3 pipeline stages)
    or 176 (256 features, two 128-row warpgroups; 4 stages with 32-token output chunks where
    they fit, else the most that fit), each at its smallest T (a multiple of 8), with split-K
    where its tiles do not fill the ``num_sms`` SMs. ``scale_itemsize``: bytes per block
    scale of the prepared weight (:func:`smem_bytes`)."""
    _checks.ints_at_least(("m", m, 1), ("n", n, 1), ("k", k, 1), ("num_sms", num_sms, 1))
    itemsize = _check_scale_itemsize(scale_itemsize)
    k_steps = -(-k // 128)
    out = []
    for tile_n, most in _PREFILL_MAX_TOKENS.items():
        if tile_n > _round_up(n, _WGMMA_ROWS):  # no warpgroup without output features
            continue
        for count in sorted({-(-m // t) for t in range(64, most + 1, 8)}):
            tile_m = _round_up(-(-m // count), 8)
            if not 64 <= tile_m <= most:
                continue
            tiles = -(-n // tile_n) * count
            splits = _largest_divisor_at_most(k_steps, max(1, num_sms // tiles))
            if tile_n == 128:
                cfg = GemmConfig(tile_n, tile_m, 128, stages=4, split_k=splits, out_chunk=16)
                cfg = _fit_stages(cfg, m, dtype, itemsize)
                if cfg.stages < 3:  # not modelled (one measured 20% above its prediction)
                    continue
            else:
                cfg = GemmConfig(tile_n, tile_m, 128, split_k=splits)
                cfg = _fit_stages(cfg, m, dtype, itemsize)
                if splits == 1:
                    cfg = chunked_output_config(cfg, m, dtype, scale_itemsize=itemsize)
            out.append(cfg)
    return out


def prefill_tiling(
    m: int,
    n: int,
    k: int,
    *,
    dtype=jnp.bfloat16,
    num_sms: int = 132,
    scale_itemsize: int = 2,
    incumbent: GemmConfig | None = None,
) -> GemmConfig | None:
    """The tiling of :func:`prefill_tilings` with the least :func:`prefill_tiling_cost`
    (the smaller token tile on ties). With an ``incumbent`` (a tiling the model covers, see
    :func:`prefill_tiling_cost`: :func:`default_config`'s rule without it), the pick replaces it
    only where predicted :data:`_TILING_MIN_GAIN` (3%, the model's rms error) cheaper, so
    choices inside the model's error stay measured ones. None where there is no candidate
    and no incumbent (N <= 64).

    Wave quantization decides prefill on 132 SMs, and 128-feature tiles of up to 256 tokens
    give it more tile counts to choose from. On the H200 (tile_k 128, compact scales), over
    16 shapes at M = 512-1536 :func:`default_config`'s pick was the measured best of 4-6
    candidates or within 0.8% of it; outside the fit, on 17 shapes at M = 576-1792 it was as
    fast as the rule before or 0.6-60% faster (e.g. 4096x4096 at M = 576, 128 x 144 tiles
    instead of 256 x 128, 28.1 against 43.6 us), and on 16 at M = 256-448 the measured best
    of all its candidates or within 1% of it on 14, never slower than the default before, up
    to 44% faster (4096x14336 at M = 320: 128 x 160 tiles in 2 splits, 55.1 against 79.1 us)
    (benchmarks/results/prefill_tiles-2026-12-03.md)."""
    tilings = prefill_tilings(
        m, n, k, dtype=dtype, num_sms=num_sms, scale_itemsize=scale_itemsize
    )
    if not tilings:
        return incumbent

    def cost(cfg: GemmConfig) -> float:
        return prefill_tiling_cost(cfg, m, n, k, num_sms)

    best = min(tilings, key=lambda cfg: (cost(cfg), cfg.tile_m))
    if incumbent is None:
        return best
    return best if cost(best) <= (1 - _TILING_MIN_GAIN) * cost(incumbent) else incumbent


# Token tiles prefill_token_tile chooses from: 64 to 176 (the largest measured to fit 2
# pipeline stages and its output tile next to 256-feature tiles).
_PREFILL_TOKEN_TILES = tuple(range(64, 177, 8))
# Fixed cost of a 256-feature tile in tokens (decode, pipeline fill, epilogue): a tile of T
# tokens takes (T + 64) * 0.26 us per 4096 of K on the H200 (fit over T = 64..176).
_TILE_COST_TOKENS = 64
# The least predicted gain for leaving 128-token tiles (the model's error: up to 6%).
_TOKEN_TILE_MIN_GAIN = 0.08


def prefill_token_tile(m: int, n: int, num_sms: int) -> int:
    """Token tile of a prefill launch (M > 64) with 256-feature tiles.

    128 where its ``n_tiles * ceil(m / 128)`` tiles fit one wave of ``num_sms`` (split-K
    fills the SMs then). Beyond a wave, every tile of a wave takes about the same time,
    ``T + 64`` token-equivalents for ``T`` tokens (0.26 us per token-equivalent per 4096 of
    K at 14336x4096 on the H200, fit over T = 64..176), and a last wave that is only partly
    full costs a whole one, so a launch costs ``ceil(tiles / num_sms) * (T + 64)``. The T of
    64, 72, ..., 176 with the least cost (the smallest on ties) replaces 128 where it is
    predicted at least 8% faster (the model erred by up to 6% on the measured shapes).

    E.g. 14336x4096 at M = 1024: 448 tiles of 128 tokens run in 4 waves (3.39 full), 392
    of 152 in 3: 173 against 194 us; M = 384: 96 tokens, 82 against 99 us; M = 768: 112
    tokens, 137 against 146 us; 28672x8192 at M = 768: 112 tokens, 526 against 558 us
    (benchmarks/results/prefill_token_tile-2026-12-02.md).
    """
    _checks.ints_at_least(("m", m, 0), ("n", n, 1), ("num_sms", num_sms, 1))
    n_tiles = -(-n // 256)
    m = max(m, 1)

    def cost(tile_m: int) -> int:
        waves = -(-(n_tiles * -(-m // tile_m)) // num_sms)
        return waves * (tile_m + _TILE_COST_TOKENS)

    if n_tiles * -(-m // 128) <= num_sms:
        return 128
    best = min(_PREFILL_TOKEN_TILES, key=lambda t: (cost(t), t))
    return best if cost(best) <= (1 - _TOKEN_TILE_MIN_GAIN) * cost(128) else 128


def k_fold_config(
    cfg: GemmConfig, m: int, k: int, *, max_tokens: int = 16
) -> GemmConfig | None:
    """A split-K tiling of 128-feature tiles in 2 or 4 splits as the K-folded tiling that
    runs the same CTAs and steps with the splits inside each CTA (``GemmConfig.k_fold``:
    ``128 / split_k`` features, no partial sums, one kernel), or None where that does not
    apply: other tilings, ``m > max_tokens``, or K not made of ``split_k`` parts of whole
    steps. Measured on the H200 at N = K = 4096 (``ab_configs-2026-12-03.md``): M = 1 5.98
    against 6.90 us, M = 8 6.91 against 7.35 us, M = 16 8.61 against 7.23 us (the 4 M x
    rows then cost more than the reduction saves; ``max_tokens=8`` in :func:`default_config`).
    """
    fold = cfg.split_k
    if (
        cfg.tile_n != 128
        or fold not in (2, 4)
        or cfg.cluster_reduce
        or cfg.num_compute_wgs != 2
        or m > max_tokens
        or k % (fold * cfg.tile_k)
    ):
        return None
    return dataclasses.replace(
        cfg,
        tile_n=cfg.tile_n // fold,
        tile_m=_round_up(max(m, 1) * fold, 8),
        split_k=1,
        split_k_reduce="xla",
        k_fold=fold,
    )


def single_kernel_config(
    cfg: GemmConfig, m: int, k: int, dtype=jnp.bfloat16, *, n: int | None = None, fold: bool = True
) -> GemmConfig:
    """``cfg`` as one kernel launch with no work after it (what a launch from torch runs where
    the split-K sum kernel, ``split_k.add_partials``, has no block for the partials):
    at M <= 16, 2 or 4 splits of 128-feature tiles K-folded into the CTA
    (:func:`k_fold_config`; ``fold=False`` leaves them to clusters), other split-K reduced
    inside clusters of at most 4 CTAs (the largest divisor of the K steps
    up to ``min(split_k, 4)`` whose partial-sum buffers fit SMEM; 8-CTA clusters measured
    40-100% slower than 8 splits reduced by XLA on H100, 4-CTA ones close to it), else no
    split-K; stream-K becomes one CTA per tile. At M <= 16, split 128-feature tiles of an
    ``n >= 256`` weight become 256-feature tiles with twice the splits first: clusters of
    128-feature tiles measured slower (N = K = 4096, 4-CTA clusters: 12.2 against 9.3 us at
    M = 1, 13.4 against 10.3 us at M = 16)."""
    if cfg.stream_k:
        return _fit_stages(dataclasses.replace(cfg, stream_k=0), m, dtype)
    if cfg.split_k == 1 or cfg.cluster_reduce:
        return cfg
    if fold and (folded := k_fold_config(cfg, m, k)) is not None:
        return _fit_stages(folded, m, dtype)
    if cfg.tile_n == 128 and m <= 16 and n is not None and _round_up(n, _WGMMA_ROWS) >= 256:
        cfg = dataclasses.replace(cfg, tile_n=256, compute_wgs=None, split_k=2 * cfg.split_k)
    k_steps = -(-k // cfg.tile_k)
    for split_k in range(min(cfg.split_k, 4), 1, -1):
        if k_steps % split_k == 0:
            cluster = dataclasses.replace(cfg, split_k=split_k, split_k_reduce="cluster")
            cluster = _fit_stages(cluster, m, dtype)
            if smem_bytes(cluster, token_tile(cluster, m), dtype) <= _SMEM_BYTES:
                return cluster
    return _fit_stages(dataclasses.replace(cfg, split_k=1), m, dtype)


def tuned_config(entry: gemm_tuned.Tuned) -> GemmConfig:
    """The :class:`GemmConfig` of a :mod:`gemm_tuned` table entry."""
    return GemmConfig(
        tile_n=entry.tile_n,
        tile_m=entry.tile_m,
        tile_k=entry.tile_k,
        stages=entry.stages,
        split_k=entry.split_k,
        split_k_reduce=entry.split_k_reduce,
        stream_k=entry.stream_k,
        k_fold=entry.k_fold,
        out_chunk=entry.out_chunk,
    )


def _fit_stages(cfg: GemmConfig, m: int, dtype, scale_itemsize: int = 2) -> GemmConfig:
    """``cfg`` with the most pipeline stages (at most its own, at least 2) that fit SMEM
    for ``m`` tokens (block scales of ``scale_itemsize`` bytes: 2 covers every layout)."""
    tokens = token_tile(cfg, m * cfg.k_fold)
    while cfg.stages > 2 and smem_bytes(cfg, tokens, dtype, scale_itemsize) > _SMEM_BYTES:
        cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
    return cfg


# -----------------------------------------------------------------------------
# Weight preparation (one-time, pure jnp)
# -----------------------------------------------------------------------------


class PreparedWeight(NamedTuple):
    """Kernel layout of an NVFP4 weight ``W[K, N]`` (or of a stack ``W[E, K, N]`` of
    expert weights, with a leading ``E`` on every field); see :func:`prepare_weight`.

    Attributes:
      data: uint16 ``[(E,) K_pad / k_group, N_pad, k_group / 4]``.
      scales: ``[(E,) K_pad / k_group, N_pad / 16, k_group]``, uint8 (compact,
        :func:`compact_scales`) or bf16/f16 (pre-widened and pre-multiplied by
        ``2**scale_exponent(dtype)``); :func:`scale_rows` views it as ``[(E,) K_pad /
        k_group, N_pad, k_group / 16]``.
      tensor_scale: float32 ``[1]`` multiplier (``[E]`` for a stack).
    """

    data: jax.Array
    scales: jax.Array
    tensor_scale: jax.Array

    @property
    def k_group(self) -> int:
        return self.data.shape[-1] * _CODES_PER_LANE


def scale_exponent(dtype) -> int:
    """Power of two folded into widened block scales (and undone in the kernel).

    The fast decode places a code as the bit pattern ``sign << 15 | em << s``
    (``s`` = mantissa bits - 1), i.e. the E2M1 value times ``2^(1 - bias)``
    (bias 127 for bf16, 15 for f16). Block scales multiplied by
    ``2^(bias - 1 - 7)`` turn that into the exact normal number
    ``v * s * 2^-7``; ``448 * 2^e`` stays finite. The epilogue multiplies by
    ``2^7``.
    """
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):  # not a widened format
        return 0
    bias = 1 - jnp.finfo(dtype).minexp
    return bias - 1 - _FAST_SHIFT


def prepare_weight(
    data: jax.Array,
    scales: jax.Array,
    tensor_scale: jax.Array | float,
    *,
    dtype=None,
    k_group: int | None = None,
) -> PreparedWeight:
    """Reorders a canonical NVFP4 weight into the layout the kernel reads.

    Pure jnp; run it once per weight.

    Args:
      data: uint8 ``[N, K/2]``, two E2M1 codes per byte (low nibble first); or a
        stack ``[E, N, K/2]`` of expert weights, prepared one by one.
      scales: float8_e4m3fn ``[N, K/16]`` (``[E, N, K/16]``).
      tensor_scale: float32 scalar multiplier (for a stack: a scalar or ``[E]``).
      dtype: None (default): compact one-byte block scales (see :func:`compact_scales`),
        which the kernel widens with a shift and an add; or bf16/f16: scales stored
        pre-widened to that dtype (twice the bytes, no widening in the kernel). Every
        format serves both activation dtypes.
      k_group: interleaving granule along K (64, 128 or 256; K must be a multiple
        of ``k_group / 4``). None: :func:`default_k_group` (128, or 64 where K is not
        a multiple of 32). Kernel ``tile_k`` must be a multiple of it. Every TMA row
        of codes and of the x tile is ``k_group / 4`` uint16/bf16 elements, swizzled
        at that width: 32 bytes for 64, 64 bytes for 128 (measured 15-24% faster at
        M = 16-64 than 64, as TMA moves narrow rows slowly), 128 bytes for 256.

    Returns:
      A :class:`PreparedWeight` with

      * ``data[g, n, j]`` (uint16): for k-group ``g`` and output feature ``n``,
        lane ``j`` holds the four E2M1 codes of ``W[k, n]`` at ``k = g * k_group
        + q * (k_group / 4) + j``, ``q = 0..3`` (the k-group's four *quarters*);
        code bit ``i`` (0: mantissa, 1-2: exponent, 3: sign) of quarter ``q`` is
        lane bit ``_LANE_BITS[q][i]``: quarter 0 in bits 0-2 + 13, 1 in 3-5 + 12,
        2 in 6-8 + 15, 3 in 9-11 + 14. Quarters 1 and 2 keep the sign 9 bits
        above the mantissa, as in bf16, so the fast bf16 decode makes a bf16x2
        pair of each with one shift and one AND; quarters 0 and 3 take two
        (see :func:`_fast_decode_plan`).
        Each quarter is a dense ``[rows, k_group/4]`` wgmma operand, multiplied
        with a contiguous column slice of the x tile. One
        k-group of all features is contiguous (K-tile-major), so a TMA box
        ``(tile_k/k_group, tile_n, k_group/4)`` reads ``tile_k / k_group``
        contiguous runs of ``tile_n * k_group / 2`` bytes.
      * ``scales[g, p, r * k_group/16 + j]`` (``[K_pad/k_group, N_pad/16, k_group]``): the scale
        of block ``j`` (``k in [g * k_group + 16 j, ... + 16)``) of feature ``n = 16 p +
        r``. Per k-group the features' block scales are stored row by row (``kg/16``
        consecutive scales per feature, :func:`scale_rows` is that view), in bands of 16
        features, so a pipeline step reads a ``(tile_k/k_group, tile_n/16, k_group)`` TMA
        box and each thread of the fast decode fetches all scales of one of its rows in
        a k-group with one vector load (the wgmma fragment's rows are 8 apart).
        ``dtype(s * 2**scale_exponent(dtype))``, or (``dtype`` None) the uint8 bytes of
        :func:`compact_scales`, whose blocks with a zero, NaN or negative scale have
        their codes zeroed or negated.
      * ``tensor_scale``: float32 ``[1]``, applied in the fp32 epilogue.

      ``K_pad = round_up(K, k_group)``, ``N_pad = round_up(N, 16)``; padding
      codes and scales are 0, so padded weights contribute nothing. Tiles that
      overhang ``N_pad``/``K_pad`` are zero-filled by TMA.
    """
    if data.ndim == 3 and data.dtype == jnp.uint8:  # a stack of expert weights
        num_experts = data.shape[0]
        ts = jnp.broadcast_to(jnp.asarray(tensor_scale, jnp.float32), (num_experts,))
        out = jax.vmap(functools.partial(prepare_weight, dtype=dtype, k_group=k_group))(
            data, scales, ts
        )
        return out._replace(tensor_scale=out.tensor_scale.reshape(num_experts))
    if data.ndim != 2 or data.dtype != jnp.uint8:
        raise ValueError(
            f"data must be uint8 [N, K/2] or [E, N, K/2], got {data.dtype}{list(data.shape)}"
        )
    n, half_k = data.shape
    k = 2 * half_k
    if scales.shape != (n, k // _BLOCK) or k % _BLOCK:
        raise ValueError(
            f"scales must be [N, K/16] = {[n, k // _BLOCK]} with K % 16 == 0, got"
            f" {list(scales.shape)} for data {list(data.shape)}"
        )
    if k_group is None:
        k_group = default_k_group(k)
    _check_k_group(k_group, k)
    if dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be bf16, f16 or None, got {dtype}")
    k_pad = _round_up(k, k_group)
    n_pad = _round_up(n, 16)
    lanes = k_group // _CODES_PER_LANE
    scales = scales.astype(jnp.float8_e4m3fn)  # other float dtypes round to E4M3
    if dtype is None:
        data, s = compact_scales(data, scales)  # (zero/NaN/negative scales touch the codes)
    else:
        s = scales.astype(jnp.float32) * np.float32(2.0 ** scale_exponent(dtype))
        s = s.astype(dtype)

    codes = jnp.stack([data & 0xF, data >> 4], axis=-1).reshape(n, k)
    codes = jnp.pad(codes, ((0, n_pad - n), (0, k_pad - k))).astype(jnp.uint16)
    codes = codes.reshape(n_pad, k_pad // k_group, _CODES_PER_LANE, lanes)
    packed = functools.reduce(
        jnp.bitwise_or,
        [
            ((codes[:, :, q, :] >> np.uint16(i)) & np.uint16(1)) << np.uint16(pos)
            for q, positions in enumerate(_LANE_BITS)
            for i, pos in enumerate(positions)
        ],
    )
    packed = packed.transpose(1, 0, 2)  # [K_pad / k_group, N_pad, lanes]

    s = jnp.pad(s, ((0, n_pad - n), (0, (k_pad - k) // _BLOCK)))
    s = scales_from_rows(s.reshape(n_pad, k_pad // k_group, k_group // _BLOCK).transpose(1, 0, 2))
    ts = jnp.asarray(tensor_scale, jnp.float32).reshape(1)
    return PreparedWeight(packed, s, ts)


def scale_rows(scales: jax.Array) -> jax.Array:
    """Prepared ``scales [..., K_pad/kg, N_pad/16, kg]`` as ``[..., K_pad/kg, N_pad,
    kg/16]``: per k-group, one row of the k-group's block scales per feature (a view of the
    same memory order)."""
    if scales.ndim < 3 or scales.shape[-1] % _BLOCK:
        raise ValueError(
            f"scales must be prepared [..., K_pad/kg, N_pad/16, kg], got {list(scales.shape)}"
        )
    *lead, groups, bands, width = scales.shape
    return scales.reshape(*lead, groups, bands * _BLOCK, width // _BLOCK)


def scales_from_rows(rows: jax.Array) -> jax.Array:
    """Inverse of :func:`scale_rows`: ``[..., K_pad/kg, N_pad, kg/16]`` (N_pad a multiple
    of 16) -> ``[..., K_pad/kg, N_pad/16, kg]``."""
    if rows.ndim < 3 or rows.shape[-2] % _BLOCK:
        raise ValueError(
            f"rows must be [..., K_pad/kg, N_pad, kg/16] with N_pad a multiple of 16, got"
            f" {list(rows.shape)}"
        )
    *lead, groups, n_pad, blocks = rows.shape
    return rows.reshape(*lead, groups, n_pad // _BLOCK, _BLOCK * blocks)


def compact_scales(data: jax.Array, scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Canonical ``data`` uint8 ``[N, K/2]`` and E4M3 ``scales [N, K/16]`` -> the same
    weight with compact one-byte scales: ``(data', bytes)``, bytes uint8 ``[N, K/16]``.

    Byte ``E << 3 | m`` stands for ``2^(E - 9) * (1 + m/8)``: E in 0..17 spans every
    nonzero E4M3 magnitude (2^-9 .. 448, subnormals normalized), so the kernel makes the
    bf16 (f16) scale times ``2^e`` with one shift and one add: ``byte << 4`` (``<< 7``)
    plus the biased exponent of ``2^(e - 9)`` (see :func:`_widen_compact`). A scale's
    sign and its zeros and NaNs go into the codes, keeping every product exact: a block
    whose scale is negative has its codes' signs flipped; a zero scale keeps byte 0
    (2^-9) with its codes zeroed; a NaN scale becomes byte 18 << 3 (which widens to
    +inf in the fast decode) with its codes zeroed, so each product is 0 * inf = NaN.
    """
    if data.dtype != jnp.uint8 or scales.dtype != jnp.float8_e4m3fn:
        raise TypeError(
            f"data must be uint8 and scales float8_e4m3fn, got {data.dtype} and {scales.dtype}"
        )
    if data.ndim < 1 or scales.shape != (*data.shape[:-1], 2 * data.shape[-1] // _BLOCK):
        raise ValueError(
            f"scales must be [..., N, K/16] for data [..., N, K/2], got {list(scales.shape)}"
            f" for data {list(data.shape)}"
        )
    s = scales.astype(jnp.float32)
    bits = lax.bitcast_convert_type(jnp.abs(s), jnp.uint32)
    # f32 exponent field F, mantissa m: E = F - 127 + 9.
    compact = (bits >> 20) - np.uint32((127 - _COMPACT_BIAS) << 3)
    nan = jnp.isnan(s)
    compact = jnp.where(s == 0, 0, jnp.where(nan, _COMPACT_INF, compact)).astype(jnp.uint8)
    per_byte = lambda mask: jnp.repeat(mask, _BLOCK // 2, axis=-1)
    data = jnp.where(per_byte((s == 0) | nan), np.uint8(0), data)
    data = jnp.where(per_byte(s < 0), data ^ np.uint8(0x88), data)  # both codes' sign bits
    return data, compact


def _compact_widening(dtype, exp: int) -> tuple[int, int, bool]:
    """``(shift, add, nan_is_inf)`` of widening compact scale bytes to ``dtype`` scales
    times ``2**exp``: ``(byte << shift) + add`` is the bit pattern; ``nan_is_inf``: the NaN
    marker (E = 18) lands on the all-ones exponent field, +inf, without a select."""
    info = jnp.finfo(dtype)
    bias = 1 - info.minexp
    base = bias - _COMPACT_BIAS + exp
    return info.nmant - 3, base << info.nmant, base + (_COMPACT_INF >> 3) == 2 * bias + 1


def _widen_compact(b: jax.Array, dtype, exp: int) -> jax.Array:
    """Compact scale bytes ``b`` -> ``dtype`` scales times ``2**exp`` (exact).

    ``b << (mantissa bits - 3)`` puts E into the exponent field and m atop the mantissa;
    adding the biased exponent of ``2^(exp - 9)`` rebases E. With the fast decode's
    ``exp`` the NaN marker (E = 18) lands on the all-ones exponent field, +inf; other
    exponents need a select for it.
    """
    shift, add, nan_is_inf = _compact_widening(dtype, exp)
    b16 = b.astype(jnp.uint16)
    bits = (b16 << np.uint16(shift)) + np.uint16(add)
    if not nan_is_inf:
        inf_bits = np.uint16(np.array(np.inf, dtype).view(np.uint16))
        bits = jnp.where(b16 == np.uint16(_COMPACT_INF), inf_bits, bits)
    return lax.bitcast_convert_type(bits, dtype)


# -----------------------------------------------------------------------------
# In-kernel decode (shared by both A-operand paths)
# -----------------------------------------------------------------------------


def _decode_quarter(lanes: jax.Array, q: int, dtype) -> jax.Array:
    """Decodes quarter ``q`` of prepared uint16 ``lanes [R, C]`` into ``dtype [R, C]``.

    Exact for every code and free of subnormals (so XLA:CPU's flush-to-zero
    does not matter). With ``em`` the 3-bit magnitude code and ``s`` the
    mantissa width minus one (6 for bf16, 9 for f16), ``(em << s) + bits(0.5)``
    is the bit pattern of ``2^(e-1) * (1 + m/2)``, the E2M1 value of every
    ``em >= 2``; ``em`` in {0, 1} (0 and the E2M1 subnormal 0.5) are selected.
    The code's sign bit (bit 3) moves to bit 15.
    """
    mant_shift = jnp.finfo(dtype).nmant - 1
    half = np.uint16(np.array(0.5, dtype).view(np.uint16))
    code = functools.reduce(
        jnp.bitwise_or,
        [
            ((lanes >> np.uint16(pos)) & np.uint16(1)) << np.uint16(i)
            for i, pos in enumerate(_LANE_BITS[q])
        ],
    )
    em = code & np.uint16(7)
    normal = (em << np.uint16(mant_shift)) + half
    subnormal = jnp.where(em == 0, np.uint16(0), half)
    bits = jnp.where(em < 2, subnormal, normal)
    bits = bits | ((code & np.uint16(8)) << np.uint16(12))
    return lax.bitcast_convert_type(bits, dtype)


def _fast_decode_plan(dtype) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per quarter, the ``(shift, mask)`` terms of the fast decode of a 32-bit register.

    The OR over the terms of ``(r << shift) & mask`` (a right shift for negative
    ``shift``) places the quarter's code of both uint16 lanes of ``r`` as ``sign << 15 |
    em << s`` (``s`` = mantissa bits - 1). The code bits that move by the same amount
    share one term. With :data:`_LANE_BITS` and ptxas fusing each AND into the OR that
    follows (LOP3), that is 11 integer ops per register (eight weights) for bf16
    (quarters 1 and 2: one term each, quarter 2 needs no shift; quarters 0 and 3: two
    terms), against 15 for one nibble per quarter, and 14 for f16. Left shifts become
    ``IMAD.SHL`` (FMA pipe), right shifts ``SHF`` and the ANDs/ORs ``LOP3`` (integer ALU
    pipe, the busier one): bf16 takes 7 ALU ops and 4 ``IMAD.SHL``. Shifts move both
    lanes alike; the masks keep only each lane's own target bits, whose sources lie in
    the same lane.
    """
    mant_shift = jnp.finfo(dtype).nmant - 1
    targets = (mant_shift, mant_shift + 1, mant_shift + 2, 15)
    plan = []
    for positions in _LANE_BITS:
        by_shift: dict[int, int] = {}
        for src, dst in zip(positions, targets):
            by_shift[dst - src] = by_shift.get(dst - src, 0) | 1 << dst
        plan.append(tuple((amount, mask * 0x10001) for amount, mask in sorted(by_shift.items())))
    return tuple(plan)


def _i32(value: int):
    """An i32 MLIR constant; values from 2^31 to 2^32 - 1 stand for their bit pattern."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith

    i32 = ir.IntegerType.get_signless(32)
    return arith.constant(i32, ir.IntegerAttr.get(i32, value - (value >> 31 << 32)))


def _shift_left(x, amount: int):
    """``x << amount`` for an i32 MLIR value (the fast decode's left shifts).

    ptxas turns ``shl.b32`` into ``IMAD.SHL`` on the FMA pipe, which also runs the scale
    multiplies; ``benchmarks/ab_decode.py`` times the alternatives (funnel shifts, ``SHF``
    on the integer ALU pipe, measured 3-9% slower).
    """
    from jax._src.lib.mlir.dialects import arith

    return arith.shli(x, _i32(amount))


def _shift_add(x, shift: int, add: int):
    """``(x << shift) + add`` for an i32 MLIR value (widening two compact scales at once).

    ptxas makes it one ``LEA`` (integer ALU pipe); ``benchmarks/ab_decode.py`` times the
    alternatives.
    """
    from jax._src.lib.mlir.dialects import arith

    return arith.addi(arith.shli(x, _i32(shift)), _i32(add))


class _Fold(NamedTuple):
    """Where a compute warpgroup's rows lie in a K-folded step (``GemmConfig.k_fold``):
    the step's SMEM tiles are ``[k_fold, groups, tile_n, ...]`` (K part, k-group of the
    step, feature), and folded row ``wg * rows + r`` is feature ``(...) % tile_n`` of
    part ``(...) // tile_n``."""

    k_fold: int
    groups: int  # k-groups per step
    tile_n: int  # features per CTA
    rows: int  # rows per compute warpgroup
    group: int  # the k-group of the step being decoded

    def physical_row(self, row):
        """i32 MLIR value: the row of the SMEM tile ``[k_fold * groups * tile_n, ...]``
        that holds warpgroup-local row ``row`` (an i32 value) of k-group ``group``."""
        from jax._src.lib.mlir.dialects import arith
        from jax.experimental.mosaic.gpu import utils as mgpu_utils

        const = _i32
        wg = arith.shrui(mgpu_utils.thread_idx(), const(7))  # compute warpgroup index
        folded = arith.addi(arith.muli(wg, const(self.rows)), row)
        part = arith.divui(folded, const(self.tile_n))
        feature = arith.remui(folded, const(self.tile_n))
        block = arith.addi(arith.muli(part, const(self.groups)), const(self.group))
        return arith.addi(arith.muli(block, const(self.tile_n)), feature)


def _decode_scaled_fast(lanes, bands, dtype, fold: _Fold | None = None) -> tuple[jax.Array, ...]:
    """GPU-only decode and scaling of one k-group of a compute warpgroup.

    ``lanes``: prepared uint16 ``[R, kg/4]`` (WGMMA layout, R = 64 or 128 rows);
    ``bands``: the SMEM ref of the same rows' block scales in the prepared layout,
    ``[R/16, kg]`` (row ``r``'s ``kg/16`` scales at ``[r // 16, (r % 16) * kg/16 :]``),
    compact uint8 or widened ``dtype``. Returns the four quarters, ``dtype [R, kg/4]``
    (WGMMA layout), each weight times its block scale times ``2**scale_exponent(dtype)``.

    K-folded (``fold``): ``lanes`` is the step's SMEM ref of codes ``[k_fold, groups,
    tile_n, kg/4]`` (swizzled like every code tile) and ``bands`` that of its scales
    ``[k_fold, groups, tile_n/16, kg]``; each thread loads its registers of the
    warpgroup's rows itself (:meth:`_Fold.physical_row`, the swizzle by hand), as
    the rows of two K parts do not form one tiled ``[R, kg/4]`` view.

    Codes: whole 32-bit registers (two uint16 lanes, eight codes) with the shifts and
    masks of :func:`_fast_decode_plan`, under 1.5 integer ops per bf16 weight. Each code
    is placed as ``sign << 15 | em << s`` (``s`` = mantissa bits - 1), the E2M1 value times
    ``2^(1 - exponent_bias)``: codes 2..7 become normal numbers and code 1 (0.5) the
    subnormal ``2^-exponent_bias``; times the scale pre-multiplied by
    ``2^scale_exponent`` the products are the exact normal numbers ``v * s * 2^-7`` (the
    GPU's bf16/f16 multiply keeps subnormal inputs); the epilogue multiplies by 2^7.

    Scales: a thread of the WGMMA layout holds rows ``64 a + 16 warp + 8 h + lane / 4``
    (a < R/64, h < 2); it fetches the ``kg/16`` scales of each such row with one vector
    load (4-32 bytes); compact bytes are widened two at a time (one ``prmt`` puts bytes 0
    and 2, or 1 and 3, of a word into the two 16-bit halves, one shift-and-add widens both),
    and each bf16x2/f16x2 multiply applies one half to two weights through its operand
    selector (``.H0_H0`` / ``.H1_H1``, which ptxas folds from a ``mov`` splat): about one
    instruction per scale, against two with a ``prmt`` splat per scale. The
    register of columns ``8 b .. 8 b + 7`` of quarter ``q`` belongs to scale block ``q *
    kg/64 + b / 2``. Not interpretable (uses ``plgpu.inline_mgpu``).
    """
    # Imported lazily: only the GPU lowering needs the MLIR bindings.
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    if fold is None:
        rows, lanes_per_quarter = lanes.shape
    else:
        rows, lanes_per_quarter = fold.rows, lanes.shape[-1]
    k_group = lanes_per_quarter * _CODES_PER_LANE
    blocks = k_group // _BLOCK  # scales per row and k-group
    compact = bands.dtype == jnp.uint8
    if not compact and bands.dtype != dtype:
        raise ValueError(f"widened scales must be {dtype}, got {bands.dtype}")
    row_words = blocks * bands.dtype.itemsize // 4  # 32-bit words of one row's scales
    plan = _fast_decode_plan(dtype)
    layout = plgpu.Layout.WGMMA
    ret = plgpu.ShapeDtypeStruct((rows, lanes_per_quarter), dtype, layout)
    # registers [R/64, kg/32, 1, 1, 2, 1, 1, 1, 1]: (a, b, ..., h, ...), two columns each
    reg_shape = (rows // 64, lanes_per_quarter // 8, 1, 1, 2, 1, 1, 1, 1)
    code_type = layout if fold is None else plgpu.RefType(_swizzle_transforms(lanes_per_quarter, jnp.uint16))

    @plgpu.inline_mgpu(arg_types=(code_type, plgpu.RefType()), return_type=(ret,) * _CODES_PER_LANE)
    def decode(_, w, s_ref):
        i32 = ir.IntegerType.get_signless(32)
        i64 = ir.IntegerType.get_signless(64)
        const = _i32
        if fold is None and w.registers.shape != reg_shape:
            raise NotImplementedError(f"unexpected WGMMA registers {w.registers.shape}")
        pair_ty = ir.VectorType.get((2,), mgpu_utils.dtype_to_ir_type(dtype))

        # One row's scales: `row_words` words, loaded in chunks of at most 16 bytes.
        chunk = min(row_words, 4)
        chunk_ty = ir.VectorType.get((chunk,), i32)
        base_ptr = mgpu_utils.memref_ptr(s_ref)
        tid = mgpu_utils.thread_idx()
        warp_row = arith.shli(arith.andi(arith.shrui(tid, const(5)), const(3)), const(4))
        lane_row = arith.andi(arith.shrui(tid, const(2)), const(7))
        thread_row = arith.addi(warp_row, lane_row)  # 16 warp + lane / 4
        zero = const(0)
        if compact:  # on both 16-bit halves of a register at once
            shift, add, nan_is_inf = _compact_widening(dtype, scale_exponent(dtype))
            assert nan_is_inf, dtype
            add *= 0x10001

        def splat(x, half):  # half `half` of x into both halves
            # ptxas folds this into the multiply's operand selector (.H0_H0 / .H1_H1):
            # no instruction, unlike a prmt splat.
            pick = "{l, l}" if half == 0 else "{h, h}"
            ptx = f"{{ .reg .b16 l, h; mov.b32 {{l, h}}, $1; mov.b32 $0, {pick}; }}"
            return mgpu_utils.bitcast(mgpu_utils.inline_ptx(ptx, x, result_types=i32), pair_ty)

        row_of = (lambda r: r) if fold is None else fold.physical_row
        # (a, h) -> the SMEM row (of the scale bands; K-folded: also of the codes) of this
        # thread's rows 64 a + 8 h + thread_row
        phys = {
            (a, h): row_of(arith.addi(thread_row, const(64 * a + 8 * h)))
            for a in range(rows // 64)
            for h in range(2)
        }
        splats = {}  # (a, h) -> [scale pair of block j]
        for a in range(rows // 64):
            for h in range(2):
                row = phys[a, h]
                words = []
                for c in range(row_words // chunk):
                    idx = arith.addi(arith.muli(row, const(row_words // chunk)), const(c))
                    ptr = mgpu_utils.getelementptr(base_ptr, [arith.extui(i64, idx)], chunk_ty)
                    vec = llvm.load(chunk_ty, ptr)
                    words += [
                        llvm.extractelement(vec, arith.constant(i32, e)) for e in range(chunk)
                    ]
                pairs = []
                for word in words:
                    if compact:  # bytes (0, 2) and (1, 3) into the halves, widened two at once
                        even, odd = (
                            _shift_add(mgpu_utils.prmt(word, zero, const(sel)), shift, add)
                            for sel in (0x4240, 0x4341)
                        )
                        pairs += [splat(even, 0), splat(odd, 0), splat(even, 1), splat(odd, 1)]
                    else:  # two widened scales per word
                        pairs += [splat(word, 0), splat(word, 1)]
                splats[a, h] = pairs

        def term(x, amount, mask):
            if amount > 0:
                x = _shift_left(x, amount)
            elif amount < 0:
                x = arith.shrui(x, const(-amount))
            return arith.andi(x, const(mask))

        if fold is None:
            registers = w.registers
            code_word = lambda idx, reg: mgpu_utils.bitcast(reg, i32)
        else:  # loaded here: the 4-byte column pair (lane % 4) of 16-byte chunk b
            registers = np.empty(reg_shape, dtype=object)
            code_ptr = mgpu_utils.memref_ptr(w)
            row_bytes = lanes_per_quarter * 2  # = the swizzle width
            lane_byte = arith.shli(arith.andi(tid, const(3)), const(2))

            def code_word(idx, _):
                a, b, h = idx[0], idx[1], idx[4]
                p = phys[a, h]
                # swizzle: chunk b of a row moves to b ^ ((row offset >> 7) % (width / 16))
                xor = arith.andi(
                    arith.shrui(arith.muli(p, const(row_bytes)), const(7)),
                    const(row_bytes // 16 - 1),
                )
                chunk = arith.xori(xor, const(b))
                offset = arith.addi(
                    arith.muli(p, const(row_bytes)),
                    arith.addi(arith.shli(chunk, const(4)), lane_byte),
                )
                ptr = mgpu_utils.getelementptr(
                    code_ptr, [arith.extui(i64, offset)], ir.IntegerType.get_signless(8)
                )
                return llvm.load(i32, ptr)

        outs = [np.empty(reg_shape, dtype=object) for _ in range(_CODES_PER_LANE)]
        for idx, reg in np.ndenumerate(registers):
            a, b, h = idx[0], idx[1], idx[4]
            r = code_word(idx, reg)
            for q, terms in enumerate(plan):
                bits = functools.reduce(arith.ori, [term(r, amt, mask) for amt, mask in terms])
                scale = splats[a, h][q * (blocks // _CODES_PER_LANE) + b // 2]
                outs[q][idx] = arith.mulf(mgpu_utils.bitcast(bits, pair_ty), scale)
        return tuple(
            fa.FragmentedArray(_registers=o, _layout=fa.WGMMA_LAYOUT, _is_signed=None)
            for o in outs
        )

    return decode(lanes, bands)


def _fold_sum_fast(red, out, ts, bias, *, k_fold: int, scale: np.float32) -> None:
    """GPU-only K-fold epilogue of the first compute warpgroup (``GemmConfig.k_fold``).

    ``red``: SMEM f32 ``[wgs, tile_m, rows]``, each compute warpgroup's accumulator
    transposed (x row ``t``, folded row ``r`` of that warpgroup); ``out``: SMEM ``[tile_m
    / k_fold, tile_n]`` (bf16/f16); ``ts``: GMEM f32 ``[1]``; ``bias``: None or an SMEM
    ``[tile_n]`` ref. Writes ``out[m, f] = (sum over q of red[w, m * k_fold + q, c] *
    scale) * ts + bias[f]`` for K part ``q`` held by warpgroup ``w`` at column ``c``,
    adding the parts in order. Each thread computes outputs ``tid, tid + 128, ...``
    (clamped to the last one: a repeated output is stored twice with one value).
    """
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    _, tile_m, rows = red.shape
    out_rows, tile_n = out.shape
    parts = rows // tile_n  # K parts per warpgroup
    total = out_rows * tile_n
    refs = (red, out, ts) + (() if bias is None else (bias,))

    @plgpu.inline_mgpu(arg_types=tuple(plgpu.RefType() for _ in refs))
    def fold_sum(_, red_ref, out_ref, ts_ref, *bias_ref):
        i64 = ir.IntegerType.get_signless(64)
        f32 = ir.F32Type.get()
        const = _i32

        def load(ref, index, ty):
            ptr = mgpu_utils.memref_ptr(ref)
            return llvm.load(ty, mgpu_utils.getelementptr(ptr, [arith.extui(i64, index)], ty))

        out_ty = mgpu_utils.dtype_to_ir_type(out.dtype)
        ts_val = load(ts_ref, const(0), f32)
        tid = arith.andi(mgpu_utils.thread_idx(), const(127))
        for i in range(-(-total // 128)):
            idx = arith.minui(arith.addi(tid, const(128 * i)), const(total - 1))
            m = arith.divui(idx, const(tile_n))
            f = arith.remui(idx, const(tile_n))
            acc = None
            for q in range(k_fold):
                row = arith.addi(arith.muli(m, const(k_fold)), const(q))
                col = arith.addi(f, const((q % parts) * tile_n))
                base = const((q // parts) * tile_m * rows)
                v = load(red_ref, arith.addi(base, arith.addi(arith.muli(row, const(rows)), col)), f32)
                acc = v if acc is None else arith.addf(acc, v)
            acc = arith.mulf(arith.mulf(acc, arith.constant(f32, float(scale))), ts_val)
            if bias_ref:
                b = load(bias_ref[0], f, mgpu_utils.dtype_to_ir_type(bias.dtype))
                if bias.dtype != jnp.float32:
                    b = arith.extf(f32, b)
                acc = arith.addf(acc, b)
            ptr = mgpu_utils.getelementptr(mgpu_utils.memref_ptr(out_ref), [arith.extui(i64, idx)], out_ty)
            llvm.store(arith.truncf(out_ty, acc), ptr)

    fold_sum(*refs)


# Whether the x tile of one-wgmma-per-k-group configs (GemmConfig.use_group_wgmma) is swizzled
# at the k-group's width (128-byte TMA rows) rather than a quarter's (32-64 bytes): 0-5% faster
# at M = 64-256 on the H200 (benchmarks/ab_decode.py "narrow x" turns it off).
_WIDE_X_ROWS = True


def _x_transforms(cfg: GemmConfig, k_group: int, k: int, dtype) -> tuple:
    """SMEM transforms of the x tile (``k`` columns in GMEM): swizzled at the width of the
    column slices its wgmmas read, a k-group with ``group_wgmma`` (128 bytes for k-groups of
    64 elements and more) where ``k`` is a multiple of that width (TMA of a tiled view), else
    a quarter (``k_group / 4`` elements) (or always, :data:`_WIDE_X_ROWS` off). On the
    H200 they measured 0-5% faster at M = 64-256 and equal at M = 16
    (``ab_decode-2026-12-03.md`` section 4)."""
    narrow = _swizzle_transforms(k_group // _CODES_PER_LANE, dtype)
    if not (cfg.use_group_wgmma and _WIDE_X_ROWS):
        return narrow
    wide = _swizzle_transforms(k_group, dtype)
    return wide if k % wide[0].tiling[-1] == 0 else narrow


def _swizzle_transforms(minor_elems: int, dtype) -> tuple:
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor_elems * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


# -----------------------------------------------------------------------------
# The kernel
# -----------------------------------------------------------------------------


def _gemm_kernel(
    data_gmem,
    scales_gmem,
    x_gmem,
    ts_gmem,
    bias_gmem,
    tile_expert_gmem,  # inputs
    out_gmem,  # output
    a_smem,
    o_smem,
    bias_smem,
    bias_barrier,
    red_smem,
    red_barrier,
    fold_smem,
    fold_barrier,  # scratch
    *,
    cfg: GemmConfig,
    tile_m: int,
    k_group: int,
    k_steps: int,
    dtype,
    fused_epilogue: bool,
    stream: StreamK | None,
):
    """One CTA: output tile (n, m) over the K range of split s; with ``stream``, CTA n's
    run of (tile, K step) units of token tile m.

    Grouped (``tile_expert_gmem`` given): the weights are stacked per expert
    (``data [E, ...]``, ``scales [E, ...]``, ``ts [E]``) and token tile ``m``
    multiplies expert ``tile_expert[m]``; a tile with expert -1 does nothing.

    Warp-specialized: the last warpgroup issues the TMA copies of a
    ``cfg.stages``-deep pipeline; each compute warpgroup owns ``rows`` output
    features and, per k-group of a step, decodes its four quarters into
    registers, issues four ``[rows, 16] x [16, tile_m]`` wgmmas and waits.

    GMEM refs: data uint16 [(E,) K_pad/kg, N_pad, kg/4]; scales [(E,) K_pad/kg,
    N_pad/16, kg]; x [M, K]; ts f32 [1] or [E]; bias [N_pad] or None; tile_expert
    int32 [m_tiles] or None; out [M, N_out]
    (``fused_epilogue``), f32 partial sums [split_k, M, N_out], or (stream-K) f32
    partial sums [ctas * max_tiles, M, tile_n] in the slots of :class:`StreamK`.

    Cluster split-K (``red_smem`` given): split ``s > 0`` sends its f32 ``[rows,
    tile_m]`` accumulator into slot ``s - 1`` of split 0's ``red_smem [split_k - 1,
    wgs, rows, tile_m]``; split 0 waits on ``red_barrier`` (one per warpgroup), adds
    the slots in order and runs the fused epilogue.

    K-folded (``cfg.k_fold > 1``): data, scales and x come as the views of
    :func:`_launch` (``[k_fold, ...]`` weights, x ``[M * k_fold, K / k_fold]``); every
    compute warpgroup hands its f32 accumulator to the first through ``fold_smem
    [wgs, tile_m, rows]`` (``fold_barrier`` counts them), which adds the matching
    (part, part) blocks into ``o_smem [tile_m / k_fold, tile_n]`` and stores it.
    """
    num_wgs, rows = cfg.num_compute_wgs, cfg.wg_rows
    fold = cfg.k_fold
    lanes = k_group // _CODES_PER_LANE  # columns of one quarter
    groups_per_step = cfg.tile_k // k_group
    blocks_per_quarter = lanes // _BLOCK
    fast = cfg.use_fast_decode

    with jax.named_scope("setup"):  # an event at the CTA's start
        n_idx = lax.axis_index("n")
        m_idx = lax.axis_index("m")
        s_idx = lax.axis_index("s")
        wg = lax.axis_index("wg")
    row_slice = pl.ds(wg * rows, rows)
    if stream is None:
        k0 = s_idx * k_steps  # first pipeline step of this split
        step_of = lambda j: k0 + j
        tile_of = lambda j: n_idx
    else:
        u0, u1 = stream.run(n_idx)
        step_of = lambda j: lax.rem(u0 + j, stream.tile_steps)
        tile_of = lambda j: lax.div(u0 + j, stream.tile_steps)

    data_block = (groups_per_step, cfg.tile_n, lanes)
    if fast:  # the prepared layout: [K_pad/kg, N_pad/16, kg]
        scales_block = (groups_per_step, cfg.tile_n // _BLOCK, k_group)
    else:  # block-major [K_pad/16, N_pad] (see block_major_scales)
        scales_block = (cfg.tile_k // _BLOCK, cfg.tile_n)
    if tile_expert_gmem is None:
        expert = None
        data_index = lambda k: (step_of(k), tile_of(k), 0)
        scales_index = data_index if fast else lambda k: (step_of(k), tile_of(k))
    else:  # a squeezed leading expert dimension
        expert = tile_expert_gmem[m_idx]
        data_block, scales_block = (None, *data_block), (None, *scales_block)
        data_index = lambda k: (expert, step_of(k), n_idx, 0)
        scales_index = data_index if fast else lambda k: (expert, step_of(k), n_idx)
    if fold > 1:  # a leading K-part dimension, loaded whole
        data_block, scales_block = (fold, *data_block), (fold, *scales_block)
        data_index = lambda k: (0, step_of(k), n_idx, 0)
        scales_index = data_index if fast else lambda k: (0, step_of(k), n_idx)
    data_spec = plgpu.BlockSpec(
        data_block, data_index, transforms=_swizzle_transforms(lanes, jnp.uint16)
    )
    scales_spec = plgpu.BlockSpec(scales_block, scales_index)
    x_spec = plgpu.BlockSpec(
        (tile_m, cfg.tile_k),
        lambda k: (m_idx, step_of(k)),
        transforms=_x_transforms(cfg, k_group, x_gmem.shape[-1], dtype),
    )

    def stacked_parts(ref, *index):
        """(Interpreter only, K-folded) this warpgroup's K parts of ``ref[part, *index]``,
        stacked along their rows."""
        parts = rows // cfg.tile_n
        return jnp.concatenate([ref[wg * parts + i, *index] for i in range(parts)])

    def block_scale(s_smem, block):
        """Portable decode: the scales of one scale block of the step (block-major SMEM
        tile) as a dtype [rows, 16] WGMMA-layout tile."""
        if fold > 1:
            s = stacked_parts(s_smem, block)
        else:
            s = plgpu.load(s_smem.at[block, row_slice], layout=plgpu.Layout.WGMMA.reduce(1))
        if s.dtype == jnp.uint8:
            s = _widen_compact(s, dtype, 0)
        else:  # widened scales are stored times 2^scale_exponent: undone exactly
            s = s.astype(jnp.float32) * np.float32(2.0 ** -scale_exponent(s.dtype))
            s = s.astype(dtype)
        s = lax.broadcast_in_dim(s, (rows, _BLOCK), (0,))
        return plgpu.layout_cast(s, plgpu.Layout.WGMMA)

    def decode_group(w_smem, s_smem, g):
        """Dequantized k-group ``g`` of this step: 4 x dtype [rows, lanes] (WGMMA)."""
        if fold > 1 and fast:  # the decode loads the rows of the warpgroup's K parts
            where = _Fold(fold, groups_per_step, cfg.tile_n, rows, g)
            return _decode_scaled_fast(w_smem, s_smem, dtype, where)
        if fold > 1:
            w = stacked_parts(w_smem, g)
        else:
            w = w_smem[g, row_slice, :]
        if fast:  # this warpgroup's rows of the k-group's scales: [rows/16, kg]
            bands = s_smem.at[g, pl.ds(wg * (rows // _BLOCK), rows // _BLOCK)]
            return _decode_scaled_fast(w, bands, dtype)
        out = []
        for q in range(_CODES_PER_LANE):
            a = _decode_quarter(w, q, dtype)
            first = (g * _CODES_PER_LANE + q) * blocks_per_quarter
            parts = [
                a[:, b * _BLOCK : (b + 1) * _BLOCK] * block_scale(s_smem, first + b)
                for b in range(blocks_per_quarter)
            ]
            out.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1))
        return out

    @jax.named_scope("step")  # (named scopes: events of benchmarks/trace_matmul.py)
    def mma_body(idx, w_smem, s_smem, x_smem, acc_ref):
        if stream is not None:  # the run enters another tile: store the running sum
            enters = (idx[0] > 0) & (step_of(idx[0]) == 0)
            slot = stream.max_tiles * n_idx + tile_of(idx[0]) - tile_of(0) - 1
            # (not awaited: the pipeline goes on; the next store waits for it)
            pl.when(enters)(lambda: store(acc_ref[...], slot=slot, wait=False))

        for g in range(groups_per_step):
            # The whole k-group is decoded before its wgmmas are issued. Without
            # overlap_decode they are awaited before the next k-group is decoded;
            # with it, ptxas keeps the register operands of in-flight wgmmas live
            # until the step's single wait. Keeping them in flight across steps
            # instead gave wrong results (prefill-2026-11-23.md). The other compute
            # warpgroups keep the tensor cores busy meanwhile.
            quarters = decode_group(w_smem, s_smem, g)
            if cfg.use_group_wgmma:  # the quarters side by side: k-group g's columns of x
                a = jnp.concatenate(quarters, axis=1)
                plgpu.wgmma(acc_ref, a, x_smem.at[:, pl.ds(g * k_group, k_group)].T)
            else:
                for q, a in enumerate(quarters):
                    quarter = g * _CODES_PER_LANE + q
                    x_t = x_smem.at[:, pl.ds(quarter * lanes, lanes)].T
                    if cfg.a_operand == "smem":
                        a_ref = a_smem.at[wg, q]
                        a_ref[...] = a
                        plgpu.commit_smem()
                        plgpu.wgmma(acc_ref, a_ref, x_t)
                    else:
                        plgpu.wgmma(acc_ref, a, x_t)
            if not cfg.use_overlap_decode:
                plgpu.wgmma_wait(0)
        if cfg.use_overlap_decode:
            plgpu.wgmma_wait(0)
        return acc_ref

    @jax.named_scope("epilogue")
    def epilogue(acc):
        if fold > 1:
            fold_epilogue(acc)
            return
        if stream is not None:  # the running sum over all tiles of the run
            store(acc, slot=stream.max_tiles * n_idx + tile_of(u1 - u0 - 1) - tile_of(0))
            return
        if red_smem is None:
            store(acc)
            return

        @pl.when(s_idx > 0)
        def _send():
            plgpu.async_store_smem(
                acc, red_smem.at[s_idx - 1, wg], red_barrier.at[wg], cluster_idx=0, cluster_dim="s"
            )

        @pl.when(s_idx == 0)
        def _reduce():
            plgpu.barrier_wait(red_barrier.at[wg])
            total = acc
            for j in range(cfg.split_k - 1):
                total = total + red_smem[j, wg]
            store(total)

    def fold_epilogue(acc):
        """Adds the K parts: output ``[m, f]`` is the sum over parts ``q`` of folded row
        ``q * tile_n + f`` against x row ``m * k_fold + q``, in the order of ``q``."""
        fold_smem.at[wg].T[...] = plgpu.layout_cast(acc, plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.barrier_arrive(fold_barrier)  # (each thread's stores are released)

        @pl.when(wg == 0)
        def _():
            plgpu.barrier_wait(fold_barrier)
            bias = None
            if bias_gmem is not None:
                plgpu.barrier_wait(bias_barrier.at[0])
                bias = bias_smem.at[0, pl.ds(0, cfg.tile_n)]
            scale = np.float32(2.0**_FAST_SHIFT if fast else 1.0)
            if fast:
                _fold_sum_fast(fold_smem, o_smem, ts_gmem, bias, k_fold=fold, scale=scale)
            else:  # (interpreter only) plain jnp on the whole tile
                red = fold_smem[...]
                parts = rows // cfg.tile_n
                total = None
                for q in range(fold):
                    cols = slice((q % parts) * cfg.tile_n, (q % parts + 1) * cfg.tile_n)
                    block = red[q // parts, q::fold, cols]
                    total = block if total is None else total + block
                total = total * scale * ts_gmem[0]
                if bias is not None:
                    total = total + bias[...].astype(jnp.float32)[None, :]
                o_smem[...] = total.astype(o_smem.dtype)
            plgpu.commit_smem()
            out_rows = o_smem.shape[0]
            plgpu.copy_smem_to_gmem(
                o_smem,
                out_gmem.at[pl.ds(m_idx * out_rows, out_rows), pl.ds(n_idx * cfg.tile_n, cfg.tile_n)],
            )
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def store(acc, slot=None, wait=True):
        """acc: f32 [rows, tile_m] (WGMMA layout) -> transposed TMA store (stream-K:
        into partial-sum slot ``slot``); with ``wait``, the copy's SMEM reads are awaited
        (its GMEM writes are complete when the kernel ends, as in CUTLASS's epilogues)."""
        n0 = n_idx * cfg.tile_n + wg * rows
        if fast:
            acc = acc * np.float32(2.0**_FAST_SHIFT)
        if fused_epilogue:
            acc = acc * ts_gmem[0 if expert is None else expert]
            if bias_gmem is not None:
                plgpu.barrier_wait(bias_barrier.at[wg])
                bias = plgpu.load(bias_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                bias = lax.broadcast_in_dim(bias.astype(jnp.float32), acc.shape, (0,))
                acc = acc + plgpu.layout_cast(bias, plgpu.Layout.WGMMA)
            dst = out_gmem.at[pl.ds(m_idx * tile_m, tile_m), pl.ds(n0, rows)]
        elif stream is not None:
            dst = out_gmem.at[slot, pl.ds(m_idx * tile_m, tile_m), pl.ds(wg * rows, rows)]
        else:
            dst = out_gmem.at[s_idx, pl.ds(m_idx * tile_m, tile_m), pl.ds(n0, rows)]
        o_ref = o_smem.at[wg]
        chunk = o_smem.shape[1]  # tokens staged per TMA store (f32 partials: at most 64)
        for start in range(0, tile_m, chunk):
            if stream is not None or start:  # an earlier store may still read o_smem
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            size = min(chunk, tile_m - start)
            part = acc if size == tile_m else acc[:, start : start + size]
            o_part = o_ref if size == chunk else o_ref.at[pl.ds(0, size)]
            o_part.T[...] = plgpu.layout_cast(
                part.astype(o_smem.dtype), plgpu.Layout.WGMMA_TRANSPOSED
            )
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_part, dst.at[pl.ds(start, size)])
        if wait:  # the CTA's last store: its SMEM must stay until the copy has read it
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def compute_context(eval_pipeline):
        if fold > 1 and bias_gmem is not None:  # the first warpgroup adds the bias

            @pl.when(wg == 0)
            def _():
                plgpu.copy_gmem_to_smem(
                    bias_gmem.at[pl.ds(n_idx * cfg.tile_n, cfg.tile_n)],
                    bias_smem.at[0, pl.ds(0, cfg.tile_n)],
                    bias_barrier.at[0],
                )

        elif fused_epilogue and bias_gmem is not None:  # overlaps with the main loop
            plgpu.copy_gmem_to_smem(
                bias_gmem.at[pl.ds(n_idx * cfg.tile_n + wg * rows, rows)],
                bias_smem.at[wg],
                bias_barrier.at[wg],
            )

        def acc_scope(acc_ref):
            eval_pipeline(acc_ref)
            return acc_ref[...]

        epilogue(pl.run_scoped(acc_scope, plgpu.ACC((rows, tile_m), jnp.float32)))

    def run():
        plgpu.emit_pipeline_warp_specialized(
            mma_body,
            grid=(k_steps,) if stream is None else (u1 - u0,),
            memory_registers=40,
            in_specs=[data_spec, scales_spec, x_spec],
            wg_axis="wg",
            num_compute_wgs=num_wgs,
            max_concurrent_steps=cfg.stages if stream else min(cfg.stages, k_steps),
            compute_context=compute_context,
        )(data_gmem, scales_gmem, x_gmem)

    if expert is None:
        run()
    else:  # unused token tiles (the grid is sized for the worst routing) exit at once
        pl.when(expert >= 0)(run)


def launch_rows(m: int, k_fold: int = 1) -> int:
    """Rows of x a launch for ``m`` tokens runs on: ``m`` padded so that its ``m *
    k_fold`` kernel rows are at most 8 or a multiple of 8 (TMA of (8, .)-tiled views)."""
    _checks.ints_at_least(("m", m, 0))
    if k_fold not in (1, 2, 4):
        raise ValueError(f"k_fold must be 1, 2 or 4, got {k_fold!r}")
    rows = m * k_fold
    return m if rows <= 8 or rows % 8 == 0 else _round_up(m, 8 // k_fold)


def fold_view(a, k_fold: int):
    """The kernel's codes or scales (a jax array or a torch tensor, ``[rows along K, ...]``)
    as the ``[k_fold, rows / k_fold, ...]`` view of a K-folded launch: K part first."""
    if k_fold not in (2, 4) or a.ndim < 2 or a.shape[0] % k_fold:
        raise ValueError(
            f"fold_view needs k_fold 2 or 4 and an array of >= 2 dims whose first splits into"
            f" k_fold parts, got k_fold={k_fold!r} for shape {tuple(a.shape)}"
        )
    return a.reshape(k_fold, a.shape[0] // k_fold, *a.shape[1:])


def _check_scale_itemsize(scale_itemsize) -> int:
    if scale_itemsize not in (1, 2):
        raise ValueError(
            f"scale_itemsize must be 1 or 2 (bytes per block scale), got {scale_itemsize!r}"
        )
    return scale_itemsize


def smem_bytes(cfg: GemmConfig, tile_m: int, dtype=jnp.bfloat16, scale_itemsize: int = 2) -> int:
    """Upper estimate of one CTA's SMEM: pipeline buffers + scratch + barriers, with block
    scales of ``scale_itemsize`` bytes (1: compact, 2: widened)."""
    _check_scale_itemsize(scale_itemsize)
    itemsize = jnp.dtype(dtype).itemsize
    rows = cfg.cta_rows
    stage = (
        rows * cfg.tile_k // 2  # packed codes
        + rows * cfg.tile_k // _BLOCK * scale_itemsize  # block scales
        + tile_m * cfg.tile_k * itemsize
    )  # activations
    out = cfg.tile_n * _out_chunk(cfg, tile_m) * (4 if _stores_partials(cfg) else 2)
    # the SMEM operand holds one k-group (at most tile_k columns)
    a = rows * cfg.tile_k * itemsize if cfg.a_operand == "smem" else 0
    red = (cfg.split_k - 1) * cfg.tile_n * tile_m * 4 if cfg.cluster_reduce else 0
    if cfg.k_fold > 1:  # the f32 accumulators handed to the first warpgroup
        red = rows * tile_m * 4
    return cfg.stages * stage + out + a + red + rows * 4 + 1024


def _out_chunk(cfg: GemmConfig, tile_m: int) -> int:
    """Tokens of the output tile staged in SMEM per TMA store: ``cfg.out_chunk`` (at most
    the tile), else the whole tile, or 64 for f32 partial sums of a 128- or 256-token tile
    (which keeps that tiling's SMEM for the pipeline: 128 KB of f32 for 256 x 128 outputs)."""
    if cfg.out_chunk:
        return min(cfg.out_chunk, tile_m)
    return 64 if _stores_partials(cfg) and tile_m > 64 else tile_m


def _stores_partials(cfg: GemmConfig) -> bool:
    """Whether the kernel stores f32 split-K or stream-K partial sums for XLA to add."""
    return (cfg.split_k > 1 and not cfg.cluster_reduce) or cfg.stream_k > 0


class StreamK(NamedTuple):
    """A stream-K schedule: ``ctas`` CTAs share the ``n_tiles * tile_steps`` (output tile,
    K step) units, unit ``u`` being step ``u % tile_steps`` of tile ``u // tile_steps``.

    CTA ``c`` runs units ``[c * units // ctas, (c + 1) * units // ctas)`` with one
    accumulator that it never resets: when the run enters another tile it stores the
    running sum, and at the end the final one, the sum after the ``s``-th tile of the run
    going to slot ``c * max_tiles + s``. The run's share of its ``s``-th tile is slot
    ``s`` minus slot ``s - 1`` (the Mosaic GPU interpreter cannot reset an accumulator
    mid-pipeline; the differences cost fp32 rounding of the running sum only, far below
    the output's precision).
    """

    n_tiles: int
    tile_steps: int
    ctas: int

    @property
    def units(self) -> int:
        return self.n_tiles * self.tile_steps

    def run(self, c):
        """First and end unit of CTA ``c`` (a Python or a traced int)."""
        return c * self.units // self.ctas, (c + 1) * self.units // self.ctas

    def tiles_of(self, c: int) -> range:
        """The tiles CTA ``c``'s run touches."""
        u0, u1 = self.run(c)
        return range(u0 // self.tile_steps, (u1 - 1) // self.tile_steps + 1)

    @property
    def max_tiles(self) -> int:
        """The most tiles one run touches (partial-sum slots per CTA)."""
        return max(len(self.tiles_of(c)) for c in range(self.ctas))

    def terms(self) -> tuple[np.ndarray, np.ndarray]:
        """int32 slots and float32 signs ``[n_tiles, J]``: tile ``t`` is the sum of
        ``sign * partials[slot]`` over its row (padding: sign 0, slot 0)."""
        per_tile: list[list[tuple[int, float]]] = [[] for _ in range(self.n_tiles)]
        width = self.max_tiles
        for c in range(self.ctas):
            for s, t in enumerate(self.tiles_of(c)):
                per_tile[t].append((c * width + s, 1.0))
                if s:
                    per_tile[t].append((c * width + s - 1, -1.0))
        cols = max(map(len, per_tile))
        slots = np.zeros((self.n_tiles, cols), np.int32)
        signs = np.zeros((self.n_tiles, cols), np.float32)
        for t, row in enumerate(per_tile):
            slots[t, : len(row)] = [slot for slot, _ in row]
            signs[t, : len(row)] = [sign for _, sign in row]
        return slots, signs

    def add_partials(self, partials: jax.Array) -> jax.Array:
        """f32 ``[ctas * max_tiles, rows, tile_n]`` partial sums -> ``[rows, n_tiles *
        tile_n]`` (slots no run wrote are never read)."""
        _, rows, tile_n = partials.shape
        slots, signs = self.terms()
        terms = partials[slots] * signs[:, :, None, None]
        tiles = jnp.where(signs[:, :, None, None] != 0, terms, 0).sum(axis=1)  # 0 * inf
        return tiles.transpose(1, 0, 2).reshape(rows, self.n_tiles * tile_n)


def stream_k_schedule(cfg: GemmConfig, n: int, k: int) -> StreamK | None:
    """The :class:`StreamK` schedule of ``cfg`` for an ``[N, K]`` weight (None when
    ``cfg.stream_k`` is 0); raises ValueError if a CTA's run would hold no unit."""
    if not cfg.stream_k:
        return None
    sched = StreamK(-(-n // cfg.tile_n), -(-k // cfg.tile_k), cfg.stream_k)
    if cfg.stream_k > sched.units:
        raise ValueError(
            f"stream_k={cfg.stream_k} must be at most the n_tiles * K steps = {sched.units}"
            f" units of N={n}, K={k} in tiles of tile_n={cfg.tile_n}, tile_k={cfg.tile_k}"
        )
    return sched


def _check_activations(x2d, k: int, out_dtype, name: str = "x2d"):
    if x2d.ndim != 2 or x2d.shape[1] != k:
        raise ValueError(f"{name} must be [M, {k}], got {list(x2d.shape)}")
    if x2d.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"{name} must be bf16 or f16, got {x2d.dtype}")
    out_dtype = jnp.dtype(out_dtype or x2d.dtype)
    if out_dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"out_dtype must be bf16 or f16, got {out_dtype}")
    return out_dtype


def _check_config(cfg: GemmConfig, k: int, k_group: int, interpret) -> int:
    """Validates ``cfg`` against the weight; returns the K steps of one split."""
    if cfg.tile_k % k_group:
        raise ValueError(f"tile_k={cfg.tile_k} must be a multiple of k_group={k_group}")
    if interpret and (cfg.a_operand != "smem" or cfg.use_fast_decode):
        raise NotImplementedError(
            "the Mosaic GPU interpreter runs neither register-operand wgmma nor"
            " inline_mgpu; use GemmConfig(a_operand='smem', fast_decode=False)"
        )
    if interpret and cfg.cluster_reduce:
        raise NotImplementedError(
            "the Mosaic GPU interpreter does not run cluster stores (async_store_smem);"
            " use split_k_reduce='xla'"
        )
    if cfg.k_fold > 1:
        if k % (cfg.k_fold * cfg.tile_k):
            raise ValueError(
                f"k_fold={cfg.k_fold} needs K to be a multiple of k_fold * tile_k ="
                f" {cfg.k_fold * cfg.tile_k} (equal K parts of whole steps), got K={k}"
            )
        if not (interpret or cfg.use_fast_decode):
            raise NotImplementedError(
                "k_fold on the GPU needs the fast decode (fast_decode=None or True); the"
                " portable decode runs it in the interpreter only"
            )
        return k // (cfg.k_fold * cfg.tile_k)
    total_k_steps = -(-k // cfg.tile_k)
    if total_k_steps % cfg.split_k:
        raise ValueError(f"split_k={cfg.split_k} must divide the number of K steps {total_k_steps}")
    return total_k_steps // cfg.split_k


def block_major_scales(scales: jax.Array) -> jax.Array:
    """Prepared ``scales [..., K_pad/kg, N_pad/16, kg]`` -> ``[..., K_pad/16, N_pad]``: the
    scale of block ``b`` of feature ``n`` at ``[b, n]``, the layout the portable decode
    reads (a small XLA transpose: 1/16 of the weight's elements)."""
    rows = scale_rows(scales)  # [..., K_pad/kg, N_pad, kg/16]
    *lead, groups, n_pad, blocks = rows.shape
    return jnp.swapaxes(rows, -1, -2).reshape(*lead, groups * blocks, n_pad)


def kernel_scales(scales: jax.Array, dtype, cfg: GemmConfig) -> jax.Array:
    """The block scales as the kernel of ``cfg`` reads them for ``dtype`` activations: the
    prepared layout for the fast decode (widened scales of the other float dtype
    re-widened for this one, exactly), block-major for the portable decode."""
    if not cfg.use_fast_decode:
        return block_major_scales(scales)
    if scales.dtype not in (jnp.uint8, jnp.dtype(dtype)):
        s = scales.astype(jnp.float32) * np.float32(
            2.0 ** (scale_exponent(dtype) - scale_exponent(scales.dtype))
        )
        return s.astype(dtype)
    return scales


def compiler_params() -> plgpu.CompilerParams:
    """The GEMM kernel's compiler parameters (``benchmarks/trace_matmul.py`` replaces this
    function to add in-kernel profiling)."""
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _launch(
    x2d,
    data,
    scales,
    ts,
    bias,
    tile_expert,
    *,
    n,
    out_dtype,
    cfg,
    tile_m,
    m_tiles,
    k_steps,
    interpret,
    stream: StreamK | None = None,
):
    """Runs the kernel over ``m_tiles`` token tiles of ``x2d`` (rows a multiple of 8 or
    at most 8). Returns the product ``[rows, n_tiles * tile_n]`` in ``out_dtype`` with
    tensor scale and bias applied, or (:func:`_stores_partials`) float32 partial sums
    ``[split_k, rows, n_tiles * tile_n]`` without them (stream-K: ``[ctas * max_tiles,
    rows, tile_n]``, see :class:`StreamK`).

    K-folded (``cfg.k_fold > 1``): the operands come as views, ``x2d [M * k_fold, K /
    k_fold]`` (``tile_m`` and ``m_tiles`` count its rows; the product has ``M`` rows) and
    :func:`fold_view` of ``data`` and ``scales``."""
    dtype = x2d.dtype
    k_group = data.shape[-1] * _CODES_PER_LANE
    fold = cfg.k_fold
    fused = not _stores_partials(cfg)
    n_tiles = -(-n // cfg.tile_n)
    # The output is padded to whole tiles and sliced by the caller: the transposed
    # store goes through a (8, 64)-tiled SMEM tile (TMA needs N % 64 == 0), and a
    # warpgroup whose rows lie entirely past the end of the output must still
    # store in bounds (a fully out-of-bounds TMA store zeroed the whole output
    # of the fused epilogue on an H100).
    store_dtype = out_dtype if fused else jnp.dtype(jnp.float32)
    n_out = n_tiles * cfg.tile_n
    rows_out = x2d.shape[0] // fold
    out_shape = (rows_out, n_out) if fused else (cfg.split_k, rows_out, n_out)
    if stream is not None:
        out_shape = (stream.ctas * stream.max_tiles, rows_out, cfg.tile_n)

    num_wgs, rows = cfg.num_compute_wgs, cfg.wg_rows
    lanes = k_group // _CODES_PER_LANE
    if fold > 1:  # the output tile
        scratch = [plgpu.SMEM((tile_m // fold, cfg.tile_n), out_dtype)]
    else:
        scratch = [plgpu.SMEM((num_wgs, _out_chunk(cfg, tile_m), rows), store_dtype)]
    if cfg.a_operand == "smem":
        scratch.append(
            plgpu.SMEM(
                (num_wgs, _CODES_PER_LANE, rows, lanes),
                dtype,
                transforms=_swizzle_transforms(lanes, dtype),
            )
        )
    has_bias = fused and bias is not None
    if has_bias:
        if bias.shape[0] != n_out:
            bias = jnp.pad(bias, (0, n_out - bias.shape[0]))
        scratch += [plgpu.SMEM((num_wgs, rows), bias.dtype), plgpu.Barrier(num_barriers=num_wgs)]
    if cfg.cluster_reduce:
        scratch += [
            plgpu.SMEM(
                (cfg.split_k - 1, num_wgs, rows, tile_m),
                jnp.float32,
                transforms=_swizzle_transforms(tile_m, jnp.float32),
            ),
            # One arrival per sending warpgroup (warpgroup lowering semantics).
            plgpu.Barrier(num_arrivals=cfg.split_k - 1, num_barriers=num_wgs),
        ]
        grid = {
            "grid": (n_tiles, m_tiles),
            "grid_names": ("n", "m"),
            "cluster": (cfg.split_k,),
            "cluster_names": ("s",),
        }
    else:
        ctas = n_tiles if stream is None else stream.ctas
        grid = {"grid": (ctas, m_tiles, cfg.split_k), "grid_names": ("n", "m", "s")}
    if fold > 1:  # the accumulators, handed to the first compute warpgroup
        scratch += [
            plgpu.SMEM((num_wgs, tile_m, rows), jnp.float32),
            plgpu.Barrier(num_arrivals=num_wgs),
        ]
    grouped = tile_expert is not None

    def kernel_body(*refs):
        data, scales, x, ts, *refs = refs
        bias_ref = refs.pop(0) if has_bias else None
        expert_ref = refs.pop(0) if grouped else None
        out, o_smem, *refs = refs
        a_smem = refs.pop(0) if cfg.a_operand == "smem" else None
        bias_smem, bias_barrier = (refs.pop(0), refs.pop(0)) if has_bias else (None, None)
        red_smem, red_barrier = (refs.pop(0), refs.pop(0)) if cfg.cluster_reduce else (None, None)
        fold_smem, fold_barrier = (refs.pop(0), refs.pop(0)) if fold > 1 else (None, None)
        _gemm_kernel(
            data,
            scales,
            x,
            ts,
            bias_ref,
            expert_ref,
            out,
            a_smem,
            o_smem,
            bias_smem,
            bias_barrier,
            red_smem,
            red_barrier,
            fold_smem,
            fold_barrier,
            cfg=cfg,
            tile_m=tile_m,
            k_group=k_group,
            k_steps=k_steps,
            dtype=dtype,
            fused_epilogue=fused,
            stream=stream,
        )

    kernel = plgpu.kernel(
        kernel_body,
        out_type=jax.ShapeDtypeStruct(out_shape, store_dtype),
        scratch_types=scratch,
        **grid,
        num_threads=num_wgs + 1,
        thread_name="wg",
        compiler_params=compiler_params(),
        interpret=interpret_params(interpret),
    )
    args = [data, scales, x2d, ts]
    args += [bias] if has_bias else []
    args += [tile_expert] if grouped else []
    return kernel(*args)


@functools.partial(jax.jit, static_argnames=("n", "k", "out_dtype", "config", "interpret"))
def nvfp4_matmul(
    x2d: jax.Array,
    prepared: PreparedWeight,
    *,
    n: int,
    k: int,
    bias: jax.Array | None = None,
    out_dtype=None,
    config: GemmConfig | None = None,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array:
    """``x2d[M, K] @ W[K, N] * tensor_scale (+ bias)`` with an NVFP4 weight.

    Args:
      x2d: bf16 or f16 ``[M, K]``, any M.
      prepared: the output of :func:`prepare_weight` for ``W`` (``N`` features,
        ``K`` inputs).
      n, k: the logical N and K of the weight.
      bias: optional ``[N]`` (any float dtype), added in fp32.
      out_dtype: bf16 or f16; defaults to ``x2d.dtype``.
      config: tiling; :func:`default_config` when None.
      interpret: run in the Mosaic GPU CPU interpreter (needs
        ``GemmConfig(a_operand="smem", fast_decode=False)``): True, or
        ``plgpu.InterpretGPUParams`` (e.g. ``detect_races=True``).

    Returns:
      ``[M, N]`` in ``out_dtype``; fp32 accumulation.
    """
    out_dtype = _check_activations(x2d, k, out_dtype)
    k_group = prepared.k_group
    k_pad = prepared.data.shape[0] * k_group
    n_pad = prepared.data.shape[1]
    if prepared.data.ndim != 3 or n_pad != _round_up(n, 16) or k_pad != _round_up(k, k_group):
        raise ValueError(f"prepared weight {prepared.data.shape} does not match n={n}, k={k}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
    m = x2d.shape[0]
    if m == 0:  # nothing to launch
        return jnp.zeros((0, n), out_dtype)
    cfg = config or default_config(
        m, n, k, dtype=x2d.dtype, k_group=k_group, scale_itemsize=prepared.scales.dtype.itemsize
    )
    k_steps = _check_config(cfg, k, k_group, interpret)
    stream = stream_k_schedule(cfg, n, k)

    fold = cfg.k_fold
    m_out = launch_rows(m, fold)
    if m_out != m:
        x2d = jnp.pad(x2d, ((0, m_out - m), (0, 0)))
    data, scales = prepared.data, kernel_scales(prepared.scales, x2d.dtype, cfg)
    if fold > 1:  # free views: x rows (token, K part), the weights' K part first
        x2d = x2d.reshape(m_out * fold, k // fold)
        data, scales = fold_view(data, fold), fold_view(scales, fold)
    tile_m = token_tile(cfg, m * fold)
    out = _launch(
        x2d,
        data,
        scales,
        prepared.tensor_scale,
        bias,
        None,
        n=n,
        out_dtype=out_dtype,
        cfg=cfg,
        tile_m=tile_m,
        m_tiles=-(-m_out * fold // tile_m),
        k_steps=k_steps,
        interpret=interpret,
        stream=stream,
    )
    if _stores_partials(cfg):
        out = out.sum(axis=0) if stream is None else stream.add_partials(out)
        out = out * prepared.tensor_scale[0]
        if bias is not None:
            out = out[:, :n] + bias.astype(jnp.float32)
    return out[:m, :n].astype(out_dtype)


# -----------------------------------------------------------------------------
# Grouped (MoE) product
# -----------------------------------------------------------------------------


def max_token_tiles(rows: int, num_experts: int, tile_m: int) -> int:
    """Upper bound on the token tiles of ``rows`` rows split into ``num_experts`` groups:
    ``sum_e ceil(g_e / tile_m)`` over at most ``min(E, rows)`` non-empty groups."""
    if rows == 0:
        return 0
    return min(rows, (rows + min(num_experts, rows) * (tile_m - 1)) // tile_m)


def default_grouped_config(
    rows: int,
    num_experts: int,
    n: int,
    k: int,
    *,
    dtype=jnp.bfloat16,
    num_sms: int | None = None,
    k_group: int | None = None,
    scale_itemsize: int = 2,
) -> GemmConfig:
    """:func:`default_config` for a group of 1.5x the average size (``rows / min(E,
    rows)`` tokens) plus 4, so that most routed groups fit in one token tile: a group
    longer than ``tile_m`` streams its expert's weights once per tile. Split-K is sized
    for the expected number of token tiles. Prefill tiles get 4 stages where their output
    in 32-token chunks leaves room (:func:`chunked_output_config`), counting block scales
    of ``scale_itemsize`` bytes (1: the default compact layout; 2 fits every layout)."""
    num_sms = sm_count(num_sms)
    active = max(1, min(num_experts, rows))
    typical = -(-3 * max(rows, 1) // (2 * active)) + 4
    cfg = default_config(
        typical,
        n,
        k,
        dtype=dtype,
        num_sms=num_sms,
        tuned=False,
        split_k=False,
        k_group=k_group,
    )
    tiles = max(-(-rows // cfg.tile_m), active)
    tiles = max(1, min(tiles, max_token_tiles(rows, num_experts, cfg.tile_m)))
    if typical <= 64 and -(-n // 128) * tiles > num_sms:
        # Token tiles of several experts fill the SMs: 128-row warpgroups (measured
        # 4-9% faster than 64-row ones on Mixtral/many-expert shapes, H100).
        cfg = dataclasses.replace(cfg, tile_n=256, stages=4)
    ctas = -(-n // cfg.tile_n) * tiles
    split_k = _largest_divisor_at_most(-(-k // cfg.tile_k), max(1, num_sms // ctas))
    cfg = _fit_stages(dataclasses.replace(cfg, split_k=split_k, stages=4), cfg.tile_m, dtype)
    while cfg.split_k > 1 and smem_bytes(cfg, cfg.tile_m, dtype) > _SMEM_BYTES:
        # f32 partial sums of 128-token tiles next to two stages exceed SMEM: fewer splits
        # until the buffers fit (the fused epilogue stores bf16/f16, half the bytes)
        split_k = _largest_divisor_at_most(-(-k // cfg.tile_k), cfg.split_k - 1)
        cfg = _fit_stages(dataclasses.replace(cfg, split_k=split_k, stages=4), cfg.tile_m, dtype)
    if typical > 64:  # prefill tiles: 4 stages next to an output stored in chunks
        cfg = chunked_output_config(cfg, cfg.tile_m, dtype, scale_itemsize=scale_itemsize)
    return cfg  # (the grouped kernel uses all of tile_m)


def group_of(ends: jax.Array, count: int) -> jax.Array:
    """int32 ``[count]``: for each index ``0 .. count-1`` the group whose range
    ``[ends[g-1], ends[g])`` holds it (``ends``: cumulative group sizes), clamped to the
    last group for indices past ``ends[-1]``. A compare-all search: one fusion, where
    ``searchsorted``'s default binary search is a loop of small kernels on the GPU."""
    idx = jnp.arange(count, dtype=jnp.int32)
    g = jnp.searchsorted(ends, idx, side="right", method="compare_all")
    return jnp.minimum(g, ends.shape[0] - 1).astype(jnp.int32)


def _tile_schedule(group_sizes: jax.Array, rows: int, tile_m: int, max_tiles: int):
    """Maps sorted token rows onto expert-aligned token tiles (all jnp, dynamic sizes).

    Returns ``tile_expert`` int32 ``[max_tiles]`` (the expert of each tile, -1 when
    unused), ``gather`` int32 ``[max_tiles * tile_m]`` (the row of ``x`` that each padded
    row holds, ``rows`` for padding) and ``scatter`` int32 ``[rows]`` (the padded row of
    each row of ``x``, -1 for rows past ``sum(group_sizes)``).
    """
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gs)
    starts = ends - gs
    tiles = (gs + tile_m - 1) // tile_m
    tile_ends = jnp.cumsum(tiles)
    tile_starts = tile_ends - tiles
    t = jnp.arange(max_tiles, dtype=jnp.int32)
    tile_expert = jnp.where(t < tile_ends[-1], group_of(tile_ends, max_tiles), -1)

    padded = jnp.arange(max_tiles * tile_m, dtype=jnp.int32)
    e = tile_expert[padded // tile_m]
    e_safe = jnp.maximum(e, 0)
    local = (padded // tile_m - tile_starts[e_safe]) * tile_m + padded % tile_m
    gather = jnp.where((e >= 0) & (local < gs[e_safe]), starts[e_safe] + local, rows)

    r = jnp.arange(rows, dtype=jnp.int32)
    re = group_of(ends, rows)
    local = r - starts[re]
    scatter = (tile_starts[re] + local // tile_m) * tile_m + local % tile_m
    scatter = jnp.where(r < ends[-1], scatter, -1)
    return tile_expert, gather, scatter


@functools.partial(jax.jit, static_argnames=("n", "k", "out_dtype", "config", "interpret"))
def nvfp4_grouped_matmul(
    x2d: jax.Array,
    prepared: PreparedWeight,
    group_sizes: jax.Array,
    *,
    n: int,
    k: int,
    out_dtype=None,
    config: GemmConfig | None = None,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jax.Array:
    """Grouped product: rows ``[start_e, start_e + g_e)`` of ``x2d`` times expert ``e``.

    Args:
      x2d: bf16 or f16 ``[T, K]``, rows sorted by expert.
      prepared: :func:`prepare_weight` of the stacked weights ``W[E, K, N]``.
      group_sizes: int32 ``[E]``, rows per expert, summing to at most ``T`` (dynamic:
        changing it does not recompile).
      n, k: the logical N and K of one expert's weight.
      out_dtype, config, interpret: as in :func:`nvfp4_matmul`; ``config`` defaults to
        :func:`default_grouped_config`.

    Returns:
      ``[T, N]`` in ``out_dtype``; rows past ``sum(group_sizes)`` are zero.

    The rows are gathered into expert-aligned token tiles of ``tile_m`` rows (a static
    worst-case number of tiles, see :func:`max_token_tiles`); each CTA reads its tile's
    expert from a table and streams that expert's weights; unused tiles exit at once, so
    empty experts cost nothing. The output rows are gathered back.
    """
    out_dtype = _check_activations(x2d, k, out_dtype)
    if prepared.data.ndim != 4:
        raise ValueError(f"prepared must hold stacked expert weights, got {prepared.data.shape}")
    num_experts = prepared.data.shape[0]
    k_group = prepared.k_group
    if prepared.data.shape[2] != _round_up(n, 16) or prepared.data.shape[1] * k_group != _round_up(
        k, k_group
    ):
        raise ValueError(f"prepared weight {prepared.data.shape} does not match n={n}, k={k}")
    if group_sizes.shape != (num_experts,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes must be integer [{num_experts}], got"
            f" {group_sizes.dtype}{list(group_sizes.shape)}"
        )
    rows = x2d.shape[0]
    cfg = config or default_grouped_config(
        rows,
        num_experts,
        n,
        k,
        dtype=x2d.dtype,
        k_group=k_group,
        scale_itemsize=prepared.scales.dtype.itemsize,
    )
    if cfg.stream_k or cfg.k_fold > 1:
        raise ValueError(f"the grouped product runs neither stream-K nor k_fold, got config {cfg}")
    k_steps = _check_config(cfg, k, k_group, interpret)
    if rows == 0:
        return jnp.zeros((0, n), out_dtype)
    tile_m = cfg.tile_m
    max_tiles = max_token_tiles(rows, num_experts, tile_m)
    tile_expert, gather, scatter = _tile_schedule(group_sizes, rows, tile_m, max_tiles)
    x_tiles = jnp.take(x2d, gather, axis=0, mode="fill", fill_value=0)
    out = _launch(
        x_tiles,
        prepared.data,
        kernel_scales(prepared.scales, x2d.dtype, cfg),
        prepared.tensor_scale,
        None,
        tile_expert,
        n=n,
        out_dtype=out_dtype,
        cfg=cfg,
        tile_m=tile_m,
        m_tiles=max_tiles,
        k_steps=k_steps,
        interpret=interpret,
    )
    valid = (scatter >= 0)[:, None]
    if _stores_partials(cfg):
        out = jnp.take(out[:, :, :n], scatter, axis=1, mode="clip").sum(axis=0)
        expert = tile_expert[jnp.maximum(scatter, 0) // tile_m]
        out = out * prepared.tensor_scale[jnp.maximum(expert, 0)][:, None]
    else:
        out = jnp.take(out[:, :n], scatter, axis=0, mode="clip")
    return jnp.where(valid, out, 0).astype(out_dtype)


# -----------------------------------------------------------------------------
# Reference
# -----------------------------------------------------------------------------


def reference(x2d, data, scales, tensor_scale, *, bias=None, out_dtype=None):
    """Same contract as :func:`nvfp4_matmul`, on canonical storage, in plain jnp."""
    w_t = nvfp4_reference.dequantize(
        data, scales, jnp.asarray(tensor_scale, jnp.float32), jnp.float32
    )
    y = jnp.dot(x2d.astype(jnp.float32), w_t.T, precision=lax.Precision.HIGHEST)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype or x2d.dtype)
