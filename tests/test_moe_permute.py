"""MoE permutation plan, gather and combine (nemokernels.moe): the plan exactly against the
stable-sort reference (nemokernels/moe/reference.py) for pad_to 1/16/128, odd token counts,
several chunks, unbalanced routing (empty experts, one expert with every token); gather and
combine against float64 references in every dtype, their gradients against autograd of the
references with non-contiguous upstream gradients, opcheck, torch.compile, CUDA graphs, bad input."""
import pytest
import torch

from nemokernels.moe import moe_combine, moe_gather, moe_permute_plan
from nemokernels.moe import reference as R

from conftest import DEVICES
from helpers import TOL, assert_close, opcheck, poison_allocator

ops = torch.ops.nemokernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def routed_ids(T, E, k, mode, device):
    """(T, k) distinct experts per token: uniform, skewed (a few hot experts), or one expert for
    every token's first choice (k == 1: every token to one expert)."""
    if mode == "uniform":
        ids = torch.rand(T, E).argsort(-1)[:, :k]
    elif mode == "skewed":
        w = torch.rand(T, E) * torch.linspace(4.0, 0.0, E) ** 4  # low experts hot, last ones cold
        ids = w.argsort(-1, descending=True)[:, :k]
    else:  # "one": expert E-1 always, then the lowest others
        ids = torch.cat([torch.full((T, 1), E - 1), torch.arange(k - 1).expand(T, k - 1)], 1)
    return ids.to(torch.int32).to(device)


def check_plan(ids, E, pad_to):
    poison_allocator(ids.device)
    plan = moe_permute_plan(ids, E, pad_to)
    ref = R.permute_plan_ref(ids, E, pad_to)
    for name, got, want in zip(("expert_counts", "expert_offsets", "row_of_slot", "slot_of_row"), plan[:4], ref):
        assert got.dtype == torch.int32, name
        assert torch.equal(got.cpu().long(), want), f"{name} differs from the reference"
    assert plan.top_k == ids.shape[1]
    assert plan.num_rows == ids.numel() + E * (pad_to - 1)
    return plan


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 3, 37, 700])
@pytest.mark.parametrize("E,k", [(8, 2), (128, 6), (512, 22)])
@pytest.mark.parametrize("pad_to", [1, 16, 128])
@pytest.mark.parametrize("mode", ["uniform", "skewed", "one"])
def test_plan_matches_reference(device, T, E, k, pad_to, mode):
    check_plan(routed_ids(T, E, k, mode, device), E, pad_to)


@pytest.mark.parametrize("device", DEVICES)
def test_plan_edge_cases(device):
    # every slot to one expert (duplicates allowed by the plan), a single expert, no tokens
    check_plan(torch.full((3000, 2), 5, dtype=torch.int32, device=device), 8, 16)
    check_plan(torch.zeros(5, 1, dtype=torch.int32, device=device), 1, 1)
    plan = check_plan(torch.zeros(0, 4, dtype=torch.int32, device=device), 8, 16)
    assert plan.num_rows == 8 * 15 and (plan.slot_of_row == -1).all()
    # int64 ids (what transformers' router returns) are converted
    ids = routed_ids(9, 16, 3, "uniform", device)
    assert torch.equal(moe_permute_plan(ids.long(), 16, 4).row_of_slot, moe_permute_plan(ids, 16, 4).row_of_slot)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k,pad_to", [(1, 8, 2, 1), (37, 16, 4, 16), (3, 128, 6, 128), (200, 64, 8, 1)])
def test_gather_and_backward(device, dtype, T, E, k, pad_to):
    ids = routed_ids(T, E, k, "skewed", device)
    plan = moe_permute_plan(ids, E, pad_to)
    width = 72
    x = torch.randn(T, 2 * width, device=device, dtype=dtype)[:, ::2].requires_grad_()  # strided columns
    poison_allocator(device)
    xs = moe_gather(x, plan)
    ref = R.gather_ref(x.detach().double(), plan.slot_of_row, k)
    assert torch.equal(xs.double(), ref.to(device)), "gather is a copy: it must be exact"
    g = torch.randn(width, xs.shape[0], device=device, dtype=dtype).t()  # non-contiguous
    (dx,) = torch.autograd.grad(xs, x, g)
    x64 = x.detach().double().requires_grad_()
    (ref_dx,) = torch.autograd.grad(R.gather_ref(x64, plan.slot_of_row, k), x64, g.double())
    assert_close(dx, ref_dx, dtype, what="dx")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k,pad_to", [(1, 8, 2, 1), (37, 16, 4, 16), (3, 128, 22, 128), (200, 64, 8, 1)])
