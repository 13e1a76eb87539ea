"""Grouped GEMM over experts (nemokernels.moe.grouped_gemm), bf16, at the MoE points of docs/design.md section 7:
tokens 1, 64, 512, 4096, 16384 times top-k rows, Super (latent 1024, F 2688, 512 experts, top-22)
and Nano (d 2688, F 1856, 128 experts, top-6), uniform and skewed routing. Segments are padded
to 128 rows per expert (the permutation's pad_to on CUDA) when experts average at least 128
rows; below that padding would multiply the work (decode batches), so segments are unpadded.

The grouped_gemm.nvfp4w.* cases (CUDA) run the same points with NVFP4 expert weights against
our bf16 path and torch._grouped_mm on the same weights decoded to bf16. The grouped_gemm.fp8.*
cases (CUDA) time the FP8 GEMM on rows quantized beforehand (TFLOP/s as a fraction of the e4m3
matmul peak measured in the same run) against: the same call quantizing its bf16 rows itself,
our bf16 path and torch._grouped_mm on the dequantized weights, and torch._scaled_grouped_mm on
the same e4m3 operands and scales where the torch at hand has it. grouped_gemm.fp8_block.* (CUDA, K
% 128 == 0) does the same with per-block (128 x 128) weight scales and per-row-and-block rows.
grouped_gemm.fp8_train.up_relu2.fwd_bwd (CUDA) times FP8 training's forward + backward against our
bf16 forward + backward.

Details: docs/moe.md, section `nemokernels/benchmark/cases_moe_grouped_gemm.py`."""
import torch

from nemokernels.moe import grouped_gemm

from .harness import Case

DTYPE = torch.bfloat16
PAD = 128
# (hidden of the GEMM (latent l or d), F, experts, top-k) per docs/design.md section 7
CONFIGS = {"super": (1024, 2688, 512, 22), "nano": (2688, 1856, 128, 6)}
# A quick CPU run's one point: the model configurations' weights alone are GBs.
CPU_QUICK = {"cpu-small": (512, 1024, 16, 4)}


