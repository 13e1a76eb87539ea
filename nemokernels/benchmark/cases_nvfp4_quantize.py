"""NVFP4 cases: quantize variants and dequantize (memory-bound: GB/s of bytes read + written
against the copy bandwidth measured in the same run), and NVFP4Linear forward + backward against
nn.Linear in bf16 at the NVFP4 points of docs/design.md section 7 (M in {128, 4096, 16384} tokens against the
Super projections). Until the block-scaled GEMM kernels land, nvfp4.gemm is a PyTorch stand-in
(decode to float32, matmul), so the Linear numbers measure the quantization kernels plus that
stand-in, not the final GEMM.

Baselines of the quantize: a plain PyTorch implementation of the same format (float32 math,
E2M1 rounding by thresholds, torch's float8 cast for the scales), eager and compiled.
"""
import torch

from nemokernels.nvfp4 import dequantize, quantize, quantize_t
from nemokernels.nvfp4.linear import nvfp4_linear

from .harness import Case, lazy_compile

DTYPE = torch.bfloat16
# Super projections (in -> out) from docs/design.md section 7.
PROJECTIONS = [(4096, 1024), (1024, 2688), (2688, 1024), (4096, 4096), (4096, 131072)]
TOKENS = (128, 4096, 16384)
_THRESH = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def torch_quantize_1x16(x: torch.Tensor):
    """The 1x16 NVFP4 quantization in plain PyTorch ops (the eager / compiled baseline)."""
    R, K = x.shape
    xf = x.float().reshape(R, K // 16, 16)
    amax = xf.abs().amax()
    s_enc = torch.where(amax > 0, 2688.0 / amax, torch.ones_like(amax))
    sb = ((xf.abs().amax(-1) / 6.0) * s_enc).clamp(max=448.0).to(torch.float8_e4m3fn)
    sbf = sb.float()
    inv = torch.where(sbf > 0, s_enc / sbf, torch.zeros_like(sbf))
    y = xf * inv[..., None]
    m = y.abs()
    th = torch.tensor(_THRESH, device=x.device)
    mag = torch.bucketize(m, th, right=False)  # ties of the RNE thresholds are ignored here
    code = (mag | ((y < 0) & (mag > 0)).long() << 3).to(torch.uint8).reshape(R, K)
    return code[:, 0::2] | (code[:, 1::2] << 4), sb, 1.0 / s_enc


def _q(**kw):
    def run(x):
        return quantize(x, **kw)
    return run


def _qt(**kw):
    def run(x):
        return quantize_t(x, **kw)
    return run


def _dq(t):
    return dequantize(t, DTYPE)


def _lin_ours(x, w, b, dy):
    y = nvfp4_linear(x, w, b, hadamard=True, stochastic_rounding=True, seed_dgrad=1, seed_wgrad=2)
    return torch.autograd.grad(y, (x, w, b), dy)


def _lin_bf16(x, w, b, dy):
    y = torch.nn.functional.linear(x, w, b)
    return torch.autograd.grad(y, (x, w, b), dy)


def _x_maker(rows, cols, device):
    return lambda: (torch.randn(rows, cols, device=device, dtype=DTYPE),)


def _dq_maker(rows, cols, device):
    return lambda: (quantize(torch.randn(rows, cols, device=device, dtype=DTYPE)),)


def _lin_maker(m, k, n, device):
    def make():
        x = torch.randn(m, k, device=device, dtype=DTYPE, requires_grad=True)
        w = (torch.randn(n, k, device=device, dtype=DTYPE) / k ** 0.5).requires_grad_()
        b = torch.zeros(n, device=device, dtype=DTYPE, requires_grad=True)
        return x, w, b, torch.randn(m, n, device=device, dtype=DTYPE)
    return make


def quant_bytes(rows: int, cols: int, esize: int = 2) -> int:
    """Input read once, packed codes + E4M3 scales + the global scale written: the bytes that
    must move. A case that computes the amax reads x twice (docs/nvfp4.md, issue 18 section),
    so its % of copy tops out near 2.5625 / 4.5625 = 56% for bf16; the given-amax case does not."""
    return rows * cols * esize + rows * cols // 2 + rows * cols // 16 + 4


def cases(quick: bool, device) -> list:
    out = []
    # Activations (tokens x hidden) and weights (out x in).
    cpu = torch.device(device).type == "cpu"
    qshapes = [(256, 1024) if cpu else (4096, 4096)] if quick else [(m, k) for m in TOKENS for k in (1024, 2688, 4096)] + \
        [(n, k) for k, n in PROJECTIONS]
    for rows, cols in qshapes:
        name = f"{rows}x{cols} bf16"
        nbytes = quant_bytes(rows, cols)
        mk = _x_maker(rows, cols, device)
        out.append(Case(op="nvfp4.quantize 1x16", name=name, make_inputs=mk, fn=_q(), bytes=nbytes, flops=0,
                        baselines={"torch_eager": torch_quantize_1x16,
                                   "torch_compile": lazy_compile(torch_quantize_1x16)}))
        out.append(Case(op="nvfp4.quantize 1x16 SR", name=name, make_inputs=mk,
                        fn=_q(stochastic_rounding=True, seed=1), bytes=nbytes, flops=0))
        out.append(Case(op="nvfp4.quantize 16x16", name=name, make_inputs=mk, fn=_q(block_2d=True),
                        bytes=nbytes, flops=0))
        out.append(Case(op="nvfp4.quantize 1x16 given amax", name=name, make_inputs=mk,
                        fn=_q(global_amax=torch.tensor([8.0], device=device)), bytes=nbytes, flops=0))
        if rows % 16 == 0:
            out.append(Case(op="nvfp4.quantize_t RHT SR", name=name, make_inputs=mk,
                            fn=_qt(hadamard=True, stochastic_rounding=True, seed=1), bytes=nbytes, flops=0))
            out.append(Case(op="nvfp4.quantize_t 16x16", name=name, make_inputs=mk, fn=_qt(block_2d=True),
                            bytes=nbytes, flops=0))
        out.append(Case(op="nvfp4.dequantize", name=name, make_inputs=_dq_maker(rows, cols, device), fn=_dq,
                        bytes=quant_bytes(rows, cols), flops=0))
    # NVFP4Linear forward + backward (3 GEMMs) vs the bf16 Linear.
    lpoints = [(128, 1024, 1024) if cpu else (4096, 4096, 4096)] if quick else [(m, k, n) for m in TOKENS for k, n in PROJECTIONS]
    for m, k, n in lpoints:
        # bf16 traffic of the Linear: x, W, dy read, y, dx, dW written (twice for reuse ignored).
        nbytes = 2 * (2 * m * k + 2 * n * k + 2 * m * n)
        out.append(Case(op="NVFP4Linear.fwd_bwd", name=f"M{m} {k}->{n}", make_inputs=_lin_maker(m, k, n, device),
                        fn=_lin_ours, bytes=nbytes, flops=3 * 2 * m * n * k,
                        baselines={"torch_linear_bf16": _lin_bf16}, backward=True))
    return out
