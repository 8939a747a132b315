"""Kernel time of the GEMM launched straight from PyTorch (``interop.torch_kernel``) vs
``F.linear`` in bf16, for three tiling policies:

* ``no split``: 128-feature decode tiles without split-K (the launch policy before cluster
  split-K);
* ``one kernel``: the JAX path's tiling as one launch (``gemm.single_kernel_config``, the
  policy until 2026-12-03, session 22): at M <= 16, 2 or 4 splits of 128-feature tiles
  K-folded into the CTA, other splits reduced inside thread-block clusters;
* ``launch``: the current policy (``TorchGemm.config_for``): the JAX path's tiling without
  stream-K, split-K partials summed by a second kernel (``split_k.add_partials``).

Times are CUDA kernel times from ``torch.profiler`` (CUPTI), summed per call, rotating
over enough weight copies to exceed 2x the L2. Run on a GPU with torch and jax:

    PYTHONPATH=. python benchmarks/bench_torch_launch.py [--m 1 16 64 --nk 4096x4096]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import nvfp4_jax as nv
from benchmarks import common
from benchmarks.bench_matmul import NK_VALUES
from nvfp4_jax.kernels import gemm


def kernel_us(run, calls: int, iterations: int) -> float:
    """CUDA kernel time (us) per call of ``run()``, which makes ``calls`` calls: the summed
    duration of every kernel launched in ``iterations`` runs over ``iterations * calls``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            run()
        torch.cuda.synchronize()
    times = [
        e.device_time
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0
    ]
    if not times:
        raise RuntimeError("the profiler saw no CUDA kernel")
    return sum(times) / (iterations * calls)


def main() -> None:
    import torch
    import torch.nn.functional as F

    from interop import torch_kernel

    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="*", default=[1, 16, 64])
    p.add_argument("--nk", nargs="*", default=[f"{n}x{k}" for n, k in NK_VALUES])
    p.add_argument("--iterations", type=int, default=20)
    args = p.parse_args()
    rows = []
    for nk in args.nk:
        n, k = (int(v) for v in nk.split("x"))
        copies = common.copies_for(n * k // 2)
        weights = []
        for i in range(copies):
            w = jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16)
            q = nv.quantize(w, axis=0)  # stored [N, K/2], as TorchGemm takes it
            weights.append(torch_kernel.TorchGemm(q.data, q.scales, q.tensor_scale, None))
        dense = [
            torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
            for _ in range(common.copies_for(n * k * 2))
        ]
        for m in args.m:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            t_bf16 = kernel_us(
                lambda x=x, dense=dense: [F.linear(x, w) for w in dense],
                len(dense),
                args.iterations,
            )
            base = gemm.default_config(m, n, k, stream_k=False)  # (as TorchGemm asks)
            policies = {
                "no split": gemm.default_config(m, n, k, tuned=False, split_k=False),
                "one kernel": gemm.single_kernel_config(base, m, k, n=n),
                "launch": weights[0].config_for(m, torch.bfloat16),
            }
            row = [m, n, k, t_bf16]
            for cfg in policies.values():
                launchers = [g.launcher_for(cfg, m, torch.bfloat16, x.device) for g in weights]
                rows_k = (launchers[0].rows * cfg.k_fold, k // cfg.k_fold)  # (token, part) rows
                xs = torch.randn(*rows_k, dtype=torch.bfloat16, device="cuda")
                sets = [(xs, l.data, l.scales, g.tensor_scale) for l, g in zip(launchers, weights)]
                apply = launchers[0].apply  # (one compiled kernel serves every copy)
                t = kernel_us(
                    lambda apply=apply, sets=sets: [apply(*a) for a in sets],
                    len(sets),
                    args.iterations,
                )
                row += [t, f"{t_bf16 / t:.2f}x", common.config_label(cfg)]
            rows.append(row)
            print(row, flush=True)
    common.report(
        "torch_launch",
        "GEMM launched from PyTorch (interop.torch_kernel): kernel time vs F.linear bf16",
        ["M", "N", "K", "F.linear bf16", "no split", "vs bf16", "config"]
        + ["one kernel", "vs bf16", "config", "launch", "vs bf16", "config"],
        rows,
        [
            (
                "times in us (CUDA kernel time via torch.profiler, all kernels of a call summed,"
                " mean of 20 rotations over weight copies past 2x L2)"
            )
        ],
    )


if __name__ == "__main__":
    main()
