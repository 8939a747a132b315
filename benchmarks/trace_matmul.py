"""Where a GEMM kernel's time goes: an in-kernel event trace, summarized per phase.

Run on the GPU: PYTHONPATH=. python benchmarks/trace_matmul.py --m 1 --nk 4096x4096
                      [--config tile_n=128,split_k=4,split_k_reduce=cluster] [--out DIR]

The kernel is compiled with Mosaic GPU's profiler (``CompilerParams(profile_space=...)``):
every warpgroup of every CTA records the SM clock at the begin and end of the kernel's
named scopes (``setup`` at the CTA's start, ``step`` per pipeline step of a compute
warpgroup, ``epilogue``), and the CTA's start on the global timer. From one call's trace
this prints, over the warpgroups of the grid (min / median / max, microseconds from the
first CTA's start): when CTAs start, when their first step begins (the first TMA loads have
landed), the time per step and between steps (waiting for data), the epilogue, and when
the last warpgroup ends; next to it the CUPTI time of the same call without profiling.
Clock cycles are converted at the SM clock ``--clock-ghz`` (default 1.98 GHz, the H100/H200
boost clock; the clock under load is not known in advance).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import json
import os
import statistics
import tempfile
from collections import defaultdict
from unittest import mock

import jax

import nvfp4_jax as nv
from benchmarks import common
from nvfp4_jax.kernels import gemm
from nvfp4_jax.matmul import pallas_plan


def parse_overrides(text: str) -> dict:
    """``"tile_n=128,split_k_reduce=cluster"`` -> GemmConfig field overrides."""
    fields = {f.name for f in dataclasses.fields(gemm.GemmConfig)}
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise ValueError(
                f"--config: unknown GemmConfig field {key!r}; fields: {sorted(fields)}"
            )
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def traced_call(x, w, cfg, out_dir: str, events: int) -> str:
    """Runs ``nv.matmul`` once with the kernel profiled; returns the trace file's path."""
    params = dataclasses.replace(
        gemm.compiler_params(),
        profile_space=events,
        profile_dir=out_dir,
        profile_bounds_check=True,
    )
    before = set(glob.glob(os.path.join(out_dir, "*-trace.json")))
    jax.clear_caches()  # nv.matmul's inner jits would reuse the kernel compiled unprofiled
    with mock.patch.object(gemm, "compiler_params", lambda: params):
        fn = jax.jit(lambda x, w: nv.matmul(x, w, backend="pallas", config=cfg))
        jax.block_until_ready(fn(x, w))
        jax.effects_barrier()  # the trace is written by a host callback
    jax.clear_caches()
    (path,) = set(glob.glob(os.path.join(out_dir, "*-trace.json"))) - before
    return path


def phases(path: str, clock_ghz: float) -> dict[str, list[float]]:
    """Per-warpgroup phase times (us) from a Mosaic GPU trace file.

    The file's timestamps are the trace's global-timer start (ns) plus SM clock cycles since
    its first event, divided by 1000; both parts are recovered here."""
    with open(path) as f:
        data = json.load(f)
    by_trace = defaultdict(list)
    for e in data["traceEvents"]:
        by_trace[e["tid"]].append(e)
    t0 = min(evs[0]["ts"] for evs in by_trace.values())
    out = defaultdict(list)
    for evs in by_trace.values():
        start = evs[0]["ts"]  # us, global timer
        times = [start - t0 + (e["ts"] - start) / clock_ghz for e in evs]
        out["CTA start"].append(times[0])
        ranges = defaultdict(list)  # name -> [(begin, end)]
        for (e, t), (e2, t2) in itertools.pairwise(zip(evs, times)):
            if e["ph"] == "B" and e2["ph"] == "E" and e2["name"] == e["name"]:
                ranges[e["name"]].append((t, t2))
        steps = ranges["step"]
        if not steps:  # the TMA warpgroup records its setup only
            continue
        out["first step begins"].append(steps[0][0])
        out["step"] += [end - begin for begin, end in steps]
        out["wait between steps"] += [b2 - e1 for (_, e1), (b2, _) in itertools.pairwise(steps)]
        for begin, end in ranges["epilogue"][:1]:
            out["last step end to epilogue"].append(begin - steps[-1][1])
            out["epilogue"].append(end - begin)
        out["compute warpgroup ends"].append(times[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--nk", default="4096x4096")
    p.add_argument("--config", default="", help="GemmConfig overrides of the default plan")
    p.add_argument("--events", type=int, default=256, help="profiler events per warpgroup")
    p.add_argument("--clock-ghz", type=float, default=1.98)
    p.add_argument("--out", default=None, help="where trace files go (default: a temp dir)")
    args = p.parse_args()
    _, n, k, x, copies = next(common.matmul_problems([args.nk], [args.m]))
    cfg = pallas_plan(args.m, n, k)
    if not isinstance(cfg, gemm.GemmConfig):
        raise SystemExit(
            f"M={args.m} takes the dequantize route; pass --config to trace the kernel"
        )
    cfg = dataclasses.replace(cfg, **parse_overrides(args.config))
    us = common.time_per_call(
        lambda x, w: nv.matmul(x, w, backend="pallas", config=cfg), [(x, c) for c in copies]
    )
    out_dir = args.out or tempfile.mkdtemp(prefix="nvfp4-trace-")
    os.makedirs(out_dir, exist_ok=True)
    stats = phases(traced_call(x, copies[0], cfg, out_dir, args.events), args.clock_ghz)
    rows = [[name, len(v), min(v), statistics.median(v), max(v)] for name, v in stats.items() if v]
    common.report(
        "trace_matmul",
        f"Kernel phases, M={args.m} {n}x{k}, {common.config_label(cfg)}",
        ["phase", "count", "min us", "median us", "max us"],
        rows,
        notes=[
            (
                f"CUPTI time per call without profiling: {us:.2f} us; phases from one profiled"
                f" call (times from the first CTA's start; SM clock taken as {args.clock_ghz} GHz)"
            )
        ],
        write=False,
    )


if __name__ == "__main__":
    main()
