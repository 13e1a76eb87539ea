"""Fused MoE router (nemokernels.moe.moe_router): chosen ids exactly and weights by relative
error against the float64 reference (nemokernels/moe/reference.py), ties broken by the lower
index, group-limited routing, top-k 1..32, odd token counts, gradients to the logits against
autograd of the reference, opcheck, torch.compile, CUDA graphs, bad input."""
from types import SimpleNamespace

import pytest
import torch

from nemokernels.moe import moe_router, router_logits
from nemokernels.moe import reference as R

from conftest import DEVICES
from helpers import assert_close, bad_input_test, mutation_table, opcheck, poison_allocator

ops = torch.ops.nemokernels


def near_tie_tokens(logits, bias, k, n_group, topk_group, eps=1e-5):
    """Tokens whose float64 choice has a near-tie that float32 rounding may flip: a gap below
    eps at the kept-group boundary or among the first k + 1 choice scores (their order is
    compared). Those tokens are excluded from the exact id comparison."""
    l64 = logits.double().cpu()
    b64 = None if bias is None else bias.double().cpu()
    _, choice = R.router_select_ref(l64, b64, k, n_group, topk_group)
    amb = torch.zeros(l64.shape[0], dtype=torch.bool)
    top = choice.sort(dim=-1, descending=True).values[:, : k + 1]
    fin = torch.isfinite(top)
    gaps = (top[:, :-1] - top[:, 1:]).abs()
    amb |= ((gaps < eps) & fin[:, :-1] & fin[:, 1:]).any(-1)
    if n_group > 1:
        scores = torch.sigmoid(l64) + (b64 if b64 is not None else 0)
        g = scores.view(l64.shape[0], n_group, -1)
        gs = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1).sort(dim=-1, descending=True).values
        if topk_group < n_group:
            amb |= (gs[:, topk_group - 1] - gs[:, topk_group]).abs() < eps
    return amb


