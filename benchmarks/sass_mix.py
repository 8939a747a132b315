"""Instruction mix of the GEMM kernel's main loop (SASS), from a Mosaic GPU PTX dump.

Two steps, since the GPU machine lacks ``nvdisasm``:

1. On the GPU, compile one ``nvfp4_jax.matmul`` with the PTX dump on:
   PYTHONPATH=. python benchmarks/sass_mix.py --dump $OUT/dump [--m 1 --nk 4096x4096]
       [--variant "lanes 8/3"]   (a decode variant of ``benchmarks/ab_decode.py``)
2. Anywhere with ``ptxas`` and ``nvdisasm`` (a CUDA toolkit, or the copies bundled with
   triton): python benchmarks/sass_mix.py $OUT/dump/kernel_body_*.ptx

Step 2 assembles the PTX for sm_90a, disassembles it and counts the opcodes of the loop
that issues the wgmmas (the innermost backward branch whose body holds an ``HGMMA``): one
pipeline step of a compute warpgroup, per warp.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def find_tool(name: str) -> str:
    """``name`` on PATH, else triton's bundled copy, else a CUDA toolkit's."""
    candidates = [shutil.which(name)]
    try:
        import triton

        candidates.append(
            os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin", name)
        )
    except ImportError:
        pass
    candidates += sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"), reverse=True)
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise SystemExit(f"{name} not found (PATH, triton's backends/nvidia/bin, /usr/local/cuda*/bin)")


def disassemble(ptx_path: str) -> str:
    """SASS text of a PTX file, assembled for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        subprocess.run([find_tool("ptxas"), "-arch=sm_90a", ptx_path, "-o", cubin], check=True)
        return subprocess.run(
            [find_tool("nvdisasm"), "-c", cubin], check=True, capture_output=True, text=True
        ).stdout


def main_loop(sass: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` of the innermost loop that contains an HGMMA."""
    instrs, labels = [], {}
    pending = []
    for line in sass.splitlines():
        if m := _LABEL.match(line.strip()):
            pending.append(m.group(1))
        elif m := _INSTR.search(line):
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            instrs.append((addr, m.group(2), m.group(3)))
    loops = []
    for addr, op, operands in instrs:
        target = re.search(r"`\((\.L_x_\d+)\)", operands)
        if op == "BRA" and target and labels.get(target.group(1), addr) < addr:
            body = [i for i in instrs if labels[target.group(1)] <= i[0] <= addr]
            if any(i[1] == "HGMMA" for i in body):
                loops.append(body)
    if not loops:
        raise SystemExit("no loop with an HGMMA in this kernel")
    return min(loops, key=len)


def report(ptx_path: str) -> None:
    loop = main_loop(disassemble(ptx_path))
    counts = collections.Counter(op for _, op, _ in loop)
    print(f"{ptx_path}: main loop {len(loop)} instructions per warp")
    print("| opcode | count |\n|---|---|")
    for op, n in counts.most_common():
        print(f"| {op} | {n} |")


def dump(out_dir: str, m: int, nk: str, variant: str = "kernel") -> None:
    """Compile and run one ``nv.matmul`` with Mosaic GPU's PTX dump into ``out_dir``, under
    ``ab_decode.VARIANTS[variant]`` (the dump flag is read once per process: one variant per
    run)."""
    os.makedirs(out_dir, exist_ok=True)
    os.environ.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=out_dir)
    import jax
    import jax.numpy as jnp

    import nvfp4_jax as nv
    from benchmarks.ab_decode import VARIANTS

    n, k = (int(v) for v in nk.split("x"))
    with VARIANTS[variant]():
        w = jax.random.normal(jax.random.key(0), (k, n), jnp.bfloat16)
        w = nv.prepare(nv.quantize(w, axis=0))
        x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
        jax.block_until_ready(nv.matmul(x, w, backend="pallas"))
    print("\n".join(sorted(glob.glob(os.path.join(out_dir, "*.ptx")))))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("ptx", nargs="*", help="PTX files to analyse")
    p.add_argument("--dump", help="run one matmul on the GPU and dump its PTX here")
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--nk", default="4096x4096")
    p.add_argument("--variant", default="kernel", help="a decode variant of ab_decode.py")
    args = p.parse_args()
    if args.dump:
        dump(args.dump, args.m, args.nk, args.variant)
    for path in args.ptx:
        report(path)
    if not args.dump and not args.ptx:
        p.print_help(sys.stderr)
