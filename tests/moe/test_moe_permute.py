"""MoE permutation plan, gather and combine (nemokernels.moe): the plan exactly against the
stable-sort reference (nemokernels/moe/reference.py) for pad_to 1/16/128, odd token counts,
several chunks, unbalanced routing (empty experts, one expert with every token); gather and
combine against float64 references in every dtype, their gradients against autograd of the
references with non-contiguous upstream gradients, opcheck, torch.compile, CUDA graphs, bad input."""
from types import SimpleNamespace

import pytest
import torch

from nemokernels.moe import moe_combine, moe_gather, moe_permute_plan
from nemokernels.moe import reference as R

from conftest import DEVICES
from helpers import assert_close, bad_input_test, mutation_table, opcheck, poison_allocator

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


# ---------------------------------------------------------------- bad input, table-driven
# Tables of mutations of a valid call's arguments, rows (id, mutate, regex of the message, where)
# as in helpers.mutation_table; "cpu" rows are value checks (they read the maps or ids, a host
# sync on CUDA; the CUDA kernels bound-check every entry they use instead, see
# test_cuda_memory_safe_for_bad_maps). The public functions' refusals are rows (id, where, call,
# regex) over _public_args.


def _set(a, key, idx, value):
    a[key] = a[key].clone()
    a[key][idx] = value


def _swap(a, key, i, j):
    t = a[key].clone()
    t[i], t[j] = a[key][j], a[key][i]
    a[key] = t


def _plan_args(device):
    ids = torch.tensor([[0, 5], [1, 5], [7, 2], [5, 0]], dtype=torch.int32, device=device)
    return dict(ids=ids, E=8, pad=4)


def _plan_call(a):
    return ops.moe_permute_plan(a["ids"], a["E"], a["pad"])


PLAN = "moe_permute_plan"
PLAN_CASES = [
    ("ids_dtype", lambda a: a.update(ids=a["ids"].long()), PLAN + r": topk_ids must be one of \{int32\}, got int64",
     "any"),
    ("ids_rank1", lambda a: a.update(ids=a["ids"].flatten()),
     PLAN + r": topk_ids must have 2 dimensions, got shape \(8,\)", "any"),
    ("ids_rank3", lambda a: a.update(ids=a["ids"][None]),
     PLAN + r": topk_ids must have 2 dimensions, got shape \(1, 4, 2\)", "any"),
    ("no_experts", lambda a: a.update(E=0), PLAN + r": num_experts must be in \[1, 2048\], got 0", "any"),
    ("too_many_experts", lambda a: a.update(E=2049), PLAN + r": num_experts must be in \[1, 2048\], got 2049", "any"),
    ("pad_to_zero", lambda a: a.update(pad=0), PLAN + r": pad_to must be in \[1, 4096\], got 0", "any"),
    ("pad_to_too_big", lambda a: a.update(pad=4097), PLAN + r": pad_to must be in \[1, 4096\], got 4097", "any"),
    ("rows_past_int32", lambda a: a.update(ids=torch.zeros(1, 1, dtype=torch.int32, device=a["ids"].device)
                                           .expand(2**31 - 8, 1)),
     PLAN + r": 2147483640 slots \+ num_experts \* \(pad_to - 1\) = 2147483664 rows do not fit int32 row indices; "
     r"plan fewer tokens", "any"),
    ("id_past_experts", lambda a: _set(a, "ids", (2, 0), 8),
     PLAN + r": topk_ids.flatten\(\)\[4\] = 8 is out of range for num_experts = 8", "cpu"),
    ("id_negative", lambda a: _set(a, "ids", (3, 1), -1),
     PLAN + r": topk_ids.flatten\(\)\[7\] = -1 is out of range for num_experts = 8", "cpu"),
]


def _maps_args(device, dtype=torch.float32):
    """4 tokens, top_k 2, 8 experts, pad_to 2: x, the two maps, y, weights, dout."""
    ids = torch.tensor([[0, 5], [1, 5], [7, 2], [5, 0]], dtype=torch.int32, device=device)
    plan = moe_permute_plan(ids, 8, 2)
    R = plan.num_rows
    return dict(x=torch.randn(4, 16, device=device, dtype=dtype), sor=plan.slot_of_row, ros=plan.row_of_slot, k=2,
                y=torch.randn(R, 16, device=device, dtype=dtype), w=torch.rand(4, 2, device=device),
                dout=torch.randn(4, 16, device=device, dtype=dtype), dxs=torch.randn(R, 16, device=device, dtype=dtype))


