"""FP8 (e4m3) expert weights and row-quantized activations: the Model Optimizer scheme of the
released FP8 checkpoints (per-tensor weight scale, per-token or static activation scale).

Details: docs/moe.md, section `nemokernels/moe/fp8.py`."""
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

_ops = torch.ops.nemokernels

E4M3_MAX = 448.0


@dataclass
class FP8Tensor:
    """FP8 weights: w_hat[e] = float(data[e]) * scale[e].

    - data: float8_e4m3fn (E, N, K) (or (N, K) for one matrix);
    - scale: float32, (E,) one per expert or 0-dim shared (the checkpoint's ``weight_scale``);
    - input_scale: float32 0-dim or None. None: activations are quantized per row with a dynamic
      scale (amax / 448); given: with this static scale (the checkpoint's ``input_scale``; a
      per-expert (E,) one is reduced to its max, the one scale that saturates no expert's
      calibrated range);
    - data_t: the codes transposed, (E, K, N), or None: the FP8 training backward's dgrad operand
      (fp8_weights makes it).
    Per-block scales (DeepSeek-style checkpoints' ``weight_scale_inv``): scale (E, ceil(N / 128),
    K / 128), one per 128 x 128 block (fp8_block_weights makes them); the activations then get a
    dynamic scale per row and 128-column block (input_scale must be None)."""
    data: torch.Tensor
    scale: torch.Tensor
    input_scale: Optional[torch.Tensor] = None
    data_t: Optional[torch.Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def blockwise(self) -> bool:
        """Per-block (128 x 128) scales rather than one per expert."""
        return self.scale.dim() == self.data.dim() and self.scale.dim() >= 2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s = self.scale.to(torch.float32)
        if self.blockwise:
            N, K = self.data.shape[-2:]
            s = s.repeat_interleave(128, dim=-2)[..., :N, :].repeat_interleave(128, dim=-1)[..., :K]
        elif s.dim() == 1:
            s = s.reshape(-1, *([1] * (self.data.dim() - 1)))
        return (self.data.to(torch.float32) * s).to(dtype)


class FP8Rows(NamedTuple):
    """Rows quantized to e4m3: x_hat[r] = float(data[r]) * scale[r]. data (R, K) float8_e4m3fn,
    scale (R,) float32."""
    data: torch.Tensor
    scale: torch.Tensor


@torch.library.register_fake("nemokernels::moe_quantize_fp8_t")
def _quantize_t_fake(x, expert_offsets):
    R, C, E = x.shape[0], x.shape[1], expert_offsets.shape[0] - 1
    W = (R + 15) // 16 * 16 + 16 * E
    return x.new_empty((C, W), dtype=torch.float8_e4m3fn), x.new_empty((C,), dtype=torch.float32)


@torch.library.register_fake("nemokernels::grouped_gemm_fp8_wgrad")
def _wgrad_fake(gT, g_scale, aT, a_scale, expert_offsets, out_dtype):
    return gT.new_empty((expert_offsets.shape[0] - 1, gT.shape[0], aT.shape[0]), dtype=out_dtype)


@torch.library.register_fake("nemokernels::moe_quantize_fp8")
def _quantize_fake(x, slot_of_row, top_k, input_scale, block=0):
    R = slot_of_row.shape[0] if slot_of_row.numel() > 0 else x.shape[0]
    scale_shape = (R, x.shape[1] // block) if block else (R,)
    return (x.new_empty((R, x.shape[1]), dtype=torch.float8_e4m3fn), x.new_empty(scale_shape, dtype=torch.float32))


def static_input_scale(input_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The one static activation scale (0-dim float32) of a checkpoint's input_scale (0-dim, (1,)
    or per expert (E,): the max), or None."""
    if input_scale is None:
        return None
    return input_scale.detach().to(torch.float32).reshape(-1).amax()


def quantize_rows_fp8(x: torch.Tensor, input_scale: Optional[torch.Tensor] = None, plan=None,
                      block: int = 0) -> FP8Rows:
    """Rows of x (T, K) (fp32/fp16/bf16) to e4m3 with one float32 scale per row:
    scale = amax(|x[r]|) / 448 (1 for a zero row), or the static input_scale (0-dim float32) when
    given; data = e4m3(x / scale), round to nearest even, saturating at +-448 (NaN stays NaN).
    With a MoEPlan ``plan`` the rows are gathered first, in one pass (moe_gather's rows:
    xs[r] = x[slot_of_row[r] // top_k], padding rows zeros with scale 1). block 128: a dynamic
    scale per row and 128-column block instead, scale (R, K / 128) (per-block FP8 weights take
    these). Not differentiable."""
    if plan is not None:
        slot_of_row, top_k = plan.slot_of_row, plan.top_k
    else:
        slot_of_row, top_k = x.new_empty((0,), dtype=torch.int32), 1
    s = x.new_empty((0,), dtype=torch.float32) if input_scale is None else static_input_scale(input_scale).to(x.device)
    data, scale = _ops.moe_quantize_fp8(x, slot_of_row, int(top_k), s, int(block))
    return FP8Rows(data, scale)


def _scale_of_amax(amax: torch.Tensor) -> torch.Tensor:
    """csrc/moe/numerics.cuh's fp8_row_scale on a tensor of amaxes: amax / 448, at least the smallest
    normal float, 1 for 0, NaN for a non-finite amax."""
    scale = torch.where(amax == 0, torch.ones_like(amax), (amax / E4M3_MAX).clamp_min(1.17549435e-38))
    return torch.where(torch.isfinite(amax), scale, torch.full_like(amax, float("nan")))


def fp8_weights(w: torch.Tensor, transpose: bool = True) -> FP8Tensor:
    """Weights (E, N, K) (or (N, K): one expert) in 16 or 32 bits to an FP8Tensor with one scale
    per expert, as fp8_row_scale: amax / 448 (at least the smallest normal float; 1 for zeros),
    the codes and, with transpose, their transpose (data_t, the FP8 training backward's dgrad
    operand). For training, call it once per optimizer step and pass the result to
    grouped_gemm_fp8_training (quantizing Super's experts reads 2.8 GB per projection). Non-finite
    weights raise on the CPU; on CUDA (no host sync) their expert's codes and scale are NaN."""
    w3 = w.detach() if w.dim() == 3 else w.detach().unsqueeze(0)
    E, N, K = w3.shape
    amax = w3.abs().amax(dim=(1, 2)).to(torch.float32) if w3.numel() else torch.zeros(E, device=w.device)
    if amax.device.type == "cpu" and not torch.isfinite(amax).all():
        bad = int((~torch.isfinite(amax)).nonzero()[0])
        raise ValueError(f"fp8_weights: expert {bad} has non-finite weights (amax {float(amax[bad])})")
    scale = _scale_of_amax(amax)
    empty_i = torch.empty(0, dtype=torch.int32, device=w.device)
    data, _ = _ops.moe_quantize_fp8(w3.reshape(E * N, K), empty_i, 1, scale)
    data = data.view(E, N, K)
    return FP8Tensor(data, scale, None, data.transpose(1, 2).contiguous() if transpose else None)


def fp8_block_weights(w: torch.Tensor) -> FP8Tensor:
    """Weights (E, N, K) (or (N, K)), K % 128 == 0, to an FP8Tensor with a scale per 128 x 128 block
    (amax / 448 as fp8_row_scale, 1 for a zero block): DeepSeek-style per-block FP8. Works in
    float32 on a copy of w (for checkpoints and tests, not per step)."""
    w3 = (w.detach() if w.dim() == 3 else w.detach().unsqueeze(0)).to(torch.float32)
    E, N, K = w3.shape
    if K % 128:
        raise ValueError(f"fp8_block_weights: K must be a multiple of 128, got {K}")
    NB, KB = (N + 127) // 128, K // 128
    padded = torch.nn.functional.pad(w3, (0, 0, 0, NB * 128 - N))
    amax = padded.abs().view(E, NB, 128, KB, 128).amax(dim=(2, 4))
    scale = _scale_of_amax(amax)
    full = scale.repeat_interleave(128, dim=1)[:, :N].repeat_interleave(128, dim=2)
    data = (w3 / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    if w.dim() == 2:
        return FP8Tensor(data[0], scale[0])
    return FP8Tensor(data, scale)


@dataclass
class FP8Training:
    """Master weights (E, N, K) to train through FP8 GEMMs: grouped_gemm(a, FP8Training(w), ...)
    runs grouped_gemm_fp8_training(a, w, ..., w_fp8=fp8). fp8: the step's fp8_weights(w), made
    once per optimizer step by the caller, or None (made on every call)."""
    master: torch.Tensor
    fp8: Optional[FP8Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return self.master.shape


class _Fp8Training(torch.autograd.Function):
    """grouped_gemm_fp8_training: the forward on e4m3 operands, the backward's dgrad and wgrad as
    FP8 GEMMs too; gradients pass the quantizers unchanged (straight-through)."""

    @staticmethod
    def forward(ctx, a, w, expert_offsets, activation, w_fp8):
        relu2 = activation == "relu2"
        rows = quantize_rows_fp8(a)
        keep_pre = relu2 and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        out, pre = _ops.grouped_gemm_fp8(rows.data, rows.scale, w_fp8.data, w_fp8.scale, expert_offsets, activation,
                                         a.dtype, keep_pre)
        a_t = _ops.moe_quantize_fp8_t(a, expert_offsets) if ctx.needs_input_grad[1] else (None, None)
        ctx.relu2, ctx.a_dtype, ctx.w_dtype = relu2, a.dtype, w.dtype
        ctx.save_for_backward(expert_offsets, pre if relu2 else None, a_t[0], a_t[1], w_fp8.data_t, w_fp8.scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        offsets, pre, aT, a_scale, w_t, w_scale = ctx.saved_tensors
        dout = dout.contiguous()
        g = (dout.float() * 2 * torch.relu(pre.float())).to(dout.dtype) if ctx.relu2 else dout
        da = dw = None
        if ctx.needs_input_grad[0]:
            rows = quantize_rows_fp8(g)
            da, _ = _ops.grouped_gemm_fp8(rows.data, rows.scale, w_t, w_scale, offsets, "none", ctx.a_dtype, False)
        if ctx.needs_input_grad[1]:
            gT, g_scale = _ops.moe_quantize_fp8_t(g, offsets)
            out_dtype = ctx.w_dtype if ctx.w_dtype in (torch.bfloat16, torch.float32) else torch.float32
            dw = _ops.grouped_gemm_fp8_wgrad(gT, g_scale, aT, a_scale, offsets, out_dtype).to(ctx.w_dtype)
        return da, dw, None, None, None


def grouped_gemm_fp8_training(a: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor,
                              activation: str = "none", w_fp8: Optional[FP8Tensor] = None) -> torch.Tensor:
    """grouped_gemm for FP8 training: out[r] = act(a_hat[r] @ w_hat[e]^T) on e4m3 operands (a's rows
    with a dynamic scale each, w with one per expert: fp8_weights(w), or w_fp8 when the caller made
    it once for the step), float32 sums, out in a's dtype. Differentiable in a and w (the master
    weights, (E, N, K) in any float dtype): the backward is FP8 too, with gradients passing the
    quantizers unchanged (straight-through), as TransformerEngine's current-scaling recipe:
    - dgrad da = g_hat @ w_hat, g's rows quantized with a scale each, w's transposed codes;
    - wgrad dw[e] = g_hat[seg]^T a_hat[seg], both quantized column-wise (a scale per channel over
      all rows) and transposed (moe_quantize_fp8_t), dw in w's dtype;
    g = dout, or round(dout * 2 * relu(pre)) after relu^2 (pre: the forward's scaled accumulator).
    The wgrad's column scales span every expert's rows (one per channel), coarser across experts
    than TransformerEngine's per-expert tensors: a rarely routed expert's small gradients can fall
    below e4m3's range there. Without a gradient to compute, the forward alone runs."""
    if activation not in ("none", "relu2"):
        raise ValueError(f"grouped_gemm_fp8_training: activation must be 'none' or 'relu2', got {activation!r}")
    if w.dim() != 3:
        raise ValueError(f"grouped_gemm_fp8_training: w must be (E, N, K), got shape {tuple(w.shape)}")
    if not (torch.is_grad_enabled() and (a.requires_grad or w.requires_grad)):
        # no gradient asked (evaluation): the forward alone, no pre-activation, transposes or data_t
        wq = w_fp8 if w_fp8 is not None else fp8_weights(w, transpose=False)
        rows = quantize_rows_fp8(a)
        return _ops.grouped_gemm_fp8(rows.data, rows.scale, wq.data, wq.scale, expert_offsets, activation, a.dtype,
                                     False)[0]
    if w_fp8 is None:
        w_fp8 = fp8_weights(w)
    if w_fp8.data_t is None:
        raise ValueError("grouped_gemm_fp8_training: w_fp8 needs data_t (make it with fp8_weights)")
    if tuple(w_fp8.data.shape) != tuple(w.shape):
        raise ValueError(f"grouped_gemm_fp8_training: w_fp8 is {tuple(w_fp8.data.shape)}, w is {tuple(w.shape)}")
    return _Fp8Training.apply(a, w, expert_offsets, activation, w_fp8)
