"""NVFP4 GEMM cases (nemokernels.nvfp4.gemm, bf16 out) at the points of docs/design.md section 7: M in {128, 4096,
16384} tokens against the Super projections K -> N (4096 -> 1024, 1024 -> 2688, 2688 -> 1024,
4096 -> 4096, 4096 -> 131072). Operands: random codes, random e4m3 scales, a global scale.

Baselines: torch bf16 matmul of the dequantized operands (x_bf16 @ w_bf16.T, cuBLAS; the
target to beat: ~0.9x of it on H100 for the in-register-dequantizing fallback, well above it
on sm_100 where the tensor cores take FP4 natively), and the PyTorch decode + matmul
reference (gemm_reference in float32 math). On a CPU only the smallest points run (a quick CPU
run: one CPU-sized point, M64 K1024 N1024).
"""
import torch

from nemokernels import nvfp4
from nemokernels.nvfp4 import NVFP4Tensor
from nemokernels.nvfp4.reference import decode_reference, gemm_reference

from .harness import Case

PROJECTIONS = [(4096, 1024), (1024, 2688), (2688, 1024), (4096, 4096), (4096, 131072)]  # (K, N)
TOKENS = (128, 4096, 16384)


def _rand_nvfp4(rows, K, device):
    data = torch.randint(0, 256, (rows, K // 2), dtype=torch.uint8, device=device)
    scales = torch.randint(0x20, 0x50, (rows, K // 16), dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
    return NVFP4Tensor(data, scales, torch.tensor(0.01, device=device))


def _maker(M, N, K, device):
    def make():
        a, b = _rand_nvfp4(M, K, device), _rand_nvfp4(N, K, device)
        # bf16 copies of the dequantized operands for the cuBLAS baseline (exact in bf16)
        return a, b, decode_reference(a, torch.float32).bfloat16(), decode_reference(b, torch.float32).bfloat16()
    return make


def _ours(a, b, xb, wb):
    return nvfp4.gemm(a, b, torch.bfloat16)


def _torch_bf16(a, b, xb, wb):
    return xb @ wb.T


def _reference(a, b, xb, wb):
    return gemm_reference(a, b, torch.bfloat16, compute_dtype=torch.float32)


def gemm_bytes_flops(M, N, K):
    """Packed codes and scales of A and B read once, bf16 (M, N) written once; 2 M N K flops."""
    return (M + N) * (K // 2 + K // 16) + 2 * M * N + 8, 2 * M * N * K


def cases(quick: bool, device) -> list:
    device = torch.device(device)
    if device.type != "cuda":
        points = [(64, 1024, 1024)] if quick else [(128, N, K) for K, N in PROJECTIONS if N <= 4096]
    elif quick:
        points = [(128, 4096, 4096), (128, 2688, 1024), (4096, 4096, 4096), (16384, 1024, 4096)]
    else:
        points = [(M, N, K) for M in TOKENS for K, N in PROJECTIONS]
    out = []
    for M, N, K in points:
        nbytes, flops = gemm_bytes_flops(M, N, K)
        baselines = {"torch bf16 matmul": _torch_bf16}
        if M * N <= 4096 * 4096:
            baselines["pytorch decode+matmul"] = _reference
        out.append(Case(op="nvfp4.gemm", name=f"M{M} K{K} N{N}", make_inputs=_maker(M, N, K, device), fn=_ours,
                        bytes=nbytes, flops=flops, baselines=baselines))
    return out