def _first_real_rows(a):
    """Two rows that hold slots (for swapping map entries)."""
    rows = (a["sor"] >= 0).nonzero().flatten().tolist()
    return rows[0], rows[1]


GATHER = "moe_gather"
GATHER_CASES = [
    ("x_dtype_int", lambda a: a.update(x=a["x"].long()),
     GATHER + r": x must be one of \{float32, float16, bfloat16\}, got int64", "any"),
    ("x_dtype_f64", lambda a: a.update(x=a["x"].double()),
     GATHER + r": x must be one of \{float32, float16, bfloat16\}, got float64", "any"),
    ("x_rank", lambda a: a.update(x=a["x"][None]), GATHER + r": x must have 2 dimensions, got shape \(1, 4, 16\)",
     "any"),
    ("sor_dtype", lambda a: a.update(sor=a["sor"].long()), GATHER + r": slot_of_row must be one of \{int32\}, got int64",
     "any"),
    ("sor_rank", lambda a: a.update(sor=a["sor"][None]), GATHER + r": slot_of_row must have 1 dimensions", "any"),
    ("ros_dtype", lambda a: a.update(ros=a["ros"].long()), GATHER + r": row_of_slot must be one of \{int32\}, got int64",
     "any"),
    ("ros_rank", lambda a: a.update(ros=a["ros"].reshape(4, 2)), GATHER + r": row_of_slot must have 1 dimensions",
     "any"),
    ("tokens_disagree", lambda a: a.update(x=torch.randn(5, 16, device=a["x"].device)),
     GATHER + r": row_of_slot must have x.shape\[0\] \* top_k = 10 entries \(the plan of x's tokens\), got shape \(8,\)",
     "any"),
    ("top_k_zero", lambda a: a.update(k=0), GATHER + r": top_k must be >= 1, got 0", "any"),
    ("top_k_overflow", lambda a: a.update(k=2**62),
     GATHER + r": row_of_slot must have x.shape\[0\] \* top_k = 4 \* 4611686018427387904 entries", "any"),
    ("sor_value_out_of_range", lambda a: _set(a, "sor", 0, 99),
     GATHER + r": slot_of_row\[0\] = 99 is out of range \[-1, 8\)", "cpu"),
    ("ros_value_out_of_range", lambda a: _set(a, "ros", 3, -2),
     GATHER + r": row_of_slot\[3\] = -2 is out of range \[-1, \d+\)", "cpu"),
    ("maps_not_inverse", lambda a: _swap(a, "sor", *_first_real_rows(a)),
     GATHER + r": row_of_slot and slot_of_row are not inverse maps: row_of_slot\[\d+\] = \d+ but slot_of_row\[\d+\] = "
     r"\d+ \(pass the two maps of one moe_permute_plan\)", "cpu"),
    ("sor_device", lambda a: a.update(sor=a["sor"].cpu()),
     GATHER + r": slot_of_row is on cpu but x is on cuda:\d+; all tensors must be on one device", "cuda"),
]


def _gather_call(a):
    return ops.moe_gather(a["x"], a["sor"], a["ros"], a["k"])


