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
      calibrated range)."""
    data: torch.Tensor
    scale: torch.Tensor
    input_scale: Optional[torch.Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s = self.scale.to(torch.float32)
        s = s.reshape(-1, *([1] * (self.data.dim() - 1))) if s.dim() == 1 else s
        return (self.data.to(torch.float32) * s).to(dtype)


class FP8Rows(NamedTuple):
    """Rows quantized to e4m3: x_hat[r] = float(data[r]) * scale[r]. data (R, K) float8_e4m3fn,
    scale (R,) float32."""
    data: torch.Tensor
    scale: torch.Tensor


@torch.library.register_fake("nemokernels::moe_quantize_fp8")
def _quantize_fake(x, slot_of_row, top_k, input_scale):
    R = slot_of_row.shape[0] if slot_of_row.numel() > 0 else x.shape[0]
    return (x.new_empty((R, x.shape[1]), dtype=torch.float8_e4m3fn), x.new_empty((R,), dtype=torch.float32))


def static_input_scale(input_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The one static activation scale (0-dim float32) of a checkpoint's input_scale (0-dim, (1,)
    or per expert (E,): the max), or None."""
    if input_scale is None:
        return None
    return input_scale.detach().to(torch.float32).reshape(-1).amax()


def quantize_rows_fp8(x: torch.Tensor, input_scale: Optional[torch.Tensor] = None, plan=None) -> FP8Rows:
    """Rows of x (T, K) (fp32/fp16/bf16) to e4m3 with one float32 scale per row:
    scale = amax(|x[r]|) / 448 (1 for a zero row), or the static input_scale (0-dim float32) when
    given; data = e4m3(x / scale), round to nearest even, saturating at +-448 (NaN stays NaN).
    With a MoEPlan ``plan`` the rows are gathered first, in one pass (moe_gather's rows:
    xs[r] = x[slot_of_row[r] // top_k], padding rows zeros with scale 1). Not differentiable."""
    if plan is not None:
        slot_of_row, top_k = plan.slot_of_row, plan.top_k
    else:
        slot_of_row, top_k = x.new_empty((0,), dtype=torch.int32), 1
    s = x.new_empty((0,), dtype=torch.float32) if input_scale is None else static_input_scale(input_scale).to(x.device)
    data, scale = _ops.moe_quantize_fp8(x, slot_of_row, int(top_k), s)
    return FP8Rows(data, scale)
