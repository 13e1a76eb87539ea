"""rmsnorm_gated: drop-in for mamba_ssm's gated RMSNorm
(`mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn` and its `RMSNorm` module, which Mamba-2
imports as `RMSNormGated`), forward and backward fused.

Shapes: x (..., D) with any leading dims and any strides (a last-dim stride of 1 and 16-byte
aligned rows take the vectorised CUDA path); weight (D,); bias (D,) or None; z like x (same
shape and dtype) or None; group_size divides D (None: D, one group per row). x and z in
float32 / float16 / bfloat16, weight and bias in any of those; math in float32, output in x's
dtype. Schemas: csrc/ssd/ssd_ops.cpp; kernels: csrc/ssd/rmsnorm_gated_*.
"""
from typing import Optional

import torch

_ops = torch.ops.nemokernels


def _ngroups(dim, group_size):
    return dim // group_size if dim > 0 else 0


@torch.library.register_fake("nemokernels::rmsnorm_gated_fwd")
def _fwd_fake(x, weight, bias, z, eps, group_size, norm_before_gate):
    ngroups = _ngroups(x.shape[-1], group_size)
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], ngroups), dtype=torch.float32)


@torch.library.register_fake("nemokernels::rmsnorm_gated_bwd")
def _bwd_fake(dout, x, weight, bias, z, rstd, group_size, norm_before_gate):
    dim = x.shape[-1]
    dbias = bias.new_empty((dim,)) if bias is not None else x.new_empty((0,), dtype=torch.float32)
    dz = x.new_empty(x.shape) if z is not None else x.new_empty((0,))
    return x.new_empty(x.shape), weight.new_empty((dim,)), dbias, dz


def _fwd_setup(ctx, inputs, output):
    x, weight, bias, z, eps, group_size, norm_before_gate = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, bias, z, rstd)
    ctx.group_size = group_size
    ctx.norm_before_gate = norm_before_gate


def _fwd_backward(ctx, dout, drstd):
    # rstd is an auxiliary output saved for the backward; it carries no gradient.
    x, weight, bias, z, rstd = ctx.saved_tensors
    dx, dweight, dbias, dz = _ops.rmsnorm_gated_bwd(dout, x, weight, bias, z, rstd, ctx.group_size,
                                                    ctx.norm_before_gate)
    return (dx, dweight, dbias if bias is not None else None, dz if z is not None else None,
            None, None, None)


torch.library.register_autograd("nemokernels::rmsnorm_gated_fwd", _fwd_backward, setup_context=_fwd_setup)


def rmsnorm_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    group_size: Optional[int] = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Gated RMSNorm over groups of ``group_size`` channels of the last dim.

    Same keywords as mamba_ssm's ``rmsnorm_fn``, but **norm_before_gate defaults to False**
    (how Nemotron-H / Mamba-2 call it; mamba_ssm's default is True). Per group of G channels:

    - ``norm_before_gate=False`` (default), z given: ``u = x * silu(z)``, then
      ``out = u * rstd * weight + bias`` with ``rstd = 1 / sqrt(mean(u^2) + eps)``.
    - ``norm_before_gate=True``: ``out = (x * rstd * weight + bias) * silu(z)``, rstd of x.
    - z None: ``out = x * rstd * weight + bias``.

    x: (..., D); weight, bias: (D,); z: like x; group_size: divides D (None: D).
    Returns ``out`` shaped like x in x's dtype. Differentiable in x, weight, bias and z.
    eps must be finite and >= 0. Every check is a shape / dtype / device check, the same on
    every device. weight and bias are read in their own dtypes (no float32 copy) and their
    gradients come back in them. The CUDA grid is (groups, row blocks) with the row blocks
    capped by the SM count: only more than 2^31 - 1 groups per row could reach a launch limit
    (checked before the launch, with the limit in the message). The CPU path has no limit.
    """
    dim = x.shape[-1]
    gs = dim if group_size is None else group_size
    out, _ = _ops.rmsnorm_gated_fwd(x, weight, bias, z, float(eps), gs, bool(norm_before_gate))
    return out


class RMSNormGated(torch.nn.Module):
    """mamba_ssm's gated ``RMSNorm`` module (``layernorm_gated.RMSNorm``): a weight initialised
    to ones, no bias, ``forward(x, z=None)`` calling :func:`rmsnorm_fn`.
    **norm_before_gate defaults to False** (Nemotron-H / Mamba-2 usage; mamba_ssm's is True)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = False, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