GBWD = r"moe_gather \(backward\)"
GATHER_BWD_CASES = [
    ("dxs_dtype", lambda a: a.update(dxs=a["dxs"].int()),
     GBWD + r": dxs must be one of \{float32, float16, bfloat16\}, got int32", "any"),
    ("dxs_rank", lambda a: a.update(dxs=a["dxs"].flatten()), GBWD + r": dxs must have 2 dimensions", "any"),
    ("ros_dtype", lambda a: a.update(ros=a["ros"].long()), GBWD + r": row_of_slot must be one of \{int32\}, got int64",
     "any"),
    ("ros_rank", lambda a: a.update(ros=a["ros"].reshape(4, 2)),
     GBWD + r": row_of_slot must have 1 dimensions, got shape \(4, 2\)", "any"),
    ("top_k_zero", lambda a: a.update(k=0),
     GBWD + r": top_k must be >= 1 and divide row_of_slot.shape\[0\] = 8, got 0", "any"),
    ("top_k_not_dividing", lambda a: a.update(k=3),
     GBWD + r": top_k must be >= 1 and divide row_of_slot.shape\[0\] = 8, got 3", "any"),
    ("slots_past_int32", lambda a: a.update(ros=torch.zeros(1, dtype=torch.int32, device=a["ros"].device)
                                            .expand(2**31), k=1),
     GBWD + r": row_of_slot.shape\[0\] \(slots, tokens \* top_k\) = 2147483648 exceeds 2147483647, slot indices are "
     r"int32 \(slot_of_row\); dispatch the tokens in several calls", "any"),
    ("ros_value_past_rows", lambda a: _set(a, "ros", 0, 99),
     GBWD + r": row_of_slot\[0\] = 99 is out of range \[-1, \d+\)", "cpu"),
    ("ros_value_negative", lambda a: _set(a, "ros", 5, -3),
     GBWD + r": row_of_slot\[5\] = -3 is out of range \[-1, \d+\)", "cpu"),
    ("ros_device", lambda a: a.update(ros=a["ros"].cpu()),
     GBWD + r": row_of_slot is on cpu but dxs is on cuda:\d+; all tensors must be on one device", "cuda"),
]


def _gather_bwd_call(a):
    return ops.moe_gather_bwd(a["dxs"], a["ros"], a["k"])


COMBINE = "moe_combine"
COMBINE_CASES = [
    ("y_dtype", lambda a: a.update(y=a["y"].double()),
     COMBINE + r": y must be one of \{float32, float16, bfloat16\}, got float64", "any"),
    ("y_rank", lambda a: a.update(y=a["y"][None]), COMBINE + r": y must have 2 dimensions", "any"),
    ("ros_dtype", lambda a: a.update(ros=a["ros"].short()),
     COMBINE + r": row_of_slot must be one of \{int32\}, got int16", "any"),
    ("ros_rank", lambda a: a.update(ros=a["ros"][None]), COMBINE + r": row_of_slot must have 1 dimensions", "any"),
    ("top_k_not_dividing", lambda a: a.update(k=3),
     COMBINE + r": top_k must be >= 1 and divide row_of_slot.shape\[0\] = 8, got 3", "any"),
    ("weights_shape", lambda a: a.update(w=a["w"][:, :1]),
     COMBINE + r": topk_weights must have shape \(4, 2\) \(tokens, top_k\), got \(4, 1\)", "any"),
    ("weights_dtype", lambda a: a.update(w=a["w"].bfloat16()),
     COMBINE + r": topk_weights must be one of \{float32\}, got bfloat16", "any"),
    ("weights_rank", lambda a: a.update(w=a["w"].flatten()),
     COMBINE + r": topk_weights must have 2 dimensions, got shape \(8,\)", "any"),
    ("sor_dtype", lambda a: a.update(sor=a["sor"].long()),
     COMBINE + r": slot_of_row must be one of \{int32\}, got int64", "any"),
    ("sor_rows_disagree", lambda a: a.update(y=a["y"][:-1]),
     COMBINE + r": slot_of_row.shape\[0\] must be \d+, got shape \(\d+,\)", "any"),
    ("ros_value_out_of_range", lambda a: _set(a, "ros", 2, 1000),
     COMBINE + r": row_of_slot\[2\] = 1000 is out of range \[-1, \d+\)", "cpu"),
    ("maps_not_inverse", lambda a: _swap(a, "ros", 0, 1),
     COMBINE + r": row_of_slot and slot_of_row are not inverse maps: row_of_slot\[0\] = \d+ but slot_of_row\[\d+\] = 1",
     "cpu"),
    ("weights_device", lambda a: a.update(w=a["w"].cpu()),
     COMBINE + r": topk_weights is on cpu but y is on cuda:\d+; all tensors must be on one device", "cuda"),
]


def _combine_call(a):
    return ops.moe_combine(a["y"], a["ros"], a["sor"], a["w"], a["k"])