def check_router(logits, bias, k, n_group=1, topk_group=1, norm=True, scale=1.0, exact_all=False):
    poison_allocator(logits.device)
    ids, w = moe_router(logits, bias, k, n_group, topk_group, norm, scale)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == w.shape == (logits.shape[0], k)
    l64 = logits.double().cpu()
    ref_ids, _ = R.router_select_ref(l64, None if bias is None else bias.double().cpu(), k, n_group, topk_group)
    keep = torch.ones(logits.shape[0], dtype=torch.bool) if exact_all else \
        ~near_tie_tokens(logits, bias, k, n_group, topk_group)
    assert logits.shape[0] < 8 or keep.float().mean() > 0.5, "test data has too many near-ties"
    assert torch.equal(ids.cpu().long()[keep], ref_ids[keep]), "chosen experts differ from the reference"
    # ids are distinct per token and in range
    assert ((ids >= 0) & (ids < logits.shape[1])).all()
    assert (ids.sort(-1).values[:, 1:] != ids.sort(-1).values[:, :-1]).all()
    ref_w = R.router_weights_ref(l64, ids.cpu().long(), norm, scale)
    assert_close(w, ref_w, torch.float32, what="topk_weights")
    return ids, w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize("E,k", [(8, 2), (128, 6), (512, 22), (64, 1), (40, 32)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_router_matches_reference(device, T, E, k, with_bias):
    logits = torch.randn(T, E, device=device) * 2
    bias = torch.randn(E, device=device) * 0.1 if with_bias else None
    check_router(logits, bias, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,k,n_group,topk_group", [(16, 4, 4, 2), (64, 6, 8, 3), (256, 8, 8, 4), (32, 4, 32, 4),
                                                    (96, 7, 3, 3), (64, 2, 4, 1)])
@pytest.mark.parametrize("norm,scale", [(True, 1.0), (False, 2.5), (True, 2.5)])
def test_router_groups(device, E, k, n_group, topk_group, norm, scale):
    logits = torch.randn(37, E, device=device)
    bias = torch.randn(E, device=device) * 0.2
    check_router(logits, bias, k, n_group, topk_group, norm, scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
def test_router_ties_prefer_lower_index(device, n_group, topk_group):
    """Many exact ties (logits on a coarse grid, biases 0 or 0.25): ids and their order are the
    stable descending order, the same on every device; group ties keep the lower group.

    With groups, the bias is one value per group. Per-expert biases would make group scores
    that are equal in exact arithmetic but sum different addends ((s_a + 0.25) + s_b against
    s_a + (s_b + 0.25)), so float32 and float64 rounding break those ties differently
    (seed 125520467 hit one). Per group, equal group scores are sums of identical addends,
    and distinct ones lie at least 3e-3 apart."""
    E, k = 64, 8
    logits = (torch.randint(0, 5, (37, E)) * 0.5).to(device)
    bias = (torch.randint(0, 2, (n_group,)) * 0.25).repeat_interleave(E // n_group).to(device) \
        if n_group > 1 else (torch.randint(0, 2, (E,)) * 0.25).to(device)
    check_router(logits, bias, k, n_group, topk_group, exact_all=True)
    # all equal: experts 0..k-1 in order
    ids, _ = moe_router(torch.zeros(3, E, device=device), None, k, n_group, topk_group)
    expect = torch.arange(k)
    if n_group > 1:  # equal groups: the first topk_group groups, lowest indices first
        expect = torch.arange(k)
    assert torch.equal(ids.cpu().long(), expect.expand(3, k))


@pytest.mark.parametrize("device", DEVICES)
def test_router_all_masked_groups_never_chosen(device):
    """With a huge bias on group 0's experts, only experts of kept groups are chosen."""
    E, G = 32, 4
    logits = torch.randn(37, E, device=device)
    bias = torch.zeros(E, device=device)
    bias[:8] = 10.0
    ids, _ = moe_router(logits, bias, 8, G, 1)
    assert (ids < 8).all()
    ids, _ = moe_router(logits, bias, 12, G, 2)
    assert (ids < 8).sum(-1).eq(8).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,scale", [(True, 1.0), (False, 1.0), (True, 2.5)])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_router_backward(device, norm, scale, n_group, topk_group):
    T, E, k = 37, 64, 6
    logits = (torch.randn(T, E, device=device) * 2).requires_grad_()
    bias = torch.randn(E, device=device) * 0.1
    ids, w = moe_router(logits, bias, k, n_group, topk_group, norm, scale)
    g = torch.randn(k, T, device=device).t()  # non-contiguous upstream gradient
    (dl,) = torch.autograd.grad(w, logits, g)
    l64 = logits.detach().double().cpu().requires_grad_()
    w64 = R.router_weights_ref(l64, ids.cpu().long(), norm, scale)
    (ref,) = torch.autograd.grad(w64, l64, g.double().cpu())
    assert_close(dl, ref, torch.float32, what="dlogits")
    # zero outside the chosen experts
    mask = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids.cpu().long(), True)
    assert (dl.cpu()[~mask] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_router_logits_and_empty(device):
    h = torch.randn(2, 5, 16, device=device, dtype=torch.bfloat16)
    wt = torch.randn(8, 16, device=device)
    lg = router_logits(h, wt)
    assert lg.dtype == torch.float32 and lg.shape == (10, 8)
    # against an independent float64 product (bf16 hidden states are exact in float64): only the
    # float32 accumulation of 16 terms separates them
    ref = h.reshape(10, 16).cpu().double() @ wt.cpu().double().T
    assert_close(lg, ref, torch.float32, what="router_logits")
    ids, w = moe_router(torch.empty(0, 8, device=device), None, 2)
    assert ids.shape == (0, 2) and w.shape == (0, 2)
    # strided logits (a column slice) work
    big = torch.randn(5, 16, device=device)
    check_router(big[:, ::2], None, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_router_opcheck(device):
    lg = torch.randn(5, 32, device=device, requires_grad=True)
    bias = torch.randn(32, device=device)
    # Every utility on logits without grad; with grad, all but the AOT one, whose gradient
    # check cannot seed the int32 first output (topk_ids). The gradient itself is checked
    # against the float64 reference in test_router_backward.
    opcheck(ops.moe_router, (lg.detach(), bias, 4, 4, 2, True, 2.0))
    opcheck(ops.moe_router, (lg.detach(), None, 3, 1, 1, False, 1.0))
    for args in [(lg, bias, 4, 4, 2, True, 2.0), (lg, None, 3, 1, 1, False, 1.0)]:
        torch.library.opcheck(ops.moe_router, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    ids, _ = ops.moe_router(lg.detach(), bias, 4, 4, 2, True, 2.0)
    opcheck(ops.moe_router_bwd, (torch.randn(5, 4, device=device), lg.detach(), ids, True, 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_router_compile_fullgraph(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    h = torch.randn(7, 16, device=device)
    wt = torch.randn(32, 16, device=device, requires_grad=True)
    bias = torch.randn(32, device=device) * 0.1

    def f(h, wt, bias):
        ids, w = moe_router(router_logits(h, wt), bias, 4, 4, 2, True, 2.5)
        return ids, (w * torch.arange(1.0, 5.0, device=h.device)).sum()

    ids_e, loss_e = f(h, wt, bias)
    (g_e,) = torch.autograd.grad(loss_e, wt)
    ids_c, loss_c = torch.compile(f, fullgraph=True, backend=backend)(h, wt, bias)
    (g_c,) = torch.autograd.grad(loss_c, wt)
    assert torch.equal(ids_e, ids_c)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(g_c, g_e)


@pytest.mark.gpu
def test_router_cuda_matches_cpu_bitwise():
    """Same ids (order included) and weights on CUDA and CPU, Super shapes. The device's expf
    and glibc's may differ by an ulp, so tokens with a float64 near-tie (1e-6) are left out of
    the id comparison; exact ties (equal logits) must still go to the lower index on both."""
    lg = torch.randn(300, 512)
    lg[:10, 100:140] = 2.5  # exact ties among the top choices
    bias = torch.randn(512) * 0.05
    bias[100:140] = 0.0
    for n_group, topk_group in ((1, 1), (8, 4)):
        ids_c, w_c = moe_router(lg, bias, 22, n_group, topk_group)
        ids_g, w_g = moe_router(lg.cuda(), bias.cuda(), 22, n_group, topk_group)
        keep = ~near_tie_tokens(lg, bias, 22, n_group, topk_group, eps=1e-6)
        keep[:10] = True
        assert torch.equal(ids_c[keep], ids_g.cpu()[keep])
        same = (ids_c == ids_g.cpu()).all(-1)
        torch.testing.assert_close(w_g.cpu()[same], w_c[same], rtol=2e-6, atol=1e-7)


@pytest.mark.gpu
def test_router_cuda_graph_replay():
    lg = torch.randn(64, 128, device="cuda")
    bias = torch.randn(128, device="cuda") * 0.1
    moe_router(lg, bias, 6)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ids, w = moe_router(lg, bias, 6)
    lg.copy_(torch.randn_like(lg))
    g.replay()
    ids2, w2 = moe_router(lg, bias, 6)
    assert torch.equal(ids, ids2) and torch.equal(w, w2)


# ---------------------------------------------------------------- bad input, table-driven
# One case per way a call can be wrong: rows (id, mutation of a valid call's arguments, regex of
# the message, where) as in helpers.mutation_table. "cpu" rows are value checks (they read the
# data, which on CUDA would need a host sync; the CUDA kernels are memory-safe for any value
# instead, see test_router_bwd_cuda_memory_safe_for_bad_ids). The public function's refusals are
# rows (id, where, call, regex) over _public_args.


def _router_args(device):
    return dict(logits=torch.randn(4, 16, device=device), bias=torch.zeros(16, device=device), top_k=2, n_group=4,
                topk_group=2, norm=True, scale=1.0)


def _router_call(a):
    return ops.moe_router(a["logits"], a["bias"], a["top_k"], a["n_group"], a["topk_group"], a["norm"], a["scale"])


ROUTER_CASES = [
    ("logits_dtype", lambda a: a.update(logits=a["logits"].double()),
     r"moe_router: logits must be one of \{float32\}, got float64", "any"),
    ("logits_rank", lambda a: a.update(logits=a["logits"][None]),
     r"moe_router: logits must have 2 dimensions, got shape \(1, 4, 16\)", "any"),
    ("no_experts", lambda a: a.update(logits=a["logits"][:, :0], bias=None),
     r"moe_router: logits.shape\[1\] \(the number of experts\) must be in \[1, 2048\], got shape \(4, 0\)", "any"),
    ("too_many_experts", lambda a: a.update(logits=torch.zeros(1, 4096, device=a["logits"].device), bias=None),
     r"moe_router: logits.shape\[1\] \(the number of experts\) must be in \[1, 2048\], got shape \(1, 4096\)", "any"),
    ("bias_size", lambda a: a.update(bias=a["bias"][:15]),
     r"moe_router: e_score_correction_bias.shape\[0\] must be 16, got shape \(15,\)", "any"),
    ("bias_rank", lambda a: a.update(bias=a["bias"][None]),
     r"moe_router: e_score_correction_bias must have 1 dimensions, got shape \(1, 16\)", "any"),
    ("bias_dtype", lambda a: a.update(bias=a["bias"].half()),
     r"moe_router: e_score_correction_bias must be one of \{float32\}, got float16", "any"),
    ("top_k_zero", lambda a: a.update(top_k=0), r"moe_router: top_k must be in \[1, 32\], got 0", "any"),
    ("top_k_above_experts", lambda a: a.update(top_k=17, n_group=1, topk_group=1),
     r"moe_router: top_k must be at most the number of experts 16, got 17", "any"),
    ("n_group_not_dividing", lambda a: a.update(n_group=3),
     r"moe_router: n_group must be >= 1 and divide the number of experts 16, got 3", "any"),
    ("n_group_zero", lambda a: a.update(n_group=0),
     r"moe_router: n_group must be >= 1 and divide the number of experts 16, got 0", "any"),
    ("topk_group_above_n_group", lambda a: a.update(topk_group=5),
     r"moe_router: topk_group must be in \[1, n_group = 4\], got 5", "any"),
    ("top_k_beyond_kept_groups", lambda a: a.update(top_k=5, topk_group=1),
     r"moe_router: top_k = 5 exceeds the 4 experts of the topk_group = 1 kept groups \(4 experts each\)", "any"),
    ("bias_device", lambda a: a.update(bias=a["bias"].cpu()),
     r"moe_router: e_score_correction_bias is on cpu but logits is on cuda:\d+; all tensors must be on one device",
     "cuda"),
    ("tokens_past_grid", lambda a: a.update(logits=torch.zeros(1, 1, device="cuda").expand(4 * 2**31, 1), bias=None,
                                            top_k=1, n_group=1, topk_group=1),
     r"moe_router: logits.shape\[0\] \(tokens\) = 8589934592 exceeds 8589934588, the most the CUDA kernels take",
     "cuda"),
]


def _router_bwd_args(device):
    logits = torch.randn(4, 16, device=device)
    return dict(dweights=torch.randn(4, 3, device=device), logits=logits,
                ids=torch.tensor([[0, 5, 9], [1, 2, 3], [15, 14, 13], [7, 8, 6]], dtype=torch.int32, device=device))


def _router_bwd_call(a):
    return ops.moe_router_bwd(a["dweights"], a["logits"], a["ids"], True, 1.0)


def _set(a, key, idx, value):
    a[key] = a[key].clone()
    a[key][idx] = value


OP_BWD = r"moe_router \(backward\)"
ROUTER_BWD_CASES = [
    ("logits_dtype", lambda a: a.update(logits=a["logits"].half()),
     OP_BWD + r": logits must be one of \{float32\}, got float16", "any"),
    ("logits_rank", lambda a: a.update(logits=a["logits"][:, None]),
     OP_BWD + r": logits must have 2 dimensions, got shape \(4, 1, 16\)", "any"),
    ("no_experts", lambda a: a.update(logits=a["logits"][:, :0]),
     OP_BWD + r": logits.shape\[1\] \(the number of experts\) must be in \[1, 2048\]", "any"),
    ("ids_dtype", lambda a: a.update(ids=a["ids"].long()), OP_BWD + r": topk_ids must be one of \{int32\}, got int64",
     "any"),
    ("ids_rank", lambda a: a.update(ids=a["ids"].flatten()),
     OP_BWD + r": topk_ids must have 2 dimensions, got shape \(12,\)", "any"),
    ("ids_tokens", lambda a: a.update(ids=a["ids"][:3]),
     OP_BWD + r": topk_ids.shape\[0\] must be 4, got shape \(3, 3\)", "any"),
    ("ids_k_zero", lambda a: a.update(ids=a["ids"][:, :0], dweights=a["dweights"][:, :0]),
     OP_BWD + r": topk_ids.shape\[1\] must be in \[1, min\(32, experts\)\], got shape \(4, 0\)", "any"),
    ("ids_k_above_experts", lambda a: a.update(logits=a["logits"][:, :2]),
     OP_BWD + r": topk_ids.shape\[1\] must be in \[1, min\(32, experts\)\], got shape \(4, 3\)", "any"),
    ("dweights_dtype", lambda a: a.update(dweights=a["dweights"].bfloat16()),
     OP_BWD + r": dweights must be one of \{float32\}, got bfloat16", "any"),
    ("dweights_rank", lambda a: a.update(dweights=a["dweights"].flatten()),
     OP_BWD + r": dweights must have 2 dimensions, got shape \(12,\)", "any"),
    ("dweights_shape", lambda a: a.update(dweights=a["dweights"][:, :2]),
     OP_BWD + r": dweights must have topk_ids's shape \(4, 3\), got \(4, 2\)", "any"),
    ("id_past_experts", lambda a: _set(a, "ids", (2, 1), 16),
     OP_BWD + r": topk_ids\[2, 1\] = 16 is out of range for 16 experts", "cpu"),
    ("id_negative", lambda a: _set(a, "ids", (0, 0), -1),
     OP_BWD + r": topk_ids\[0, 0\] = -1 is out of range for 16 experts", "cpu"),
    ("id_repeated", lambda a: _set(a, "ids", (1, 2), 1),
     OP_BWD + r": topk_ids\[1, 2\] = 1 repeats topk_ids\[1, 0\]; each token's chosen experts must be distinct", "cpu"),
    ("ids_device", lambda a: a.update(ids=a["ids"].cpu()),
     OP_BWD + r": topk_ids is on cpu but logits is on cuda:\d+; all tensors must be on one device", "cuda"),
    ("dweights_device", lambda a: a.update(dweights=a["dweights"].cpu()),
     OP_BWD + r": dweights is on cpu but logits is on cuda:\d+; all tensors must be on one device", "cuda"),
]


def _public_args(device):
    return SimpleNamespace(lg=torch.randn(4, 16, device=device))


PUBLIC_CASES = [
    ("logits_dtype", "any", lambda t: moe_router(t.lg.half(), None, 2), "moe_router: logits must be one of {float32}"),
    ("top_k_above_experts", "any", lambda t: moe_router(t.lg, None, 17),
     "top_k must be at most the number of experts 16"),
    ("top_k_past_32", "any", lambda t: moe_router(torch.randn(4, 64, device=t.lg.device), None, 33),
     r"top_k must be in \[1, 32\]"),
    ("n_group", "any", lambda t: moe_router(t.lg, None, 2, n_group=3),
     "n_group must be >= 1 and divide the number of experts 16"),
    ("topk_group", "any", lambda t: moe_router(t.lg, None, 2, n_group=4, topk_group=5),
     r"topk_group must be in \[1, n_group = 4\]"),
    ("top_k_beyond_kept_groups", "any", lambda t: moe_router(t.lg, None, 5, n_group=4, topk_group=1),
     "exceeds the 4 experts of the topk_group = 1 kept groups"),
    ("bias_size", "any", lambda t: moe_router(t.lg, torch.zeros(15, device=t.lg.device), 2),
     r"e_score_correction_bias.shape\[0\] must be 16"),
    ("logits_rank", "any", lambda t: moe_router(t.lg[None], None, 2), "logits must have 2 dimensions"),
    ("too_many_experts", "any", lambda t: moe_router(torch.randn(1, 4096, device=t.lg.device), None, 2),
     r"number of experts\) must be in \[1, 2048\]"),
    ("bwd_dweights_shape", "any",
     lambda t: ops.moe_router_bwd(torch.zeros(4, 3, device=t.lg.device), t.lg,
                                  torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=torch.int32, device=t.lg.device),
                                  True, 1.0),
     "dweights must have topk_ids's shape"),
    ("bwd_id_out_of_range", "cpu",
     lambda t: ops.moe_router_bwd(torch.ones(2, 2), t.lg[:2, :8], torch.tensor([[0, 9], [1, 2]], dtype=torch.int32),
                                  True, 1.0),
     r"topk_ids\[0, 1\] = 9 is out of range for 8 experts"),
]


test_bad_input = bad_input_test(
    router=mutation_table(_router_args, _router_call, ROUTER_CASES),
    router_bwd=mutation_table(_router_bwd_args, _router_bwd_call, ROUTER_BWD_CASES),
    public=(_public_args, PUBLIC_CASES))


@pytest.mark.parametrize("device", DEVICES)
def test_router_nan_and_inf_logits_rank_like_topk(device):
    """The defined behaviour for non-finite logits: a NaN logit ranks above every number (as
    torch.topk ranks NaN) and its token's normalised weights are NaN; +inf / -inf are ordinary
    extremes (score 1 / 0). Other tokens are untouched."""
    logits = torch.randn(3, 16, device=device)
    logits[0, 5] = float("nan")
    logits[1, 9] = float("inf")
    logits[2, :] = float("-inf")
    logits[2, 3] = 0.0
    ids, w = moe_router(logits, None, 2)
    assert ids[0, 0].item() == 5 and torch.isnan(w[0]).all()
    assert ids[1, 0].item() == 9 and torch.isfinite(w[1]).all()
    # row 2: expert 3 (score 0.5) first, then the lowest index among the -inf (score 0) ties
    assert ids[2].tolist() == [3, 0]
    torch.testing.assert_close(w[2].cpu(), torch.tensor([1.0, 0.0]))


@pytest.mark.gpu
def test_router_bwd_cuda_memory_safe_for_bad_ids():
    """On CUDA the id values are not checked (a host sync): an out-of-range or negative id
    contributes nothing and a repeated id writes one in-range entry. No fault, every other
    entry of its row zero, the rows with valid ids equal to the CPU result."""
    logits = torch.randn(4, 16)
    ids = torch.tensor([[0, 5, 9], [1, 2, 3], [15, 14, 13], [7, 8, 6]], dtype=torch.int32)
    bad = ids.clone()
    bad[0, 1] = 1 << 20
    bad[1, 0] = -7
    bad[2, 2] = 15
    g = torch.randn(4, 3)
    dl = ops.moe_router_bwd(g.cuda(), logits.cuda(), bad.cuda(), True, 1.0)
    torch.cuda.synchronize()
    assert torch.isfinite(dl).all()
    ref = ops.moe_router_bwd(g, logits, ids, True, 1.0)
    torch.testing.assert_close(dl[3].cpu(), ref[3], rtol=2e-6, atol=1e-7)
    for row, allowed in ((0, {0, 9}), (1, {2, 3}), (2, {15, 14})):
        nz = set(dl[row].nonzero().flatten().tolist())
        assert nz <= allowed, (row, nz)