def expert_counts(tokens: int, E: int, k: int, routing: str, seed: int = 0) -> list:
    """Rows per expert: each token picks k distinct experts from (biased) random scores."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, E, generator=g)
    if routing == "skewed":  # Zipf-like popularity: expert i weighted by 1 / (i + 1)
        scores = scores * (1.0 / torch.arange(1, E + 1, dtype=torch.float32)) ** 0.5
        scores = scores[:, torch.randperm(E, generator=g)]
    ids = scores.topk(k, dim=1).indices
    return torch.bincount(ids.flatten(), minlength=E).tolist()


def padded_offsets(counts: list, pad: int = PAD):
    """(E + 1,) cumulative offsets with each segment padded to a multiple of `pad`; padding rows
    belong to their expert (as the permutation lays them out)."""
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + (c + pad - 1) // pad * pad)
    return offs


def _ours(act):
    def run(a, w, offsets, offs_host):
        return grouped_gemm(a, w, offsets, act)
    return run


def _torch_loop(act):
    def run(a, w, offsets, offs_host):
        out = a.new_zeros(a.shape[0], w.shape[1])
        for e in range(w.shape[0]):
            lo, hi = offs_host[e], offs_host[e + 1]
            if hi > lo:
                y = torch.mm(a[lo:hi], w[e].T)
                out[lo:hi] = torch.relu(y).square() if act == "relu2" else y
        return out
    return run


def _torch_grouped_mm(act):
    def run(a, w, offsets, offs_host):
        y = torch._grouped_mm(a, w.transpose(1, 2), offs=offsets[1:])
        return torch.relu(y).square() if act == "relu2" else y
    return run


def _dense_same_flops(rows):
    def run(a, w, offsets, offs_host):
        return torch.mm(a[:rows], w[0].T)
    return run


def _fwd_bwd(fn):
    def run(a, w, offsets, offs_host, dout):
        return torch.autograd.grad(fn(a, w, offsets, offs_host), (a, w), dout)
    return run


def _maker(offs, N, K, E, device, backward):
    R = offs[-1]

    def make():
        a = torch.randn(R, K, device=device, dtype=DTYPE)
        w = torch.randn(E, N, K, device=device, dtype=DTYPE) / K**0.5
        offsets = torch.tensor(offs, dtype=torch.int32, device=device)
        if not backward:
            return a, w, offsets, offs
        return (a.requires_grad_(), w.requires_grad_(), offsets, offs,
                torch.randn(R, N, device=device, dtype=DTYPE))
    return make


def _nvfp4_maker(offs, N, K, E, device):
    """bf16 tokens and NVFP4 expert weights (random codes, scales 2^-3..2^2, a global scale per
    expert), plus the same weights decoded to bf16 for the bf16 baselines."""
    from ..nvfp4 import NVFP4Tensor
    from ..nvfp4.reference import decode_reference
    R = offs[-1]

    def make():
        a = torch.randn(R, K, device=device, dtype=DTYPE)
        data = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, device=device)
        scales = torch.randint(0x20, 0x48, (E, N, K // 16), dtype=torch.uint8, device=device)
        glob = torch.full((E,), 1.0 / K**0.5, device=device)
        w = NVFP4Tensor(data, scales.view(torch.float8_e4m3fn), glob)
        w16 = torch.stack([decode_reference(NVFP4Tensor(data[e], w.scales[e], glob[e]), torch.float32).to(DTYPE)
                           for e in range(E)])
        offsets = torch.tensor(offs, dtype=torch.int32, device=device)
        return a, (w, w16), offsets, offs
    return make


def _nvfp4_ours(act):
    def run(a, ws, offsets, offs_host):
        with torch.no_grad():
            return grouped_gemm(a, ws[0], offsets, act)
    return run


def _on_bf16(fn):
    def run(a, ws, offsets, offs_host):
        return fn(a, ws[1], offsets, offs_host)
    return run


def _fp8_maker(offs, N, K, E, device):
    """bf16 tokens and their FP8 rows (quantized once: the GEMM alone is timed), FP8 expert weights
    with a scale per expert (amax / 448 of random bf16 weights), and those weights dequantized to
    bf16 for the bf16 baselines."""
    from ..moe import FP8Tensor, quantize_rows_fp8
    R = offs[-1]

    def make():
        a = torch.randn(R, K, device=device, dtype=DTYPE)
        wq = torch.empty(E, N, K, device=device, dtype=torch.float8_e4m3fn)
        w16 = torch.empty(E, N, K, device=device, dtype=DTYPE)
        scale = torch.empty(E, device=device)
        for e in range(E):  # one expert at a time: float32 copies of all of Super's are 5.6 GB
            w = torch.randn(N, K, device=device) / K**0.5
            scale[e] = w.abs().amax() / 448
            wq[e] = (w / scale[e]).to(torch.float8_e4m3fn)
            w16[e] = (wq[e].float() * scale[e]).to(DTYPE)
        offsets = torch.tensor(offs, dtype=torch.int32, device=device)
        return (a, quantize_rows_fp8(a)), (FP8Tensor(wq, scale), w16), offsets, offs
    return make


def _fp8_block_maker(offs, N, K, E, device):
    """bf16 tokens and their per-block FP8 rows (a scale per row and 128 columns), FP8 weights with a
    scale per 128 x 128 block, and those weights dequantized to bf16 for the bf16 baseline."""
    from ..moe import FP8Tensor, fp8_block_weights, quantize_rows_fp8
    R = offs[-1]

    def make():
        a = torch.randn(R, K, device=device, dtype=DTYPE)
        parts = [fp8_block_weights(torch.randn(N, K, device=device) / K**0.5) for _ in range(E)]
        w = FP8Tensor(torch.stack([p.data for p in parts]), torch.stack([p.scale for p in parts]))
        w16 = torch.stack([p.dequantize(DTYPE) for p in parts])
        offsets = torch.tensor(offs, dtype=torch.int32, device=device)
        return (a, quantize_rows_fp8(a, block=128)), (w, w16), offsets, offs
    return make


def _fp8_train_maker(offs, N, K, E, device):
    """bf16 rows and float32 master weights needing gradients, the step's FP8 weights made once
    (fp8_weights: per-expert scales and the transposed codes), and dout. The bf16 baseline runs on
    the weights cast to bf16."""
    from ..moe import fp8_weights
    R = offs[-1]

    def make():
        a = torch.randn(R, K, device=device, dtype=DTYPE).requires_grad_()
        w = (torch.randn(E, N, K, device=device) / K**0.5).requires_grad_()
        w16 = w.detach().to(DTYPE).requires_grad_()
        offsets = torch.tensor(offs, dtype=torch.int32, device=device)
        return a, (w, fp8_weights(w), w16), offsets, offs, torch.randn(R, N, device=device, dtype=DTYPE)
    return make


def _bf16_train(act):
    """Our bf16 forward + backward on the same weights in bf16 (the FP8 training case's baseline)."""
    def run(a, ws, offsets, offs_host, dout):
        return torch.autograd.grad(grouped_gemm(a, ws[2], offsets, act), (a, ws[2]), dout)
    return run


def _fp8_train(act):
    """grouped_gemm_fp8_training forward + backward (the weights' quantization made beforehand, as
    once per optimizer step)."""
    from ..moe import grouped_gemm_fp8_training

    def run(a, ws, offsets, offs_host, dout):
        out = grouped_gemm_fp8_training(a, ws[0], offsets, act, ws[1])
        return torch.autograd.grad(out, (a, ws[0]), dout)
    return run


def _fp8_ours(act, quantize):
    def run(a, ws, offsets, offs_host):
        with torch.no_grad():
            return grouped_gemm(a[0] if quantize else a[1], ws[0], offsets, act)
    return run


def _fp8_on_bf16(fn):
    def run(a, ws, offsets, offs_host):
        return fn(a[0], ws[1], offsets, offs_host)
    return run


def _torch_scaled_grouped_mm(act):
    """torch._scaled_grouped_mm on the same e4m3 rows (row scales) and weights (a scale per expert
    and output column), bf16 out; relu^2 as a separate op (it has no epilogue for it)."""
    def run(a, ws, offsets, offs_host):
        rows, w = a[1], ws[0]
        col_scale = w.scale[:, None].expand(w.data.shape[0], w.data.shape[1]).contiguous()
        y = torch._scaled_grouped_mm(rows.data, w.data.transpose(1, 2), rows.scale, col_scale, offs=offsets[1:],
                                     out_dtype=torch.bfloat16)
        return torch.relu(y).square() if act == "relu2" else y
    return run


def cases(quick: bool, device) -> list:
    # On a CPU only the small token counts (a 4096-token Super up projection is ~0.5 TFLOP).
    cpu = torch.device(device).type == "cpu"
    big = 64 if cpu else 4096
    tokens_all = (1, 64) if cpu else (1, 64, 512, 4096, 16384)
    points = ([("super", big, "uniform"), ("nano", big, "skewed")] if quick else
              [(cfg, t, r) for cfg in CONFIGS for t in tokens_all for r in ("uniform", "skewed")])
    if cpu and quick:  # a CPU quick run shows the path works: one forward point at CPU size
        points = [("cpu-small", big, "skewed")]
    out = []
    for cfg, tokens, routing in points:
        l, F, E, k = {**CONFIGS, **CPU_QUICK}[cfg]
        counts = expert_counts(tokens, E, k, routing)
        rows = tokens * k
        pad = PAD if rows >= PAD * E else 1
        offs = padded_offsets(counts, pad)
        for gemm, N, K, act in (("up_relu2", F, l, "relu2"), ("down", l, F, "none")):
            name = f"{cfg} T{tokens} {routing} pad{pad} {gemm} R{offs[-1]} N{N} K{K} E{E}"
            w_bytes = sum(1 for c in counts if c) * N * K * 2  # weights of experts with rows
            nbytes = offs[-1] * (K + N) * 2 + w_bytes
            flops = 2 * rows * N * K
            base = {"torch_mm_loop": _torch_loop(act), "torch_grouped_mm": _torch_grouped_mm(act),
                    "dense_mm_same_flops": _dense_same_flops(rows)}
            out.append(Case(op=f"grouped_gemm.{gemm}", name=name, make_inputs=_maker(offs, N, K, E, device, False),
                            fn=_ours(act), bytes=nbytes, flops=flops, baselines=base))
            if not cpu:  # NVFP4 expert weights (W4A16 on sm_90): the weights' bytes at 4.5 bits
                w4_bytes = sum(1 for c in counts if c) * N * K * 9 // 16
                out.append(Case(op=f"grouped_gemm.nvfp4w.{gemm}", name=name,
                                make_inputs=_nvfp4_maker(offs, N, K, E, device), fn=_nvfp4_ours(act),
                                bytes=offs[-1] * (K + N) * 2 + w4_bytes, flops=flops,
                                baselines={"ours_bf16_weights": _on_bf16(_ours(act)),
                                           "torch_grouped_mm_bf16_weights": _on_bf16(_torch_grouped_mm(act))}))
            if not cpu:  # FP8 rows and expert weights (e4m3, W8A8): fraction of the e4m3 peak
                w8_bytes = sum(1 for c in counts if c) * N * K
                out.append(Case(op=f"grouped_gemm.fp8.{gemm}", name=name, make_inputs=_fp8_maker(offs, N, K, E, device),
                                fn=_fp8_ours(act, False), bytes=offs[-1] * (K + 2 * N + 4) + w8_bytes, flops=flops,
                                peak="fp8",
                                baselines={"ours_fp8_quantizing_rows": _fp8_ours(act, True),
                                           "ours_bf16_weights": _fp8_on_bf16(_ours(act)),
                                           "torch_grouped_mm_bf16_weights": _fp8_on_bf16(_torch_grouped_mm(act)),
                                           "torch_scaled_grouped_mm": _torch_scaled_grouped_mm(act)}))
            if not cpu and K % 128 == 0:  # per-block (128 x 128) FP8 scales, DeepSeek-style
                out.append(Case(op=f"grouped_gemm.fp8_block.{gemm}", name=name,
                                make_inputs=_fp8_block_maker(offs, N, K, E, device), fn=_fp8_ours(act, False),
                                bytes=offs[-1] * (K + 2 * N + 4 * K // 128) + w8_bytes, flops=flops, peak="fp8",
                                baselines={"ours_fp8_block_quantizing_rows": _fp8_ours(act, True),
                                           "ours_bf16_weights": _fp8_on_bf16(_ours(act))}))
            if gemm == "up_relu2" and not cpu:  # FP8 training: e4m3 forward, dgrad and wgrad
                out.append(Case(op=f"grouped_gemm.fp8_train.{gemm}.fwd_bwd", name=name,
                                make_inputs=_fp8_train_maker(offs, N, K, E, device), fn=_fp8_train(act),
                                bytes=3 * nbytes, flops=3 * flops, peak="fp8",
                                baselines={"ours_bf16": _bf16_train(act)}, backward=True))
            if gemm == "up_relu2" and not (cpu and quick):
                out.append(Case(op=f"grouped_gemm.{gemm}.fwd_bwd", name=name,
                                make_inputs=_maker(offs, N, K, E, device, True), fn=_fwd_bwd(_ours(act)),
                                bytes=3 * nbytes, flops=3 * flops,
                                baselines={"torch_mm_loop": _fwd_bwd(_torch_loop(act)),
                                           "torch_grouped_mm": _fwd_bwd(_torch_grouped_mm(act))},
                                backward=True))
    return out