CBWD = r"moe_combine \(backward\)"
COMBINE_BWD_CASES = [
    ("dout_rows", lambda a: a.update(dout=a["dout"][:3]), CBWD + r": dout must have shape \(4, 16\), got \(3, 16\)",
     "any"),
    ("dout_cols", lambda a: a.update(dout=a["dout"][:, :8]), CBWD + r": dout must have shape \(4, 16\), got \(4, 8\)",
     "any"),
    ("dout_dtype", lambda a: a.update(dout=a["dout"].half()),
     CBWD + r": dout must have y's dtype float32, got float16", "any"),
    ("dout_rank", lambda a: a.update(dout=a["dout"][None]), CBWD + r": dout must have 2 dimensions", "any"),
    ("y_dtype", lambda a: a.update(y=a["y"].long()),
     CBWD + r": y must be one of \{float32, float16, bfloat16\}, got int64", "any"),
    ("sor_rows_disagree", lambda a: a.update(sor=a["sor"][:-1]),
     CBWD + r": slot_of_row.shape\[0\] must be \d+, got shape", "any"),
    ("weights_shape", lambda a: a.update(w=a["w"][:2]), CBWD + r": topk_weights must have shape \(4, 2\)", "any"),
    ("top_k_zero", lambda a: a.update(k=0), CBWD + r": top_k must be >= 1 and divide row_of_slot.shape\[0\] = 8, got 0",
     "any"),
    ("ros_value_out_of_range", lambda a: _set(a, "ros", 7, 77),
     CBWD + r": row_of_slot\[7\] = 77 is out of range", "cpu"),
    ("sor_value_out_of_range", lambda a: _set(a, "sor", 1, 8),
     CBWD + r": slot_of_row\[1\] = 8 is out of range \[-1, 8\)", "cpu"),
    ("maps_not_inverse", lambda a: _swap(a, "sor", *_first_real_rows(a)),
     CBWD + r": row_of_slot and slot_of_row are not inverse maps", "cpu"),
    ("dout_device", lambda a: a.update(dout=a["dout"].cpu()),
     CBWD + r": dout is on cpu but y is on cuda:\d+; all tensors must be on one device", "cuda"),
]


def _combine_bwd_call(a):
    return ops.moe_combine_bwd(a["dout"], a["y"], a["ros"], a["sor"], a["w"], a["k"], True)


def _public_args(device):
    ids = routed_ids(4, 8, 2, "uniform", device)
    plan = moe_permute_plan(ids, 8, 1)
    return SimpleNamespace(ids=ids, plan=plan, x=torch.randn(4, 16, device=device),
                           y=torch.randn(plan.num_rows, 16, device=device))


def _cpu_plan(t):
    return moe_permute_plan(torch.tensor([[0, 7], [1, 2]], dtype=torch.int32), 8, 1)


PUBLIC_CASES = [
    ("plan_ids_dtype", "any", lambda t: ops.moe_permute_plan(t.ids.long(), 8, 1),
     "moe_permute_plan: topk_ids must be one of {int32}"),
    ("plan_ids_rank", "any", lambda t: moe_permute_plan(t.ids.flatten(), 8, 1),
     "moe_permute_plan: topk_ids must have 2 dimensions"),
    ("plan_pad_to", "any", lambda t: moe_permute_plan(t.ids, 8, 0), r"pad_to must be in \[1, 4096\]"),
    ("plan_no_experts", "any", lambda t: moe_permute_plan(t.ids, 0, 1), r"num_experts must be in \[1, 2048\], got 0"),
    ("plan_too_many_experts", "any", lambda t: moe_permute_plan(t.ids, 4096, 1),
     r"num_experts must be in \[1, 2048\], got 4096"),
    ("gather_x_dtype", "any", lambda t: moe_gather(t.x.long(), t.plan), "moe_gather: x must be one of"),
    ("gather_tokens", "any", lambda t: moe_gather(torch.randn(5, 16, device=t.x.device), t.plan),
     r"row_of_slot must have x.shape\[0\] \* top_k = 10"),
    ("combine_weights_shape", "any", lambda t: moe_combine(t.y, t.plan, torch.rand(4, 3, device=t.y.device)),
     r"topk_weights must have shape \(4, 2\)"),
    ("combine_weights_dtype", "any", lambda t: moe_combine(t.y, t.plan, torch.rand(4, 2, device=t.y.device).half()),
     "topk_weights must be one of {float32}"),
    ("combine_rows", "any", lambda t: moe_combine(t.y[:-1], t.plan),
     r"slot_of_row.shape\[0\] must be 7, got shape \(8,\)"),
    ("combine_top_k", "any", lambda t: ops.moe_combine(t.y, t.plan.row_of_slot, t.plan.slot_of_row, None, 3),
     "top_k must be >= 1 and divide row_of_slot.shape"),
    ("plan_id_out_of_range", "cpu", lambda t: moe_permute_plan(torch.tensor([[0, 8], [1, 2]], dtype=torch.int32), 8, 1),
     r"topk_ids.flatten\(\)\[1\] = 8 is out of range for num_experts = 8"),
    ("plan_id_negative", "cpu", lambda t: moe_permute_plan(torch.tensor([[0, -8], [-1, -2]], dtype=torch.int32), 8, 1),
     "out of range for num_experts"),
    ("gather_slot_out_of_range", "cpu",
     lambda t: ops.moe_gather(torch.randn(2, 4), _cpu_plan(t).slot_of_row.index_fill(0, torch.tensor([0]), 99),
                              _cpu_plan(t).row_of_slot, 2),
     r"moe_gather: slot_of_row\[0\] = 99 is out of range"),
]


