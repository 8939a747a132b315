"""Shared benchmark helpers: device-side timing, the HBM roofline, result tables.

Timing uses CUPTI (``jax.experimental.mosaic.gpu.profiler.measure``): the summed GPU time of
every kernel a call launches, so host overhead is excluded. To keep weights out of the 50 MB
L2, a timed function runs the operation once on each of several input copies (``copies``)
and the time per call is the median total divided by the number of copies.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

L2_BYTES = 50 * 2**20


def copies_for(bytes_per_copy: int, minimum: int = 2) -> int:
    """Copies needed so one rotation touches more than 2x the L2."""
    return max(minimum, -(-2 * L2_BYTES // max(bytes_per_copy, 1)) + 1)


def fresh_copy(tree):
    """A copy of every array leaf of ``tree`` in new device buffers (for copy rotation)."""
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def prepared_copies(w_kn, k_group: int | None = None):
    """``nv.prepare(nv.quantize(w_kn, axis=0), k_group=k_group)`` for a ``[K, N]`` weight, and
    enough fresh copies of it to rotate past 2x the L2. Returns (prepared, copies, bytes of
    one copy)."""
    import nvfp4_jax as nv

    prepared = nv.prepare(nv.quantize(w_kn, axis=0), k_group=k_group)
    nbytes = prepared.prepared.data.nbytes + prepared.prepared.scales.nbytes
    return prepared, [fresh_copy(prepared) for _ in range(copies_for(nbytes))], nbytes


def matmul_weights(nks: Sequence[str]):
    """For every ``"NxK"`` in ``nks``: ``(n, k, w)`` with the random bf16 ``w [K, N]`` that
    the matmul benchmarks quantize (the same weight in every script and run)."""
    for nk in nks:
        n, k = (int(v) for v in nk.split("x"))
        yield n, k, jax.random.normal(jax.random.key(0), (k, n), jnp.bfloat16)


def matmul_x(m: int, k: int) -> jax.Array:
    """The random bf16 activations ``x [M, K]`` of the matmul benchmarks."""
    return jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)


def matmul_problems(nks: Sequence[str], ms: Sequence[int], k_group: int | None = None):
    """For every ``"NxK"`` in ``nks`` and M in ``ms``: ``(m, n, k, x, copies)`` with
    :func:`matmul_x` and rotated prepared copies of :func:`matmul_weights`'s weight
    (prepared with ``k_group``; None: the default)."""
    for n, k, w in matmul_weights(nks):
        _, copies, _ = prepared_copies(w, k_group)
        for m in ms:
            yield m, n, k, matmul_x(m, k), copies


def time_per_call(fn: Callable, arg_sets: Sequence[tuple], iterations: int = 20) -> float:
    """Median GPU time in microseconds of ``fn(*args)``, rotating over ``arg_sets``."""
    from jax.experimental.mosaic.gpu import profiler

    run_all = jax.jit(lambda sets: [fn(*a) for a in sets])
    jax.block_until_ready(run_all(arg_sets))  # compile + warm up
    _, times = profiler.measure(run_all, iterations=iterations)(arg_sets)
    if times is None:
        raise RuntimeError("no kernel was launched")
    return statistics.median(times) * 1e3 / len(arg_sets)


def bf16_time(x: jax.Array, n: int, iterations: int = 20) -> float:
    """The bf16 baseline: median us of ``x @ w.T`` for ``x [M, K]`` over random bf16 ``[n, K]``
    weights rotated past 2x the L2."""
    k = x.shape[-1]
    weights = [
        jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16)
        for i in range(copies_for(n * k * 2))
    ]
    return time_per_call(lambda x, w: x @ w.T, [(x, w) for w in weights], iterations)


def hbm_copy_bandwidth(nbytes: int = 2**30) -> float:
    """Measured device-memory bandwidth in GB/s (bytes read + written) of a large copy."""
    x = [jnp.arange(nbytes // 4, dtype=jnp.uint32) + i for i in range(2)]
    us = time_per_call(lambda v: v ^ jnp.uint32(0x5A5A5A5A), [(v,) for v in x], iterations=10)
    return 2 * nbytes / (us * 1e-6) / 1e9


def timing_cells(t_bf16: float, t_fp4: float, t_xla: float, floor_us: float, cfg) -> list:
    """The shared columns of the GEMM tables: the three times, the two ratios, the share of
    the FP4 byte floor and the kernel config."""
    return [
        t_bf16,
        t_fp4,
        t_xla,
        f"{t_bf16 / t_fp4:.2f}x",
        f"{t_xla / t_fp4:.1f}x",
        f"{100 * floor_us / t_fp4:.0f}%",
        config_label(cfg),
    ]


def config_label(cfg) -> str:
    """A GemmConfig in a table cell, e.g. ``n256 m8 k64 s4 sk8``; the dequantize route
    (``"dequantize"``) as ``dequantize+dot``."""
    if isinstance(cfg, str):
        return f"{cfg}+dot"
    return (
        f"n{cfg.tile_n} m{cfg.tile_m} k{cfg.tile_k} s{cfg.stages} sk{cfg.split_k}"
        + (" cluster" if cfg.cluster_reduce else "")
        + (f" stream{cfg.stream_k}" if cfg.stream_k else "")
        + (f" fold{cfg.k_fold}" if cfg.k_fold > 1 else "")
        + (f" oc{cfg.out_chunk}" if cfg.out_chunk else "")
        + ("" if cfg.use_overlap_decode else " serial")
        + ({None: "", True: " grouped", False: " per-quarter"}[cfg.group_wgmma])
    )


def device_line() -> str:
    d = jax.devices()[0]
    return (
        f"device: {d.device_kind} ({d.platform}), jax {jax.__version__}, "
        f"date {datetime.date.today().isoformat()}, host {platform.node() or 'unknown'}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 1000 else f"{c:.0f}"
    return str(c)


def report(
    name: str,
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence],
    notes: Sequence[str] = (),
    write: bool = True,
) -> str:
    """A result table as markdown (title, device line, ``notes``, table): printed, and with
    ``write`` saved by :func:`save` under ``name``. Returns the text."""
    text = "\n".join([f"# {title}", "", device_line(), *notes, "", table(headers, rows)])
    print(text)
    if write:
        print("saved", save(name, text))
    return text


def save(name: str, text: str, out_dir: str | None = None) -> str:
    """Write a result file ``<name>-<date>.md`` (also copied to ``$OUT`` when set)."""
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-{datetime.date.today().isoformat()}.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], os.path.basename(path)), "w") as f:
            f.write(text + "\n")
    return path
