"""Regenerate ``nvfp4_jax/kernels/gemm_tuned.py``: time ``bench_matmul.py``'s config grid for
each (M bucket, N, K) on this GPU and record the fastest config per shape.

Run on the target GPU (about 3 s per config):
    PYTHONPATH=. python benchmarks/tune_matmul.py [--m 8 16 64 1024] [--nk 4096x4096 ...]
                                                 [--dry-run]

M values must be buckets of ``gemm_tuned.M_BUCKETS`` (a bucket is timed at its largest M).
Entries of other devices and shapes are kept; re-tuned entries are replaced. The table of
the timings is printed and saved under ``benchmarks/results/tune_matmul-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pprint
import re

import jax

from benchmarks import common
from benchmarks.bench_matmul import NK_VALUES, fastest, sweep
from nvfp4_jax.kernels import gemm_tuned
from nvfp4_jax.kernels.gemm import GemmConfig

TABLE_PATH = os.path.join(os.path.dirname(gemm_tuned.__file__), "gemm_tuned.py")
_BLOCK = re.compile(r"(# BEGIN TUNED[^\n]*\n)(.*?)(# END TUNED)", re.DOTALL)


def render(tuned: dict) -> str:
    """Python source of the ``TUNED`` table (entries sorted per device)."""
    lines = ["TUNED: dict[str, dict[tuple[int, int, int], Tuned]] = {"]
    for device in sorted(tuned):
        lines.append(f"    {json.dumps(device)}: {{")
        for key in sorted(tuned[device]):
            entry = tuned[device][key]
            values = list(entry)
            # trailing fields at their defaults (split_k_reduce "xla", stream_k 0, k_group 64,
            # k_fold 1, out_chunk 0) are left out
            defaults = gemm_tuned.Tuned._field_defaults
            while values and values[-1] == defaults.get(entry._fields[len(values) - 1], ...):
                values.pop()
            fields = ", ".join(json.dumps(v) for v in values)
            lines.append(f"        {key}: Tuned({fields}),")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_table(tuned: dict, path: str = TABLE_PATH) -> None:
    with open(path) as f:
        source = f.read()
    if not _BLOCK.search(source):
        raise RuntimeError(f"{path} lacks the '# BEGIN TUNED' / '# END TUNED' markers")
    table = render(tuned).replace("\\", "\\\\")
    with open(path, "w") as f:
        f.write(_BLOCK.sub(lambda m: m.group(1) + table + m.group(3), source))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="*", default=[8, 16, 64, 256, 1024, 4096])
    p.add_argument("--nk", nargs="*", default=[f"{n}x{k}" for n, k in NK_VALUES])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--dry-run", action="store_true", help="print the table, do not write it")
    args = p.parse_args()
    if bad := [m for m in args.m if m not in gemm_tuned.M_BUCKETS]:
        raise SystemExit(f"--m values must be buckets {gemm_tuned.M_BUCKETS}, got {bad}")
    device = jax.devices()[0].device_kind
    today = datetime.date.today().isoformat()
    tuned = {d: dict(entries) for d, entries in gemm_tuned.TUNED.items()}
    rows = []
    for m, n, k, x, copies in common.matmul_problems(args.nk, args.m):
        # The table records fused-kernel tilings only: overlap_decode keeps its default, the
        # dequantize route (pallas_plan's choice from its row threshold on) is not a tiling.
        configs = [
            c for c in sweep(m, n, k) if isinstance(c, GemmConfig) and c.overlap_decode is None
        ]
        t, cfg = fastest(configs, x, copies, args.iterations)
        entry = gemm_tuned.Tuned(
            cfg.tile_n,
            cfg.tile_m,
            cfg.tile_k,
            cfg.stages,
            cfg.split_k,
            round(t, 2),
            today,
            cfg.split_k_reduce if cfg.split_k > 1 else "xla",
            cfg.stream_k,
            copies[0].prepared.k_group,
            cfg.k_fold,
            cfg.out_chunk,
        )
        tuned.setdefault(device, {})[(m, n, k)] = entry
        rows.append([m, n, k, t, common.config_label(cfg)])
        print(rows[-1], flush=True)
    common.report(
        "tune_matmul",
        "Tuned nvfp4_jax.matmul configs (fastest of bench_matmul.py's grid per shape)",
        ["M bucket", "N", "K", "us", "config"],
        rows,
        write=not args.dry_run,
    )
    if args.dry_run:
        pprint.pprint(tuned)
        return
    write_table(tuned)
    print("updated", TABLE_PATH)


if __name__ == "__main__":
    main()
