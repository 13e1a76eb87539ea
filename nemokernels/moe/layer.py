"""The Nemotron-H LatentMoE layer (transformers' NemotronHMoE) on the nemokernels MoE ops.

Details: docs/moe.md, section `nemokernels/moe/layer.py`."""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .combine import moe_combine
from .fp8 import FP8Rows, FP8Tensor, FP8Training, quantize_rows_fp8
from .grouped_gemm import grouped_gemm
from .permute import moe_gather, moe_permute_plan
from .router import moe_router, router_logits
from ..nvfp4.tensor import NVFP4Tensor

# Rows per expert are padded to a multiple of this (moe_permute_plan's pad_to). 1 everywhere: every
# grouped GEMM path tiles each expert's segment on its own (a partial last tile, no tile across
# two experts), so padding adds gather, zero-fill and relu^2 bytes and no speed (docs/decisions.md).
PAD_TO = {"cpu": 1, "cuda": 1}


def _relu2(x):
    return torch.relu(x).square()


def is_quantized_weight(w) -> bool:
    """True for an NVFP4Tensor or an FP8Tensor (forward-only expert weights)."""
    return isinstance(w, (NVFP4Tensor, FP8Tensor))


def expert_mlp(x, up_proj, down_proj, offsets: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """down_e(relu(up_e(x))^2) for each expert e's row segment [offsets[e], offsets[e+1]) of x:
    the two grouped GEMMs, relu^2 fused into the first. up_proj / down_proj: tensors in x's dtype,
    NVFP4Tensor or FP8Tensor (forward only). x may be FP8Rows (rows already quantized to e4m3,
    FP8 up_proj): then out_dtype (16-bit or float32) is the dtype of the hidden and output rows."""
    if isinstance(x, FP8Rows) and out_dtype is None:
        raise ValueError("expert_mlp: FP8Rows input needs out_dtype (the dtype of the expert outputs)")
    if (isinstance(up_proj, FP8Tensor) and isinstance(down_proj, FP8Tensor) and down_proj.input_scale is not None
            and not up_proj.blockwise):
        # FP8 up and down with a static input scale: the up GEMM's epilogue writes the down GEMM's
        # e4m3 rows itself (no bf16 intermediate, no quantize pass).
        h = grouped_gemm(x, up_proj, offsets, "relu2", out_dtype=torch.float8_e4m3fn, out_scale=down_proj.input_scale)
        return grouped_gemm(h, down_proj, offsets, out_dtype=out_dtype or x.dtype)
    if isinstance(x, FP8Rows):
        h = grouped_gemm(x, up_proj, offsets, "relu2", out_dtype=out_dtype)
    else:
        h = grouped_gemm(x, up_proj, offsets, "relu2")
    return grouped_gemm(h, down_proj, offsets)


def _local_experts(xs, plan, up_proj, down_proj, out_dtype: Optional[torch.dtype] = None):
    return expert_mlp(xs, up_proj, down_proj, plan.expert_offsets, out_dtype=out_dtype)


def latent_moe(hidden: torch.Tensor, gate_weight: torch.Tensor, e_score_correction_bias: Optional[torch.Tensor],
               up_proj: torch.Tensor, down_proj: torch.Tensor, *, top_k: int, n_group: int = 1,
               topk_group: int = 1, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
               fc1_weight: Optional[torch.Tensor] = None, fc1_bias: Optional[torch.Tensor] = None,
               fc2_weight: Optional[torch.Tensor] = None, fc2_bias: Optional[torch.Tensor] = None,
               shared_up_weight: Optional[torch.Tensor] = None, shared_up_bias: Optional[torch.Tensor] = None,
               shared_down_weight: Optional[torch.Tensor] = None, shared_down_bias: Optional[torch.Tensor] = None,
               pad_to: Optional[int] = None, experts: Optional[Callable] = None,
               fc1: Optional[Callable] = None, fc2: Optional[Callable] = None,
               shared: Optional[Callable] = None, fp8_training: bool = False) -> torch.Tensor:
    """One LatentMoE layer, functional form. hidden (..., d); gate_weight (E, d) float32; up_proj
    (E, F, l) and down_proj (E, l, F) in hidden's dtype (l = d without latent projections), or
    quantized: NVFP4Tensor / FP8Tensor of those shapes (forward only; no dtype autocast; an FP8
    up_proj quantizes the gathered rows in the gather pass, quantize_rows_fp8 with its
    input_scale); fc1 (l, d) / fc2 (d, l) latent projections or None; shared expert weights or
    None. fc1 / fc2 / shared: callables used instead of those weight tensors (quantized dense
    layers: nemokernels.models.quantized.QuantizedLinear; shared(hidden) -> (..., d)).
    fp8_training: the routed experts' GEMMs (forward, dgrad, wgrad) on e4m3 operands, gradients
    to the master weights up_proj / down_proj (grouped_gemm_fp8_training; weights quantized on
    every call).
    experts(xs, plan, up_proj, down_proj) -> ys runs the routed experts on the gathered rows and
    returns their outputs in the same row order (default: expert_mlp over plan.expert_offsets;
    expert parallelism passes its dispatch, distributed/expert_parallel.py).
    Returns (..., d) in hidden's dtype."""
    shape = hidden.shape
    h = hidden.reshape(-1, shape[-1])
    num_experts = gate_weight.shape[0]
    if pad_to is None:
        pad_to = PAD_TO.get(h.device.type, 1)
    logits = router_logits(h, gate_weight)
    ids, weights = moe_router(logits, e_score_correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                              routed_scaling_factor)
    if fc1 is not None:
        lat = fc1(h)
    else:
        lat = F.linear(h, fc1_weight, fc1_bias) if fc1_weight is not None else h
    if fp8_training:  # routed experts trained through FP8 GEMMs (grouped_gemm_fp8_training)
        if is_quantized_weight(up_proj) or is_quantized_weight(down_proj):
            raise ValueError("latent_moe: fp8_training takes the master (float) expert weights, not quantized ones")
        up_proj, down_proj = FP8Training(up_proj), FP8Training(down_proj)
    elif is_quantized_weight(up_proj) or is_quantized_weight(down_proj):
        if torch.is_grad_enabled() and lat.requires_grad:
            raise NotImplementedError("latent_moe: no gradient through quantized (NVFP4 / FP8) expert weights "
                                      "(forward only); run under torch.no_grad() or with inputs that need no "
                                      "gradient")
        # one projection quantized, the other not: the other follows the activations' dtype
        if isinstance(up_proj, torch.Tensor) and up_proj.dtype != lat.dtype:
            up_proj = up_proj.to(lat.dtype)
        if isinstance(down_proj, torch.Tensor) and down_proj.dtype != lat.dtype:
            down_proj = down_proj.to(lat.dtype)
    elif up_proj.dtype != lat.dtype:  # autocast (bf16 activations, float32 master weights), as F.linear
        up_proj, down_proj = up_proj.to(lat.dtype), down_proj.to(lat.dtype)
    plan = moe_permute_plan(ids, num_experts, pad_to)
    run = experts or _local_experts
    if isinstance(up_proj, FP8Tensor):  # the gather and the e4m3 quantization in one pass
        xs = quantize_rows_fp8(lat, up_proj.input_scale, plan, block=128 if up_proj.blockwise else 0)
        ys = run(xs, plan, up_proj, down_proj, out_dtype=lat.dtype)
    else:
        xs = moe_gather(lat, plan)
        ys = run(xs, plan, up_proj, down_proj)
    y = moe_combine(ys, plan, weights)
    if fc2 is not None:
        out = fc2(y)
    else:
        out = F.linear(y, fc2_weight, fc2_bias) if fc2_weight is not None else y
    out = out.reshape(shape)
    if shared is not None:
        out = out + shared(hidden)
    elif shared_up_weight is not None:
        out = out + F.linear(_relu2(F.linear(hidden, shared_up_weight, shared_up_bias)), shared_down_weight,
                             shared_down_bias)
    return out


class MoEGate(nn.Module):
    """The router's parameters, named as the checkpoint (gate.weight, gate.e_score_correction_bias)."""

    def __init__(self, num_experts: int, hidden_size: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32, device=device))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)


