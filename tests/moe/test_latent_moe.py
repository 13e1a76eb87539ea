"""The LatentMoE layer (nemokernels.moe.LatentMoE / latent_moe): parity with transformers'
NemotronHMoE (its state_dict loaded strictly; same forward and the same gradients for the hidden
states and every parameter, with and without the latent projections, grouped routing, biases),
the float64 reference for bf16, pad_to independence, a deep stack's backward in bf16."""
import copy
from types import SimpleNamespace

import pytest
import torch

from nemokernels.moe import LatentMoE, latent_moe
from nemokernels.moe import reference as R

from conftest import DEVICES
from helpers import assert_close, rel_err


def tiny_config(latent, n_group=1, topk_group=1, mlp_bias=False, norm=True, E=8, k=3):
    """The fields of transformers' NemotronHConfig that LatentMoE.from_config reads (a plain
    namespace, so the GPU tests run where transformers is not installed)."""
    return SimpleNamespace(hidden_size=32, moe_latent_size=latent, n_routed_experts=E, num_experts_per_tok=k,
                           moe_intermediate_size=20, moe_shared_expert_intermediate_size=24, n_group=n_group,
                           topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=2.5, mlp_bias=mlp_bias)


def hf_moe(cfg):
    """transformers' NemotronHMoE for the same config, with random weights (skips without transformers)."""
    pytest.importorskip("transformers")
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE
    hf_cfg = NemotronHConfig(**vars(cfg))
    hf_cfg._experts_implementation = "eager"
    hf = NemotronHMoE(hf_cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(std=0.3 if "gate" in name else 0.15)
        hf.gate.e_score_correction_bias.normal_(std=0.05)
    return hf


def grads(module, x):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    g = torch.randn_like(out)
    names = [n for n, _ in module.named_parameters()]
    gs = torch.autograd.grad(out, [x] + [p for _, p in module.named_parameters()], g)
    return out, dict(zip(["hidden"] + names, gs)), g


@pytest.mark.parametrize("latent", [None, 12])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
@pytest.mark.parametrize("mlp_bias", [False, True])
def test_parity_with_transformers(latent, n_group, topk_group, mlp_bias):
    cfg = tiny_config(latent, n_group, topk_group, mlp_bias)
    hf = hf_moe(cfg)
    ours = LatentMoE.from_config(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert set(dict(ours.named_parameters())) == set(dict(hf.named_parameters()))
    x = torch.randn(3, 7, 32)
    # float32 against float32: same routing, same numbers up to summation order
    out, g_ours, g = grads(ours, x)
    x_ = x.clone().requires_grad_()
    ref = hf(x_)
    names = [n for n, _ in hf.named_parameters()]
    ref_g = dict(zip(["hidden"] + names, torch.autograd.grad(ref, [x_] + list(hf.parameters()), g)))
    assert_close(out, ref, torch.float32, factor=5, what="forward vs transformers fp32")
    for n in ref_g:
        assert_close(g_ours[n], ref_g[n], torch.float32, factor=20, what=f"d{n} vs transformers fp32")
    # float32 against transformers in float64 (router logits stay float32 there, as in the model)
    hf64 = hf.double()
    x64 = x.double().requires_grad_()
    ref64 = hf64(x64)
    ref64_g = dict(zip(["hidden"] + names, torch.autograd.grad(ref64, [x64] + list(hf64.parameters()), g.double())))
    assert_close(out, ref64, torch.float32, factor=5, what="forward vs transformers fp64")
    for n in ref64_g:
        assert_close(g_ours[n], ref64_g[n], torch.float32, factor=20, what=f"d{n} vs transformers fp64")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("latent", [None, 16])
def test_bf16_against_float64_reference(device, latent):
    E, k, d = 16, 4, 48
    m = LatentMoE(d, E, k, 40, 56, latent, n_group=4, topk_group=2, routed_scaling_factor=2.0,
                  dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        m.gate.e_score_correction_bias.normal_(std=0.05)
    x = torch.randn(37, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = m(x)
    assert out.dtype == torch.bfloat16
    g = torch.randn_like(out)
    params = list(m.parameters())
    got = torch.autograd.grad(out, [x] + params, g)
    # float64 reference of every parameter, the gate included, routed exactly as the layer was
    # (experts chosen from the same float32 logits; the weights differentiated in float64)
    p64 = [p.detach().double().requires_grad_() for p in params]
    names = [n for n, _ in m.named_parameters()]
    P = dict(zip(names, p64))
    x64 = x.detach().double().requires_grad_()
    lin = (lambda w, b=None: (lambda t: torch.nn.functional.linear(t, w, b)))
    select = torch.nn.functional.linear(x.detach().float(), m.gate.weight.detach().float())
    ref = R.latent_moe_ref(
        x64, P["gate.weight"], m.gate.e_score_correction_bias.double(), P["experts.up_proj"],
        P["experts.down_proj"], lin(P["fc1_latent_proj.weight"]) if latent else None,
        lin(P["fc2_latent_proj.weight"]) if latent else None, lin(P["shared_experts.up_proj.weight"]),
        lin(P["shared_experts.down_proj.weight"]), top_k=k, n_group=4, topk_group=2, routed_scaling_factor=2.0,
        select_logits=select)
    assert_close(out, ref, torch.bfloat16, factor=2, what="forward")
    ref_g = torch.autograd.grad(ref, [x64] + p64, g.double())
    for name, a, b in zip(["hidden"] + names, got, ref_g):
        assert_close(a, b, torch.bfloat16, factor=3, what=f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
def test_pad_to_does_not_change_the_result(device):
    m = LatentMoE(24, 8, 2, 16, None, 8, device=device)
    x = torch.randn(19, 24, device=device)
    ref = m(x)
    for pad in (1, 16, 128):
        m.pad_to = pad
        torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)
    assert latent_moe(x, m.gate.weight, None, m.experts.up_proj, m.experts.down_proj, top_k=2,
                      fc1_weight=m.fc1_latent_proj.weight, fc2_weight=m.fc2_latent_proj.weight,
                      pad_to=4).shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_with_float32_weights(device):
    """Mixed-precision training: float32 master weights under bf16 autocast. The router stays in
    float32 (same expert choice as without autocast), the experts run in bf16, gradients reach
    every float32 parameter."""
    torch.manual_seed(0)
    m = LatentMoE(32, 8, 2, 24, 24, 16, device=device)
    x = torch.randn(2, 9, 32, device=device, requires_grad=True)
    ref = m(x)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        logits = __import__("nemokernels").moe.router_logits(x, m.gate.weight)
        y = m(x)
    assert logits.dtype == torch.float32
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), ref.detach()) < 5e-2
    y.float().square().mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_training_of_the_routed_experts(device):
    """LatentMoE.fp8_training: the routed experts' forward, dgrad and wgrad on e4m3 operands,
    gradients to the float32 master weights (straight-through). Output and every gradient stay
    near the bf16 layer's (FP8 rounding: a few percent), the expert weights get float32
    gradients, the rest of the layer is unchanged, and an optimizer step runs."""
    torch.manual_seed(0)
    m = LatentMoE(64, 8, 2, 48, 32, 32, dtype=torch.bfloat16, device=device)
    m8 = copy.deepcopy(m)
    m8.experts.float()  # float32 master weights for the FP8 experts
    m8.fp8_training = True
    x = torch.randn(2, 11, 64, device=device, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = m(xa), m8(xb)
    assert rel_err(yb.float(), ya.detach().float()) < 0.06
    ya.backward(dy)
    yb.backward(dy)
    assert rel_err(xb.grad.float(), xa.grad.float()) < 0.08
    for (n, pa), (_, pb) in zip(m.named_parameters(), m8.named_parameters()):
        assert pb.grad is not None and torch.isfinite(pb.grad).all(), n
        assert rel_err(pb.grad.float(), pa.grad.float()) < 0.1, n
        if n.startswith("experts."):
            assert pb.grad.dtype == torch.float32, n
    torch.optim.SGD(m8.parameters(), lr=0.1).step()
    with pytest.raises(ValueError, match="master"):
        from nemokernels.moe import fp8_weights
        latent_moe(x, m8.gate.weight, None, fp8_weights(m8.experts.up_proj), m8.experts.down_proj, top_k=2,
                   fp8_training=True)


@pytest.mark.parametrize("device", DEVICES)
def test_deep_stack_backward_bf16_is_finite(device):
    """Five residual MoE layers in bf16 (a bug the peer libraries shipped: NaN gradients in deeper stacks): every
    gradient finite, and close to the same stack in float32 (same bf16-valued parameters). A
    large correction bias on two experts per layer makes the expert choice the same in both
    precisions (the weights still come from the logits), so the comparison measures rounding,
    not routing flips."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(LatentMoE(32, 8, 2, 24, 24, 16, dtype=torch.bfloat16, device=device)
                                 for _ in range(5))
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.gate.e_score_correction_bias.zero_()
            layer.gate.e_score_correction_bias[[i % 8, (3 * i + 5) % 8]] = 10.0
    layers32 = copy.deepcopy(layers).float()
    x = torch.randn(2, 9, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    for inp, stack in ((x, layers), (x32, layers32)):
        h = inp
        for layer in stack:
            h = h + layer(h)
        h.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad, x32.grad.double(), torch.bfloat16, factor=5, what="dx")
    for (n, p), p32 in zip(layers.named_parameters(), layers32.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert_close(p.grad, p32.grad.double(), torch.bfloat16, factor=5, what=f"d{n}")


@pytest.mark.gpu
def test_cuda_layer_matches_cpu():
    cfg = tiny_config(12, 4, 2, True, E=16, k=4)
    cpu = LatentMoE.from_config(cfg)
    with torch.no_grad():
        for name, p in cpu.named_parameters():
            p.normal_(std=0.3 if "gate" in name else 0.15)
        cpu.gate.e_score_correction_bias.normal_(std=0.05)
    gpu = LatentMoE.from_config(cfg, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(37, 32)
    out_c, g_c, g = grads(cpu, x)
    xg = x.cuda().requires_grad_()
    out_g = gpu(xg)
    gg = torch.autograd.grad(out_g, [xg] + list(gpu.parameters()), g.cuda())
    assert_close(out_g, out_c.double(), torch.float32, factor=10, what="forward")
    for (n, a), b in zip(g_c.items(), gg):
        assert_close(b, a.double(), torch.float32, factor=20, what=f"d{n}")


@pytest.mark.parametrize("latent", [None, 12])
def test_parity_unbalanced_routing(latent):
    """Every token to the same experts (a huge correction bias): one hot expert set, the other
    experts get no rows at all; forward and gradients still match transformers."""
    cfg = tiny_config(latent, E=16, k=3)
    hf = hf_moe(cfg)
    with torch.no_grad():
        hf.gate.e_score_correction_bias.zero_()
        hf.gate.e_score_correction_bias[[2, 9, 15]] = 10.0
    ours = LatentMoE.from_config(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(37, 32)
    out, g_ours, g = grads(ours, x)
    x_ = x.clone().requires_grad_()
    ref = hf(x_)
    names = ["hidden"] + [n for n, _ in hf.named_parameters()]
    ref_g = dict(zip(names, torch.autograd.grad(ref, [x_] + list(hf.parameters()), g)))
    assert_close(out, ref, torch.float32, factor=5, what="forward")
    for n in ref_g:
        assert_close(g_ours[n], ref_g[n], torch.float32, factor=20, what=f"d{n}")
    cold = [e for e in range(16) if e not in (2, 9, 15)]
    assert (g_ours["experts.up_proj"][cold] == 0).all()


def test_module_cast_to_bf16_still_routes():
    """module.to(bf16) also casts the gate weight and the correction bias (float32 in the
    checkpoint): the router reads them in float32 anyway, so it chooses the experts a float32
    module with the same (bf16-valued) parameters chooses, and the outputs and gradients agree
    with it to bf16 rounding."""
    torch.manual_seed(0)
    m = LatentMoE(32, 8, 2, 16, 16, 8).to(torch.bfloat16)
    assert m.gate.e_score_correction_bias.dtype == torch.bfloat16
    with torch.no_grad():
        m.gate.e_score_correction_bias.normal_(std=0.05)
    m32 = copy.deepcopy(m).float()
    x = torch.randn(5, 32, dtype=torch.bfloat16, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    out, out32 = m(x), m32(x32)
    assert_close(out, out32.double(), torch.bfloat16, factor=2, what="forward")
    out.float().sum().backward()
    out32.sum().backward()
    assert m.gate.weight.grad.dtype == torch.bfloat16
    assert_close(x.grad, x32.grad.double(), torch.bfloat16, factor=3, what="dx")
    assert_close(m.gate.weight.grad, m32.gate.weight.grad.double(), torch.bfloat16, factor=3, what="dgate")


def test_whole_layer_compiles_fullgraph():
    """The whole LatentMoE (router, plan, gather, two grouped GEMMs, combine, projections) under
    torch.compile(fullgraph=True): no graph break, no host sync, same output and gradients."""
    torch.manual_seed(0)
    m = LatentMoE(32, 8, 2, 24, 24, 16)
    x = torch.randn(2, 9, 32, requires_grad=True)
    ref = m(x)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    y = torch.compile(m, fullgraph=True)(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(g, gref)