@pytest.mark.parametrize("with_weights", [True, False])
def test_combine_and_backward(device, dtype, T, E, k, pad_to, with_weights):
    ids = routed_ids(T, E, k, "uniform", device)
    plan = moe_permute_plan(ids, E, pad_to)
    width = 40
    y = torch.randn(plan.num_rows, width + 3, device=device, dtype=dtype)[:, 1:width + 1].requires_grad_()
    w = torch.rand(T, k, device=device).requires_grad_() if with_weights else None
    poison_allocator(device)
    out = moe_combine(y, plan, w)
    assert out.dtype == dtype and out.shape == (T, width)
    y64 = y.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_() if with_weights else None
    ref = R.combine_ref(y64, plan.row_of_slot, w64, k)
    assert_close(out, ref, dtype, what="combine")
    g = torch.randn(width, T, device=device, dtype=dtype).t()
    inputs = (y, w) if with_weights else (y,)
    grads = torch.autograd.grad(out, inputs, g)
    ref_grads = torch.autograd.grad(ref, (y64, w64) if with_weights else (y64,), g.double())
    assert_close(grads[0], ref_grads[0], dtype, what="dy")
    pad = plan.slot_of_row < 0
    assert (grads[0][pad] == 0).all(), "padding rows get a zero gradient"
    if with_weights:
        assert grads[1].dtype == torch.float32
        assert_close(grads[1], ref_grads[1], dtype, factor=2, what="dweights")