test_bad_input = bad_input_test(
    plan=mutation_table(_plan_args, _plan_call, PLAN_CASES), public=(_public_args, PUBLIC_CASES),
    gather=mutation_table(_maps_args, _gather_call, GATHER_CASES),
    gather_bwd=mutation_table(_maps_args, _gather_bwd_call, GATHER_BWD_CASES),
    combine=mutation_table(_maps_args, _combine_call, COMBINE_CASES),
    combine_bwd=mutation_table(_maps_args, _combine_bwd_call, COMBINE_BWD_CASES))


@pytest.mark.gpu
def test_cuda_memory_safe_for_bad_maps():
    """On CUDA the map values are not checked (a host sync). Every kernel bound-checks the entries
    it uses: an out-of-range slot_of_row entry makes its row padding (zero), an out-of-range
    row_of_slot entry drops its slot (adds nothing). No fault; the good rows are exact."""
    a = _maps_args("cuda")
    sor, ros = a["sor"].clone(), a["ros"].clone()
    r0 = int((sor >= 0).nonzero()[0])
    sor[r0] = 1 << 30
    xs = ops.moe_gather(a["x"], sor, ros, 2)
    ref = ops.moe_gather(a["x"], a["sor"], a["ros"], 2)
    torch.cuda.synchronize()
    assert (xs[r0] == 0).all()
    keep = torch.ones(xs.shape[0], dtype=torch.bool, device="cuda")
    keep[r0] = False
    assert torch.equal(xs[keep], ref[keep])
    ros[0], ros[3] = -5, 1 << 29
    out = ops.moe_combine(a["y"], ros, a["sor"], a["w"], 2)
    dx = ops.moe_gather_bwd(a["dxs"], ros, 2)
    dy, dw = ops.moe_combine_bwd(a["dout"], a["y"], ros, sor, a["w"], 2, True)
    torch.cuda.synchronize()
    ref = ops.moe_combine(a["y"], a["ros"], a["sor"], a["w"], 2)
    torch.testing.assert_close(out[2:], ref[2:])
    torch.testing.assert_close(out[0], a["w"][0, 1] * a["y"][a["ros"][1].long()])  # slot 0 dropped
    assert dw[0, 0] == 0 and dw[1, 1] == 0 and torch.isfinite(dw).all()
    assert torch.isfinite(dx).all() and torch.isfinite(dy).all() and (dy[r0] == 0).all()
    # out-of-range and negative expert ids in the plan: their slots get row -1
    ids = torch.tensor([[0, 1 << 20], [-3, 2]], dtype=torch.int32, device="cuda")
    plan = moe_permute_plan(ids, 4, 2)
    assert plan.row_of_slot.tolist()[1:3] == [-1, -1] and plan.expert_counts.sum().item() == 2