class MoEExperts(nn.Module):
    """Expert weights as 3-D tensors, the checkpoint's layout: up_proj (E, F, l), down_proj (E, l, F)."""

    def __init__(self, num_experts: int, in_dim: int, intermediate: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, in_dim, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, in_dim, intermediate, **kw))
        nn.init.normal_(self.up_proj, std=in_dim ** -0.5)
        nn.init.normal_(self.down_proj, std=intermediate ** -0.5)


class QuantizedExpertProj(nn.Module):
    """One projection (up_proj or down_proj) of all experts, quantized, as buffers named after the
    checkpoint's per-expert tensors stacked over experts (experts.{j}.up_proj.weight ->
    experts.up_proj.weight[j]). Forward only. ``quantized()`` builds the kernel's container from
    the buffers (so .to(device) moves it; dtype casts of the module leave the buffers' dtypes:
    keep_buffer_dtypes_apply).

    fmt "nvfp4" (Model Optimizer NVFP4): weight (E, N, K/2) uint8, weight_scale (E, N, K/16)
    float8_e4m3fn, weight_scale_2 (E,) float32 (the NVFP4Tensor's global scale), input_scale (E,)
    float32 when the checkpoint has one (W4A4's activation scale: kept, unused by the W4A16 path).
    fmt "fp8": weight (E, N, K) float8_e4m3fn, weight_scale (E,) float32, input_scale (E,) float32
    (the static activation scale; ``static_input = False`` quantizes rows dynamically instead)."""

    def __init__(self, fmt: str, num_experts: int, out_dim: int, in_dim: int, input_scale: bool = True,
                 static_input: bool = True, device=None):
        super().__init__()
        if fmt not in ("nvfp4", "fp8"):
            raise ValueError(f"QuantizedExpertProj: fmt must be 'nvfp4' or 'fp8', got {fmt!r}")
        E, N, K = num_experts, out_dim, in_dim
        self.fmt, self.static_input = fmt, static_input
        f32 = dict(dtype=torch.float32, device=device)
        if fmt == "nvfp4":
            if K % 16:
                raise ValueError(f"QuantizedExpertProj: NVFP4 needs K % 16 == 0 (one scale per 16 values), got K = {K}")
            self.register_buffer("weight", torch.zeros(E, N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.zeros(E, N, K // 16, dtype=torch.float8_e4m3fn,
                                                             device=device))
            self.register_buffer("weight_scale_2", torch.ones(E, **f32))
        else:
            self.register_buffer("weight", torch.zeros(E, N, K, dtype=torch.float8_e4m3fn, device=device))
            self.register_buffer("weight_scale", torch.ones(E, **f32))
        if input_scale:
            self.register_buffer("input_scale", torch.ones(E, **f32))
        else:
            self.input_scale = None

    @property
    def shape(self) -> torch.Size:
        w = self.weight
        return torch.Size((w.shape[0], w.shape[1], w.shape[2] * (2 if self.fmt == "nvfp4" else 1)))

    def quantized(self):
        if self.fmt == "nvfp4":
            return NVFP4Tensor(self.weight, self.weight_scale, self.weight_scale_2)
        return FP8Tensor(self.weight, self.weight_scale, self.input_scale if self.static_input else None)

    def _apply(self, fn, recurse=True):
        return keep_buffer_dtypes_apply(self, fn, recurse)


def keep_buffer_dtypes_apply(module: nn.Module, fn, recurse=True):
    """Module._apply for modules holding quantized buffers: parameters as usual, buffers only
    moved (a dtype cast such as model.to(torch.bfloat16) would corrupt codes and scales)."""
    bufs = module.__dict__["_buffers"]
    module.__dict__["_buffers"] = {}
    try:
        nn.Module._apply(module, fn, recurse)
    finally:
        module.__dict__["_buffers"] = bufs
    for name, b in bufs.items():
        if b is not None:
            out = fn(b)
            bufs[name] = out if out.dtype == b.dtype else b.to(device=out.device)
    return module


class QuantizedExperts(nn.Module):
    """MoEExperts with quantized weights: up_proj / down_proj are QuantizedExpertProj modules."""

    def __init__(self, up_proj: QuantizedExpertProj, down_proj: QuantizedExpertProj):
        super().__init__()
        self.up_proj = up_proj
        self.down_proj = down_proj


def _weights(w):
    """An expert projection as latent_moe takes it: a tensor, or a quantized module's container."""
    return w.quantized() if isinstance(w, nn.Module) else w


class SharedMLP(nn.Module):
    """The shared expert: down_proj(relu(up_proj(x))^2)."""

    def __init__(self, hidden_size: int, intermediate: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate, bias=bias, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden_size, bias=bias, dtype=dtype, device=device)

    def forward(self, x):
        return self.down_proj(_relu2(self.up_proj(x)))


class LatentMoE(nn.Module):
    """Drop-in for transformers' NemotronHMoE (same parameter names, so its state_dict loads
    strictly): gate.{weight, e_score_correction_bias}, experts.{up_proj, down_proj},
    fc1_latent_proj / fc2_latent_proj (absent without moe_latent_size), shared_experts.{up_proj,
    down_proj}."""

    def __init__(self, hidden_size: int, n_routed_experts: int, num_experts_per_tok: int, moe_intermediate_size: int,
                 moe_shared_expert_intermediate_size: Optional[int] = None, moe_latent_size: Optional[int] = None,
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, mlp_bias: bool = False, dtype=None, device=None,
                 pad_to: Optional[int] = None, num_local_experts: Optional[int] = None):
        """num_local_experts: how many experts `experts.*` holds (default all n_routed_experts;
        fewer when an expert-parallel subclass keeps only its shard)."""
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = n_routed_experts
        self.top_k = num_experts_per_tok
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.pad_to = pad_to
        self.fp8_training = False  # set True to train the routed experts through FP8 GEMMs
        in_dim = moe_latent_size if moe_latent_size is not None else hidden_size
        self.gate = MoEGate(n_routed_experts, hidden_size, device=device)
        held = n_routed_experts if num_local_experts is None else num_local_experts
        self.experts = MoEExperts(held, in_dim, moe_intermediate_size, dtype=dtype, device=device)
        self.shared_experts = (SharedMLP(hidden_size, moe_shared_expert_intermediate_size, mlp_bias, dtype, device)
                               if moe_shared_expert_intermediate_size else None)
        if moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(hidden_size, moe_latent_size, bias=mlp_bias, dtype=dtype, device=device)
            self.fc2_latent_proj = nn.Linear(moe_latent_size, hidden_size, bias=mlp_bias, dtype=dtype, device=device)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    @classmethod
    def from_config(cls, config, dtype=None, device=None, pad_to: Optional[int] = None) -> "LatentMoE":
        """From an object with transformers' NemotronHConfig field names."""
        return cls(hidden_size=config.hidden_size, n_routed_experts=config.n_routed_experts,
                   num_experts_per_tok=config.num_experts_per_tok, moe_intermediate_size=config.moe_intermediate_size,
                   moe_shared_expert_intermediate_size=getattr(config, "moe_shared_expert_intermediate_size", None),
                   moe_latent_size=getattr(config, "moe_latent_size", None), n_group=getattr(config, "n_group", 1),
                   topk_group=getattr(config, "topk_group", 1),
                   norm_topk_prob=getattr(config, "norm_topk_prob", True),
                   routed_scaling_factor=getattr(config, "routed_scaling_factor", 1.0),
                   mlp_bias=getattr(config, "mlp_bias", False), dtype=dtype, device=device, pad_to=pad_to)

    def routed_experts(self, xs, plan, up_proj, down_proj, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The routed experts on the gathered rows (latent_moe's `experts`): local grouped GEMMs
        here; ExpertParallelLatentMoE sends the rows to the experts' ranks. out_dtype: given with
        FP8Rows xs (FP8 experts), the dtype of the outputs."""
        return _local_experts(xs, plan, up_proj, down_proj, out_dtype=out_dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fc1, fc2, sh = self.fc1_latent_proj, self.fc2_latent_proj, self.shared_experts
        dense = (fc1, fc2) + ((sh.up_proj, sh.down_proj) if sh is not None else ())
        up, down = _weights(self.experts.up_proj), _weights(self.experts.down_proj)
        common = dict(top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                      norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor,
                      pad_to=self.pad_to, experts=self.routed_experts, fp8_training=self.fp8_training)
        if not all(m is None or isinstance(m, nn.Linear) for m in dense):
            # quantized dense layers (QuantizedLinear) are called as modules
            return latent_moe(hidden_states, self.gate.weight, self.gate.e_score_correction_bias, up, down,
                              fc1=fc1, fc2=fc2, shared=sh, **common)
        return latent_moe(
            hidden_states, self.gate.weight, self.gate.e_score_correction_bias, up, down,
            fc1_weight=fc1.weight if fc1 is not None else None, fc1_bias=fc1.bias if fc1 is not None else None,
            fc2_weight=fc2.weight if fc2 is not None else None, fc2_bias=fc2.bias if fc2 is not None else None,
            shared_up_weight=sh.up_proj.weight if sh is not None else None,
            shared_up_bias=sh.up_proj.bias if sh is not None else None,
            shared_down_weight=sh.down_proj.weight if sh is not None else None,
            shared_down_bias=sh.down_proj.bias if sh is not None else None, **common)