@pytest.mark.parametrize("device", DEVICES)
def test_pipeline_round_trip(device):
    """gather then combine without weights gives k * x (every token's k copies summed)."""
    T, E, k = 37, 32, 5
    plan = moe_permute_plan(routed_ids(T, E, k, "skewed", device), E, 16)
    x = torch.randn(T, 24, device=device)
    torch.testing.assert_close(moe_combine(moe_gather(x, plan), plan), x * k, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    plan = moe_permute_plan(torch.zeros(0, 3, dtype=torch.int32, device=device), 4, 8)
    x = torch.randn(0, 16, device=device, requires_grad=True)
    xs = moe_gather(x, plan)
    assert xs.shape == (plan.num_rows, 16) and (xs == 0).all()
    out = moe_combine(xs, plan, torch.zeros(0, 3, device=device))
    assert out.shape == (0, 16)
    xs.sum().backward()
    assert x.grad.shape == (0, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    ids = routed_ids(4, 8, 2, "uniform", device)
    plan = moe_permute_plan(ids, 8, 1)
    with pytest.raises(RuntimeError, match="moe_permute_plan: topk_ids must be one of {int32}"):
        ops.moe_permute_plan(ids.long(), 8, 1)
    with pytest.raises(RuntimeError, match="moe_permute_plan: topk_ids must have 2 dimensions"):
        moe_permute_plan(ids.flatten(), 8, 1)
    with pytest.raises(RuntimeError, match=r"pad_to must be in \[1, 4096\]"):
        moe_permute_plan(ids, 8, 0)
    with pytest.raises(RuntimeError, match=r"num_experts must be in \[1, 2048\], got 0"):
        moe_permute_plan(ids, 0, 1)
    with pytest.raises(RuntimeError, match=r"num_experts must be in \[1, 2048\], got 4096"):
        moe_permute_plan(ids, 4096, 1)
    x = torch.randn(4, 16, device=device)
    with pytest.raises(RuntimeError, match="moe_gather: x must be one of"):
        moe_gather(x.long(), plan)
    with pytest.raises(RuntimeError, match=r"row_of_slot must have x.shape\[0\] \* top_k = 10"):
        moe_gather(torch.randn(5, 16, device=device), plan)
    y = torch.randn(plan.num_rows, 16, device=device)
    with pytest.raises(RuntimeError, match=r"topk_weights must have shape \(4, 2\)"):
        moe_combine(y, plan, torch.rand(4, 3, device=device))
    with pytest.raises(RuntimeError, match="topk_weights must be one of {float32}"):
        moe_combine(y, plan, torch.rand(4, 2, device=device).half())
    with pytest.raises(RuntimeError, match=r"slot_of_row.shape\[0\] must be 7, got shape \(8,\)"):
        moe_combine(y[:-1], plan)
    with pytest.raises(RuntimeError, match="top_k must be >= 1 and divide row_of_slot.shape"):
        ops.moe_combine(y, plan.row_of_slot, plan.slot_of_row, None, 3)


def test_out_of_range_ids_raise_on_cpu():
    ids = torch.tensor([[0, 8], [1, 2]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"topk_ids.flatten\(\)\[1\] = 8 is out of range for num_experts = 8"):
        moe_permute_plan(ids, 8, 1)
    with pytest.raises(RuntimeError, match="out of range for num_experts"):
        moe_permute_plan(-ids, 8, 1)
    plan = moe_permute_plan(ids.clamp(max=7), 8, 1)
    bad = plan.slot_of_row.clone()
    bad[0] = 99
    with pytest.raises(RuntimeError, match=r"moe_gather: slot_of_row\[0\] = 99 is out of range"):
        ops.moe_gather(torch.randn(2, 4), bad, plan.row_of_slot, 2)


@pytest.mark.gpu
def test_out_of_range_ids_are_dropped_on_cuda():
    """The GPU cannot raise without a sync: a bad id's slot gets row -1 and adds nothing."""
    ids = torch.tensor([[0, 8], [1, 2]], dtype=torch.int32, device="cuda")
    plan = moe_permute_plan(ids, 8, 1)
    assert plan.row_of_slot.tolist() == [0, -1, 1, 2]
    assert plan.expert_counts.sum().item() == 3
    y = torch.randn(plan.num_rows, 4, device="cuda")
    out = moe_combine(y, plan)
    torch.testing.assert_close(out[0], y[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["plan", "gather", "combine", "combine_bwd"])
def test_opcheck(device, which):
    ids = routed_ids(7, 16, 3, "uniform", device)
    plan = moe_permute_plan(ids, 16, 4)
    y = torch.randn(plan.num_rows, 12, device=device, requires_grad=True)
    w = torch.rand(7, 3, device=device, requires_grad=True)
    if which == "plan":
        opcheck(ops.moe_permute_plan, (ids, 16, 4))
    elif which == "gather":
        x = torch.randn(7, 12, device=device, requires_grad=True)
        opcheck(ops.moe_gather, (x, plan.slot_of_row, plan.row_of_slot, 3))
        opcheck(ops.moe_gather_bwd, (torch.randn(plan.num_rows, 12, device=device), plan.row_of_slot, 3))
    elif which == "combine":
        opcheck(ops.moe_combine, (y, plan.row_of_slot, plan.slot_of_row, w, 3))
        opcheck(ops.moe_combine, (y, plan.row_of_slot, plan.slot_of_row, None, 3))
    else:
        opcheck(ops.moe_combine_bwd, (torch.randn(7, 12, device=device), y.detach(), plan.row_of_slot,
                                      plan.slot_of_row, w.detach(), 3, True))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    E, k = 16, 3

    def f(ids, x, w):
        plan = moe_permute_plan(ids, E, 8)
        xs = moe_gather(x, plan)
        return moe_combine(xs * 2.0, plan, w)

    ids = routed_ids(11, E, k, "skewed", device)
    x = torch.randn(11, 20, device=device, requires_grad=True)
    w = torch.rand(11, k, device=device, requires_grad=True)
    eager = f(ids, x, w)
    ge = torch.autograd.grad(eager.square().sum(), (x, w))
    comp = torch.compile(f, fullgraph=True, backend=backend)(ids, x, w)
    gc = torch.autograd.grad(comp.square().sum(), (x, w))
    torch.testing.assert_close(comp, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_cuda_matches_cpu_and_graph_replay():
    T, E, k = 3000, 512, 22  # 66000 slots: many chunks
    ids = routed_ids(T, E, k, "skewed", "cpu")
    cpu = moe_permute_plan(ids, E, 128)
    gpu = moe_permute_plan(ids.cuda(), E, 128)
    for a, b in zip(cpu[:4], gpu[:4]):
        assert torch.equal(a, b.cpu())
    ids_g = ids.cuda()
    x = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
    moe_gather(x, moe_permute_plan(ids_g, E, 128))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        plan = moe_permute_plan(ids_g, E, 128)
        xs = moe_gather(x, plan)
    new = routed_ids(T, E, k, "uniform", "cuda")
    ids_g.copy_(new)
    x.copy_(torch.randn_like(x))
    g.replay()
    plan2 = moe_permute_plan(new, E, 128)
    assert torch.equal(plan.row_of_slot, plan2.row_of_slot)
    assert torch.equal(xs, moe_gather(x, plan2))
