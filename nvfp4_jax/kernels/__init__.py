"""Pallas Mosaic GPU kernels, one family per module: ``quantize`` (quantize, fused fake
quantization), ``dequantize`` (dequantize, pack/unpack) and ``gemm`` (weight-only matmul).
Each is tested bit-for-bit (or by float64 error, for the GEMM) against ``reference.py``."""
