"""LatentMoE dispatch cases at the MoE points of docs/design.md section 7: the fused router, permutation plan +
gather, combine, the dispatch path alone (router + plan + gather + combine, no expert GEMMs: its
time over the layer's is the router+permutation share), and the whole layer forward and
forward+backward. Super: d 4096, latent 1024, F 2688, 512 experts, top-22, shared 5376; Nano:
d 2688, no latent, F 1856, 128 experts, top-6, shared 3712 (docs/design.md section 7 marks some Super values
(?)). Tokens 1..16384, uniform and skewed routing (skewed: correction bias favouring a few experts
so that a handful take most tokens), bf16 activations.

Details: docs/moe.md, section `nemokernels/benchmark/cases_moe.py`."""
import torch
import torch.nn.functional as F

from nemokernels.moe import (PAD_TO, FP8Tensor, LatentMoE, latent_moe, moe_combine, moe_gather, moe_permute_plan,
                              moe_router, quantize_rows_fp8)
from nemokernels.nvfp4 import NVFP4Tensor, quantize as nvfp4_quantize
from nemokernels.moe import reference as R

from .harness import Case, lazy_compile

DTYPE = torch.bfloat16
# d, latent, F, E, k, shared
CONFIGS = {"super": (4096, 1024, 2688, 512, 22, 5376), "nano": (2688, None, 1856, 128, 6, 3712)}
TOKENS_FULL = (1, 64, 512, 4096, 16384)
TOKENS_QUICK = (64, 4096)


