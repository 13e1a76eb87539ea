"""Grouped GEMM over experts: the interface the rest of the MoE pipeline calls.

``grouped_gemm(a, w, expert_offsets, activation="none")``

- a: (R, K) rows in expert-contiguous order (fp32, fp16 or bf16).
- w: (E, N, K) expert weights, the checkpoint's layout ((E, F, l) for up, (E, l, F) for down),
  same dtype as a.
- expert_offsets: (E + 1,) int32, non-decreasing, offsets[0] == 0, offsets[E] <= R. Rows
  [offsets[e], offsets[e+1]) belong to expert e; rows from offsets[E] to R belong to no expert
  and come out as zeros.
- activation: "none" or "relu2" (relu(.)^2 fused into the epilogue).
- returns (R, N) in a's dtype: out[r] = act(a[r] @ w[e(r)].T), accumulated in float32.

Differentiable in a and w. This file holds the PyTorch stand-in (loop over experts); the
custom op with CPU and CUDA kernels replaces its body without changing the signature.
"""
import torch

_ACTIVATIONS = ("none", "relu2")


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor,
                 activation: str = "none") -> torch.Tensor:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"grouped_gemm: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    offsets = expert_offsets.tolist()
    out = a.new_zeros(a.shape[0], w.shape[1])
    for e in range(w.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            y = (a[lo:hi].float() @ w[e].float().T)
            if activation == "relu2":
                y = torch.relu(y).square()
            out = out.index_copy(0, torch.arange(lo, hi, device=a.device), y.to(a.dtype))
    return out
