"""A/B of ``GemmConfig`` field changes against the default plan, per shape, in one run.

Run on the GPU:
    PYTHONPATH=. python benchmarks/ab_configs.py --m 64 1024 --nk 14336x4096 \
        --variant overlap_decode=False --variant tile_n=192,compute_wgs=3 [--iterations 20]

For every (M, N, K): bf16 ``x @ w.T``, the default fused config (``pallas_plan``, or
``default_config`` where the plan is the dequantize route) and the default with each
``--variant``'s fields replaced (``field=value,field=value``; ints, ``None``, ``True`` /
``False`` and strings are parsed). CUPTI kernel times, medians, weights rotated past 2x the
L2. Prints one table: time and ratio vs bf16 per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import nvfp4_jax as nv
from benchmarks import common
from nvfp4_jax.kernels import gemm
from nvfp4_jax.matmul import pallas_plan


def parse_value(text: str):
    """``"128"`` -> 128, ``"None"`` -> None, ``"True"`` -> True, anything else as is."""
    named = {"None": None, "True": True, "False": False}
    if text in named:
        return named[text]
    try:
        return int(text)
    except ValueError:
        return text


def parse_variant(text: str) -> dict:
    """``"split_k_reduce=cluster,stages=3"`` -> ``{"split_k_reduce": "cluster", "stages": 3}``."""
    fields = {f.name for f in dataclasses.fields(gemm.GemmConfig)}
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in fields or not _:
            raise SystemExit(f"--variant {text!r}: {name!r} is not a GemmConfig field=value")
        out[name] = parse_value(value)
    return out


def speedup(reference_us: float, us: float, digits: int) -> str:
    """``reference_us / us`` as ``"1.23x"``; ``"-"`` where a time is missing (NaN)."""
    ratio = reference_us / us
    return "-" if math.isnan(ratio) else f"{ratio:.{digits}f}x"


def base_config(m: int, n: int, k: int, k_group: int | None = None) -> gemm.GemmConfig:
    """The fused config the library runs at this shape for a weight prepared with
    ``k_group`` (its tiling where it takes the dequantize route)."""
    plan = pallas_plan(m, n, k, k_group=k_group)
    if isinstance(plan, gemm.GemmConfig):
        return plan
    return gemm.default_config(m, n, k, k_group=k_group)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="+", required=True)
    p.add_argument("--nk", nargs="+", required=True)
    p.add_argument("--variant", action="append", default=[], type=parse_variant)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--k-group", type=int, default=None, help="prepared k-group (default: 128)")
    args = p.parse_args()
    labels = [",".join(f"{key}={val}" for key, val in v.items()) for v in args.variant]
    headers = ["M", "N", "K", "bf16", "default", "vs bf16"]
    for label in labels:
        headers += [label, "vs bf16", "vs default"]
    headers.append("default config")
    rows = []
    for m, n, k, x, copies in common.matmul_problems(args.nk, args.m, args.k_group):
        t_bf16 = common.bf16_time(x, n, args.iterations)
        base = base_config(m, n, k, args.k_group)
        row = [m, n, k, t_bf16]
        t_base = None
        for fields in [{}] + args.variant:
            try:  # an invalid or oversized variant is reported, not fatal
                cfg = dataclasses.replace(base, **fields)
                t = common.time_per_call(
                    lambda x, w, cfg=cfg: nv.matmul(x, w, backend="pallas", config=cfg),
                    [(x, w) for w in copies],
                    args.iterations,
                )
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  {fields}: {str(e).splitlines()[0][:200]}", flush=True)
                t = float("nan")
            row += [t, speedup(t_bf16, t, 2)]
            if t_base is None:
                t_base = t
            else:
                row.append(speedup(t_base, t, 3))
        row.append(common.config_label(base))
        rows.append(row)
        print(row, flush=True)
    common.report(
        "ab_configs",
        "nvfp4_jax.matmul: default config vs variants (us, CUPTI median)",
        headers,
        rows,
        notes=[f"variants: {'; '.join(labels)}"],
    )


if __name__ == "__main__":
    main()
