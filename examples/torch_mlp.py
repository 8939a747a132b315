"""Quantize a PyTorch MLP and transformer layer to NVFP4 and compare with the original.

Builds (random weights) a 2-layer MLP 1024 -> 4096 -> 1024 and an nn.TransformerEncoderLayer
(d_model 1024, 16 heads, feed-forward 4096), bf16, runs them on CUDA when available (else CPU),
replaces their nn.Linear layers with interop.NVFP4Linear (weight-only NVFP4, run by
nvfp4_jax) and prints relative output error, weight memory and time per forward. Then trains
LoRA adapters through two quantized layers (autograd reaches NVFP4Linear's input).

Run (needs torch: pip install -e '.[torch]'):  python examples/torch_mlp.py [--tokens 256]
"""

import argparse
import copy
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import torch
from torch import nn

import interop


def mlp(d=1024, hidden=4096):
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


def encoder_layer(d=1024, hidden=4096, heads=16):
    return nn.TransformerEncoderLayer(
        d, heads, dim_feedforward=hidden, dropout=0.0, batch_first=True
    )


def weight_mib(model):
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def time_forward(model, x, iters, cuda):
    with torch.no_grad():
        for _ in range(3):
            model(x)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                model(x)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        return (time.perf_counter() - t0) / iters * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="batch 4 x tokens/4 sequence")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args()
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if cuda else 'CPU'}")

    torch.manual_seed(0)
    x = torch.randn(4, args.tokens // 4, 1024, dtype=torch.bfloat16, device=device)
    rows = []
    for name, build in [("MLP 1024-4096-1024", mlp), ("TransformerEncoderLayer", encoder_layer)]:
        dense = build().to(device=device, dtype=torch.bfloat16).eval()
        quant = copy.deepcopy(dense)
        report = interop.quantize_model_(quant)
        print(f"{name}: {report}")
        with torch.no_grad():
            ref, out = dense(x).float(), quant(x).float()
        err = ((out - ref).norm() / ref.norm()).item()
        t_dense = time_forward(dense, x, args.iters, cuda)
        t_quant = time_forward(quant, x, args.iters, cuda)
        rows.append((name, weight_mib(dense), weight_mib(quant), err, t_dense, t_quant))

    print()
    print(
        f"{'model':26s} {'bf16 MiB':>9s} {'nvfp4 MiB':>10s} {'rel err':>8s} "
        f"{'bf16 ms':>8s} {'nvfp4 ms':>9s} {'speedup':>8s}"
    )
    for name, mib_d, mib_q, err, t_d, t_q in rows:
        print(
            f"{name:26s} {mib_d:9.1f} {mib_q:10.1f} {err:8.4f} {t_d:8.3f} {t_q:9.3f} {t_d / t_q:7.2f}x"
        )
    print(
        "(rel err = ||y_nvfp4 - y_bf16|| / ||y_bf16||: NVFP4 weight rounding, ~0.1 per layer "
        "on Gaussian weights; the attention projections stay bf16)"
    )
    lora_demo(device)


class LoRA(nn.Module):
    """``base(x) + x @ Aᵀ @ Bᵀ``: a trainable rank-``r`` adapter on a frozen layer."""

    def __init__(self, base, r=16):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(r, base.in_features) / base.in_features**0.5)
        self.b = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + (x.float() @ self.a.T @ self.b.T).to(x.dtype)


def lora_demo(device, steps=30):
    """Gradients flow through NVFP4Linear to its input: LoRA adapters on the two quantized
    layers of an MLP learn to pull its output back towards the bf16 model's."""
    torch.manual_seed(1)
    dense = mlp(256, 1024).to(device=device, dtype=torch.bfloat16)
    quant = copy.deepcopy(dense)
    interop.quantize_model_(quant)
    quant[0], quant[2] = LoRA(quant[0]), LoRA(quant[2])
    x = torch.randn(64, 256, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        target = dense(x).float()
    opt = torch.optim.Adam([p for p in quant.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        x_in = x.clone().requires_grad_()  # the layers' input gradient is exercised too
        loss = (quant(x_in).float() - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(
        f"\nLoRA (rank 16) on the quantized 256-1024-256 MLP, {steps} Adam steps: "
        f"MSE to the bf16 output {losses[0]:.2e} -> {losses[-1]:.2e}"
    )
    return losses


if __name__ == "__main__":
    main()