def _bias(E, routing, device):
    if routing == "uniform":
        return torch.zeros(E, device=device)
    b = torch.zeros(E, device=device)
    b[: max(1, E // 32)] = 0.5  # a few hot experts take most choices
    return b


# ---- router --------------------------------------------------------------------------------

def _router_torch(logits, bias, k):
    """transformers' router math (n_group 1) in float32."""
    scores = logits.sigmoid()
    ids = torch.topk(scores + bias, k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    return ids, w / (w.sum(-1, keepdim=True) + 1e-20)


def _router_cases(cfg, T, routing, device):
    d, lat, Fi, E, k, S = CONFIGS[cfg]

    def make():
        return torch.randn(T, E, device=device), _bias(E, routing, device), k

    def ours(logits, bias, k):
        return moe_router(logits, bias, k)

    nbytes = T * E * 4 + E * 4 + T * k * 8
    return Case(op="moe_router", name=f"{cfg} T{T} E{E} k{k} {routing}", make_inputs=make, fn=ours, bytes=nbytes,
                flops=T * E * 6, baselines={"torch_eager": _router_torch, "torch_compile": lazy_compile(_router_torch)})


# ---- permutation + gather, combine ---------------------------------------------------------

def _ids(T, E, k, routing, device):
    logits = torch.randn(T, E, device=device)
    return moe_router(logits, _bias(E, routing, device), k)


def _permute_torch(ids, x, E):
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    return x.index_select(0, order // ids.shape[1]), order, counts


def _perm_cases(cfg, T, routing, device, pad_to):
    d, lat, Fi, E, k, S = CONFIGS[cfg]
    width = lat or d

    def make():
        ids, w = _ids(T, E, k, routing, device)
        return ids, torch.randn(T, width, device=device, dtype=DTYPE), E

    def ours(ids, x, E):
        return moe_gather(x, moe_permute_plan(ids, E, pad_to))

    rows = T * k + E * (pad_to - 1)
    nbytes = T * k * 4 * 3 + rows * 4 + T * k * width * 2 + rows * width * 2
    gather = Case(op="moe_permute+gather", name=f"{cfg} T{T} E{E} k{k} l{width} pad{pad_to} {routing}",
                  make_inputs=make, fn=ours, bytes=nbytes, flops=0,
                  baselines={"torch_eager": _permute_torch, "torch_compile": lazy_compile(_permute_torch)})

    def make_c():
        ids, w = _ids(T, E, k, routing, device)
        plan = moe_permute_plan(ids, E, pad_to)
        return torch.randn(plan.num_rows, width, device=device, dtype=DTYPE), plan, w

    def ours_c(y, plan, w):
        return moe_combine(y, plan, w)

    def torch_c(y, plan, w):
        rows = y.index_select(0, plan.row_of_slot.long()).view(w.shape[0], w.shape[1], -1)
        return (rows.float() * w.unsqueeze(-1)).sum(1).to(y.dtype)

    nbytes_c = T * k * width * 2 + T * width * 2 + T * k * 8
    combine = Case(op="moe_combine", name=f"{cfg} T{T} E{E} k{k} l{width} {routing}", make_inputs=make_c, fn=ours_c,
                   bytes=nbytes_c, flops=2 * T * k * width,
                   baselines={"torch_eager": torch_c, "torch_compile": lazy_compile(torch_c)})
    def ours_q(ids, x, E):
        return quantize_rows_fp8(x, None, moe_permute_plan(ids, E, pad_to))

    def gather_then_torch_q(ids, x, E):
        xs = moe_gather(x, moe_permute_plan(ids, E, pad_to)).float()
        s = (xs.abs().amax(dim=1, keepdim=True) / 448).clamp_min(1.17549435e-38)
        return (xs / s).clamp(-448, 448).to(torch.float8_e4m3fn), s

    # e4m3 rows with a scale each, gathered in the same pass (the FP8 experts' A operand)
    gather_q = Case(op="moe_permute+gather_fp8", name=f"{cfg} T{T} E{E} k{k} l{width} pad{pad_to} {routing}",
                    make_inputs=make, fn=ours_q, bytes=T * k * 4 * 3 + rows * 4 + T * k * width * 2 + rows * (width + 4),
                    flops=0, baselines={"ours_bf16_gather": ours, "gather_then_torch_quantize": gather_then_torch_q})

    def make_t():
        ids, w = _ids(T, E, k, routing, device)
        plan = moe_permute_plan(ids, E, pad_to)
        return torch.randn(plan.num_rows, width, device=device, dtype=DTYPE), plan.expert_offsets

    def ours_t(xs, offsets):
        return torch.ops.nemokernels.moe_quantize_fp8_t(xs, offsets)

    def torch_t(xs, offsets):
        s = (xs.float().abs().amax(dim=0) / 448).clamp_min(1.17549435e-38)
        return (xs.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).t().contiguous(), s

    # the FP8 wgrad's operand: column scales, transposed (the training backward's quantizer)
    quant_t = Case(op="moe_quantize_fp8_t", name=f"{cfg} T{T} E{E} k{k} l{width} {routing}", make_inputs=make_t,
                   fn=ours_t, bytes=T * k * width * (2 + 2 + 1), flops=0, baselines={"torch_eager": torch_t})
    return [gather, combine, gather_q, quant_t]


# ---- layer ---------------------------------------------------------------------------------

_MODULES = {}


def _module(cfg, routing, device):
    key = (cfg, routing, str(device))
    if key not in _MODULES:
        _MODULES.clear()  # one configuration's weights at a time (Super: 5.6 GB of experts)
        d, lat, Fi, E, k, S = CONFIGS[cfg]
        m = LatentMoE(d, E, k, Fi, S, lat, dtype=DTYPE, device=device)
        with torch.no_grad():
            m.gate.e_score_correction_bias.copy_(_bias(E, routing, device))
        _MODULES[key] = m
    return _MODULES[key]


def _reference_layer(m, x):
    """transformers' NemotronHMoE math: loop over experts (ops in nemokernels/moe/reference.py)."""
    return R.latent_moe_ref(x, m.gate.weight, m.gate.e_score_correction_bias, m.experts.up_proj, m.experts.down_proj,
                            m.fc1_latent_proj, m.fc2_latent_proj, m.shared_experts.up_proj,
                            m.shared_experts.down_proj, top_k=m.top_k, routed_scaling_factor=m.routed_scaling_factor)


def _grouped_mm_layer(m, x):
    """Same layer with torch._grouped_mm experts over a sort-based permutation (sm90+)."""
    h = x.reshape(-1, x.shape[-1])
    logits = F.linear(h.float(), m.gate.weight)
    ids, w = _router_torch(logits, m.gate.e_score_correction_bias, m.top_k)
    w = w * m.routed_scaling_factor
    lat = m.fc1_latent_proj(h) if m.fc1_latent_proj is not None else h
    xs, order, counts = _permute_torch(ids, lat, m.num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    hs = torch.relu(torch._grouped_mm(xs, m.experts.up_proj.transpose(1, 2), offs=offs)).square()
    ys = torch._grouped_mm(hs, m.experts.down_proj.transpose(1, 2), offs=offs)
    ys = ys * w.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
    y = torch.zeros_like(lat).index_add_(0, order // m.top_k, ys)
    out = m.fc2_latent_proj(y) if m.fc2_latent_proj is not None else y
    return out.reshape(x.shape) + m.shared_experts(x)


def _vllm_layer():
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts  # noqa: PLC0415
    except Exception:  # noqa: BLE001
        return None

    def run(m, x):
        h = x.reshape(-1, x.shape[-1])
        ids, w = moe_router(F.linear(h.float(), m.gate.weight), m.gate.e_score_correction_bias, m.top_k)
        lat = m.fc1_latent_proj(h) if m.fc1_latent_proj is not None else h
        y = fused_experts(lat, m.experts.up_proj, m.experts.down_proj, w, ids, activation="relu2_no_mul")
        out = m.fc2_latent_proj(y) if m.fc2_latent_proj is not None else y
        return out.reshape(x.shape) + m.shared_experts(x)
    return run


def _dispatch_only(m, x):
    """Router + plan + gather + combine of the layer, the expert GEMMs skipped."""
    h = x.reshape(-1, x.shape[-1])
    ids, w = moe_router(F.linear(h.float(), m.gate.weight), m.gate.e_score_correction_bias, m.top_k)
    lat = m.fc1_latent_proj(h) if m.fc1_latent_proj is not None else h
    plan = moe_permute_plan(ids, m.num_experts, m.pad_to or PAD_TO.get(x.device.type, 1))
    xs = moe_gather(lat, plan)
    return moe_combine(xs, plan, w)


_QUANT = {}


def _quantized_experts(m, fmt):
    """The layer's bf16 expert weights quantized once: NVFP4 (a global scale per expert) or FP8 (a
    scale per expert, amax / 448; dynamic per-row activation scales)."""
    key = (id(m), fmt)
    if key not in _QUANT:
        _QUANT.clear()
        out = []
        for w in (m.experts.up_proj.detach(), m.experts.down_proj.detach()):
            if fmt == "nvfp4":
                parts = [nvfp4_quantize(w[e]) for e in range(w.shape[0])]
                out.append(NVFP4Tensor(torch.stack([p.data for p in parts]), torch.stack([p.scales for p in parts]),
                                       torch.stack([p.global_scale.reshape(()) for p in parts])))
            else:
                scale = w.float().abs().amax(dim=(1, 2)) / 448
                data = torch.stack([(w[e].float() / scale[e]).to(torch.float8_e4m3fn) for e in range(w.shape[0])])
                out.append(FP8Tensor(data, scale))
        _QUANT[key] = tuple(out)
    return _QUANT[key]


def _quantized_layer(fmt):
    """The layer with its routed experts in NVFP4 (W4A16) or FP8 (W8A8), forward only; router,
    latent projections and shared expert as in the bf16 layer."""
    def run(m, x):
        up, down = _quantized_experts(m, fmt)
        fc1, fc2, sh = m.fc1_latent_proj, m.fc2_latent_proj, m.shared_experts
        with torch.no_grad():
            return latent_moe(x, m.gate.weight, m.gate.e_score_correction_bias, up, down, top_k=m.top_k,
                              routed_scaling_factor=m.routed_scaling_factor, fc1=fc1, fc2=fc2, shared=sh,
                              pad_to=m.pad_to)
    return run


def _fwd_bwd(fn):
    def run(m, x, dout):
        out = fn(m, x)
        return torch.autograd.grad(out, [x] + list(m.parameters()), dout)
    return run


def _layer_cases(cfg, T, routing, device):
    d, lat, Fi, E, k, S = CONFIGS[cfg]
    width = lat or d
    name = f"{cfg} T{T} d{d} l{width} F{Fi} E{E} k{k} {routing}"
    experts_hit = min(E, T * k)
    w_bytes = experts_hit * 2 * Fi * width * 2 + (2 * d * lat * 2 if lat else 0) + 2 * d * S * 2 + E * d * 4
    act_bytes = T * d * 2 * 2 + T * k * (width * 2 * 2 + Fi * 2 * 2)
    flops = 2 * T * k * 2 * width * Fi + (2 * T * 2 * d * lat if lat else 0) + 2 * T * 2 * d * S + 2 * T * d * E

    def make(backward):
        def mk():
            m = _module(cfg, routing, device)
            x = torch.randn(T, d, device=device, dtype=DTYPE)
            if not backward:
                return m, x
            return m, x.requires_grad_(), torch.randn(T, d, device=device, dtype=DTYPE)
        return mk

    def ours(m, x):
        return m(x)

    base = {"torch_loop_experts": _reference_layer}
    if hasattr(torch, "_grouped_mm") and torch.device(device).type == "cuda":
        base["torch_grouped_mm"] = _grouped_mm_layer
    vllm = _vllm_layer()
    if vllm is not None:
        base["vllm_fused_moe"] = vllm
    return [
        Case(op="latent_moe.dispatch_only", name=name, make_inputs=make(False), fn=_dispatch_only,
             bytes=act_bytes, flops=0),
        Case(op="latent_moe", name=name, make_inputs=make(False), fn=ours, bytes=w_bytes + act_bytes, flops=flops,
             baselines=base),
        # Routed experts quantized: NVFP4 weights (4.5 bits a value) and FP8 weights and rows.
        Case(op="latent_moe.nvfp4_experts", name=name, make_inputs=make(False), fn=_quantized_layer("nvfp4"),
             bytes=w_bytes - experts_hit * 2 * Fi * width * 2 * 23 // 32 + act_bytes, flops=flops,
             baselines={"ours_bf16_experts": ours, **{n: f for n, f in base.items() if n == "torch_grouped_mm"}}),
        Case(op="latent_moe.fp8_experts", name=name, make_inputs=make(False), fn=_quantized_layer("fp8"),
             bytes=w_bytes - experts_hit * 2 * Fi * width + act_bytes, flops=flops,
             baselines={"ours_bf16_experts": ours, **{n: f for n, f in base.items() if n == "torch_grouped_mm"}}),
        Case(op="latent_moe.fwd_bwd", name=name, make_inputs=make(True), fn=_fwd_bwd(ours),
             bytes=3 * (w_bytes + act_bytes), flops=3 * flops,
             baselines={n: _fwd_bwd(f) for n, f in base.items() if n != "vllm_fused_moe"}, backward=True),
    ]


def cases(quick: bool, device) -> list:
    cuda = torch.device(device).type == "cuda"
    pad_to = PAD_TO.get(torch.device(device).type, 1)  # what the layer uses
    out = []
    tokens = TOKENS_QUICK if quick else TOKENS_FULL
    # The CPU path is for correctness; keep CPU runs short (a quick one: one point).
    points = [(cfg, T, routing) for cfg in CONFIGS for T in tokens for routing in ("uniform", "skewed")
              if cuda or T <= 64]
    if quick and not cuda:
        points = [("nano", 64, "uniform")]
    for cfg, T, routing in points:
        out.append(_router_cases(cfg, T, routing, device))
        out += _perm_cases(cfg, T, routing, device, pad_to)
        if cuda:  # a layer's expert weights (Super: 5.6 GB bf16) are GPU-sized
            out += _layer_cases(cfg, T, routing, device)
    return out
