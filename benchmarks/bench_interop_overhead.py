"""Per-call overhead of ``NVFP4Linear.forward`` over the jitted JAX call it wraps.

One layer ``y = x @ W.T``, ``x [M, K]`` bf16, ``W [N, K]``; three ways to run it:

* ``NVFP4Linear.forward``: torch tensor in, torch tensor out (checks, DLPack both ways, the
  cached jitted ``nvfp4_jax.linear``);
* ``direct jitted JAX``: the same jitted function on JAX arrays converted beforehand -- the
  difference to the row above is what the interop adds (goal: <= 15 us per call);
* ``direct JAX + block``: the same, waiting for each result (the fair baseline on CPU,
  where ``forward`` must hand torch a finished tensor);
* ``torch F.linear bf16``: the dense baseline.

Columns (medians over ``--repeats`` runs of ``--iters`` back-to-back calls):

* ``call us``: host time until the Python call returns (enqueue only on GPU; on CPU,
  ``forward`` waits for its result while the direct JAX call does not);
* ``wall us``: wall clock of the calls plus one final synchronization, divided by ``iters``;
* ``events us`` (CUDA only): CUDA events on torch's current stream around the calls. The
  DLPack stream protocol orders ``forward``'s JAX work inside that window; the direct JAX call
  runs on JAX's stream, so it has no events column.

Small shapes make the host cost visible (default ``M=1, K=N=1024``). Run:

    PYTHONPATH=. python benchmarks/bench_interop_overhead.py [--m 1 --k 1024 --n 1024 --iters 2000 --device auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def _timeit(call, sync, iters, warmup, repeats, events=False):
    import torch

    for _ in range(warmup):
        out = call()
    sync(out)
    calls, walls, evs = [], [], []
    for _ in range(repeats):
        if events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            out = call()
        t1 = time.perf_counter()
        if events:
            end.record()
        sync(out)
        t2 = time.perf_counter()
        calls.append((t1 - t0) / iters * 1e6)
        walls.append((t2 - t0) / iters * 1e6)
        if events:
            evs.append(start.elapsed_time(end) * 1e3 / iters)
    med = statistics.median
    return med(calls), med(walls), (med(evs) if evs else None)


def main(argv: list[str] | None = None) -> dict[str, tuple]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--profile", action="store_true", help="cProfile forward, print the top")
    p.add_argument(
        "--backend", default=None, help="nvfp4_jax backend: xla or pallas (default: auto)"
    )
    args = p.parse_args(argv)
    # Share the GPU with torch: no JAX preallocation (read when JAX's GPU client starts).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import jax
    import torch
    import torch.nn.functional as F

    from interop import NVFP4Linear

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    lin = torch.nn.Linear(args.k, args.n, bias=False, dtype=torch.bfloat16, device=device)
    layer = NVFP4Linear.from_linear(lin, backend=args.backend)
    x = torch.randn(args.m, args.k, dtype=torch.bfloat16, device=device)

    # The exact jitted function and arrays the JAX-dispatch forward uses.
    _, _, fn, jargs, torch_launch = layer._jax_state()
    os.environ["NVFP4_JAX_TORCH_LAUNCH"] = "0"
    layer_jax = NVFP4Linear.from_linear(lin, backend=args.backend)
    layer_jax._jax_state()
    del os.environ["NVFP4_JAX_TORCH_LAUNCH"]
    from interop import to_jax

    xj = to_jax(x)
    w = lin.weight.detach()

    def torch_sync(out):
        if cuda:
            torch.cuda.synchronize()

    def jax_sync(out):
        out.block_until_ready()

    rows = {}
    with torch.no_grad():
        rows["NVFP4Linear.forward"] = _timeit(
            lambda: layer(x), torch_sync, args.iters, args.warmup, args.repeats, events=cuda
        )
        if torch_launch is not None:
            rows["  forward, JAX dispatch"] = _timeit(
                lambda: layer_jax(x), torch_sync, args.iters, args.warmup, args.repeats, events=cuda
            )
        rows["direct jitted JAX"] = _timeit(
            lambda: fn(xj, *jargs), jax_sync, args.iters, args.warmup, args.repeats
        )
        rows["direct JAX + block"] = _timeit(
            lambda: fn(xj, *jargs).block_until_ready(),
            jax_sync,
            args.iters,
            args.warmup,
            args.repeats,
        )
        from interop.dlpack import _export, _to_jax_fast

        y_j = fn(xj, *jargs)
        rows["  part: import x"] = _timeit(
            lambda: _to_jax_fast(x), lambda o: None, args.iters, args.warmup, args.repeats
        )
        rows["  part: export y"] = _timeit(
            lambda: _export(y_j, device), torch_sync, args.iters, args.warmup, args.repeats
        )
        rows["  part: layer state"] = _timeit(
            layer._jax_state, lambda o: None, args.iters, args.warmup, args.repeats
        )
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.iters):
                layer(x)
            prof.disable()
            torch_sync(None)
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        rows["torch F.linear bf16"] = _timeit(
            lambda: F.linear(x, w), torch_sync, args.iters, args.warmup, args.repeats, events=cuda
        )

    dev_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(
        f"torch {torch.__version__}, jax {jax.__version__}, {dev_name}; "
        f"x [{args.m}, {args.k}] bf16, W [{args.n}, {args.k}], {args.iters} calls x {args.repeats}"
    )
    print(f"{'':22s} {'call us':>9s} {'wall us':>9s} {'events us':>10s}")
    for name, (call, wall, ev) in rows.items():
        evs = f"{ev:10.2f}" if ev is not None else f"{'-':>10s}"
        print(f"{name:22s} {call:9.2f} {wall:9.2f} {evs}")
    # On CUDA forward returns before the GPU is done, like the direct call. On CPU torch has
    # no streams: forward must wait for its result, so its baseline is "+ block".
    base = "direct jitted JAX" if cuda else "direct JAX + block"
    fwd, direct = rows["NVFP4Linear.forward"], rows[base]
    print(
        f"added by interop per call (vs {base}): {fwd[0] - direct[0]:+.2f} us (call), "
        f"{fwd[1] - direct[1]:+.2f} us (wall)  [goal: <= 15 us]"
    )
    dense = rows["torch F.linear bf16"]
    print(f"forward vs torch F.linear bf16: {fwd[0] - dense[0]:+.2f} us (call)")
    return rows


if __name__ == "__main__":
    main()
