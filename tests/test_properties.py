"""Property-based tests (hypothesis): shapes, strides and options drawn at random for each
family's ops on the CPU, against the float64 references. Bounded in time: a fixed number of
examples per op (NK_HYPOTHESIS_EXAMPLES, default 40), no deadline per example. A failure
prints the falsifying example; hypothesis replays it first on the next run."""
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nemokernels as nk  # noqa: E402
from nemokernels import moe, nvfp4, speculative  # noqa: E402
from nemokernels.moe.reference import (combine_ref, gather_ref, permute_plan_ref, relu2,  # noqa: E402
                                       router_select_ref)
from nemokernels.nvfp4.reference import quantize_ref  # noqa: E402
from nemokernels.nvfp4.reference import gemm_reference  # noqa: E402
from nemokernels.ssd.reference import (causal_conv1d_ref, rmsnorm_gated_ref, selective_state_update_ref,  # noqa: E402
                                       ssd_scan_ref)
from nemokernels.speculative.reference import verify_greedy_ref  # noqa: E402

from helpers import assert_close_to_magnitude, rel_err  # noqa: E402

EXAMPLES = int(os.environ.get("NK_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=False, print_blob=True,
                    suppress_health_check=list(hypothesis.HealthCheck))
F32, F64 = torch.float32, torch.float64


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` in another memory layout: contiguous, every other element of a
    wider buffer along the last dim, or the last two dims stored transposed."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "sliced":
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype).fill_(float("nan"))
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)  # "transposed"


layouts = st.sampled_from(["contiguous", "sliced", "transposed"])
seeds = st.integers(0, 2**31 - 1)


@SETTINGS
@given(batch=st.integers(1, 3), dim=st.integers(1, 24), seqlen=st.integers(1, 40), width=st.integers(2, 4),
       bias=st.booleans(), act=st.sampled_from([None, "silu"]), layout=layouts, seed=seeds)
def test_causal_conv1d(batch, dim, seqlen, width, bias, act, layout, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, seqlen, generator=g)
    w = torch.randn(dim, width, generator=g)
    b = torch.randn(dim, generator=g) if bias else None
    out = nk.causal_conv1d_fn(strided(x, layout), w, b, activation=act)
    ref = causal_conv1d_ref(x.double(), w.double(), None if b is None else b.double(), activation=act)
    # Elementwise against |w| * |x| + |b| (silu' <= 1.1): a single output whose terms cancel is
    # rounded relative to the terms, not to itself (the class of the rmsnorm/state-update bounds).
    mag = causal_conv1d_ref(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    assert_close_to_magnitude(out, ref, mag, 1e-5, what="causal_conv1d_fn")


@SETTINGS
@given(batch=st.integers(1, 2), seqlen=st.integers(1, 48), ngroups=st.sampled_from([1, 2]),
       heads_per_group=st.integers(1, 3), headdim=st.integers(1, 9), dstate=st.integers(1, 12),
       chunk=st.sampled_from([1, 4, 7, 16]), has_d=st.booleans(), has_z=st.booleans(), seed=seeds)
def test_ssd_chunk_scan(batch, seqlen, ngroups, heads_per_group, headdim, dstate, chunk, has_d, has_z, seed):
    g = torch.Generator().manual_seed(seed)
    H = ngroups * heads_per_group
    x = torch.randn(batch, seqlen, H, headdim, generator=g)
    dt = torch.randn(batch, seqlen, H, generator=g) * 0.5 - 1
    A = -torch.exp(torch.randn(H, generator=g) * 0.5)
    B = torch.randn(batch, seqlen, ngroups, dstate, generator=g)
    C = torch.randn(batch, seqlen, ngroups, dstate, generator=g)
    D = torch.randn(H, generator=g) if has_d else None
    z = torch.randn(batch, seqlen, H, headdim, generator=g) if has_z else None
    dt_bias = torch.randn(H, generator=g) * 0.5
    y, final = nk.mamba_chunk_scan_combined(x, dt, A, B, C, chunk, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                            return_final_states=True)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y_ref, final_ref = ssd_scan_ref(d(x), d(dt), d(A), d(B), d(C), D=d(D), z=d(z), dt_bias=d(dt_bias),
                                    dt_softplus=True, return_final_states=True)
    assert rel_err(y, y_ref) < 1e-4 and rel_err(final, final_ref) < 1e-4


@SETTINGS
@given(batch=st.integers(1, 4), ngroups=st.sampled_from([1, 2]), heads_per_group=st.integers(1, 3),
       headdim=st.integers(1, 10), dstate=st.integers(1, 20), has_d=st.booleans(), has_z=st.booleans(),
       layout=layouts, seed=seeds)
def test_selective_state_update(batch, ngroups, heads_per_group, headdim, dstate, has_d, has_z, layout, seed):
    g = torch.Generator().manual_seed(seed)
    H = ngroups * heads_per_group
    state = torch.randn(batch, H, headdim, dstate, generator=g)
    x = torch.randn(batch, H, headdim, generator=g)
    dt = torch.randn(batch, H, headdim, generator=g) * 0.5 - 1
    A = -torch.exp(torch.randn(H, headdim, dstate, generator=g) * 0.5)
    B = torch.randn(batch, ngroups, dstate, generator=g)
    C = torch.randn(batch, ngroups, dstate, generator=g)
    D = torch.randn(H, headdim, generator=g) if has_d else None
    z = torch.randn(batch, H, headdim, generator=g) if has_z else None
    bias = torch.randn(H, headdim, generator=g) * 0.5
    ref_state = state.double()
    ref = selective_state_update_ref(ref_state, x.double(), dt.double(), A.double(), B.double(), C.double(),
                                     None if D is None else D.double(), None if z is None else z.double(),
                                     bias.double(), dt_softplus=True)
    ref_out = ref[0] if isinstance(ref, tuple) else ref
    st_ = strided(state, layout)
    out = nk.selective_state_update(st_, strided(x, layout), dt, A, B, C, D, z, bias, dt_softplus=True)
    # Elementwise against the magnitude of the terms: the same update on |state|, |x|, |B|, |C|,
    # |D| (dt' and exp(dt' A) are positive), times |silu(z)|. Sums that cancel leave an output near
    # 0 whose float32 rounding is relative to the terms (a relative norm failed a correct kernel
    # at headdim 1, dstate 4, seed 1: 0.0008 off by 1.6e-5 relative).
    mag_out, mag_state = selective_state_update_ref(
        state.double().abs(), x.double().abs(), dt.double(), A.double(), B.double().abs(), C.double().abs(),
        None if D is None else D.double().abs(), None, bias.double(), dt_softplus=True)
    if z is not None:
        mag_out = mag_out * torch.nn.functional.silu(z.double()).abs()
    assert_close_to_magnitude(out, ref_out, mag_out, 1e-5, what="selective_state_update out")
    assert_close_to_magnitude(st_, ref[1] if isinstance(ref, tuple) else ref_state, mag_state, 1e-5,
                              what="selective_state_update state")


@SETTINGS
@given(rows=st.integers(1, 6), ngroups=st.integers(1, 4), group_size=st.integers(1, 24), has_z=st.booleans(),
       before=st.booleans(), bias=st.booleans(), layout=layouts, seed=seeds)
def test_rmsnorm_gated(rows, ngroups, group_size, has_z, before, bias, layout, seed):
    g = torch.Generator().manual_seed(seed)
    Dm = ngroups * group_size
    x = torch.randn(rows, Dm, generator=g)
    z = torch.randn(rows, Dm, generator=g) if has_z else None
    w = 1 + 0.1 * torch.randn(Dm, generator=g)
    b = torch.randn(Dm, generator=g) if bias else None
    out = nk.rmsnorm_fn(strided(x, layout), w, b, z=z, eps=1e-5, group_size=group_size, norm_before_gate=before)
    ref = rmsnorm_gated_ref(x.double(), w.double(), None if b is None else b.double(),
                            z=None if z is None else z.double(), eps=1e-5, group_size=group_size,
                            norm_before_gate=before)
    # Elementwise against the magnitude of the terms (|x rstd w| + |b|, times |silu(z)| when the
    # gate comes last): a bias that cancels the normed term leaves an output near 0 whose float32
    # rounding is relative to the terms, not to the output (a relative norm failed a correct kernel
    # at rows 1, group_size 1, seed 875: -0.0013 off by 1.8e-5 relative, 2.3e-8 absolute).
    x64, z64 = x.double(), None if z is None else z.double()
    u = x64 if z64 is None or before else x64 * torch.nn.functional.silu(z64)
    mag = rmsnorm_gated_ref(u.abs(), w.double().abs(), None if b is None else b.double().abs(), eps=1e-5,
                            group_size=group_size)
    if z64 is not None and before:
        mag = mag * torch.nn.functional.silu(z64).abs()
    assert_close_to_magnitude(out, ref, mag, 1e-5, what="rmsnorm_fn")


@SETTINGS
@given(tokens=st.integers(1, 9), n_group=st.sampled_from([1, 2, 4]), per_group=st.integers(2, 8), data=st.data(),
       seed=seeds)
def test_moe_router_plan_gather_combine(tokens, n_group, per_group, data, seed):
    g = torch.Generator().manual_seed(seed)
    E = n_group * per_group
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, topk_group * per_group))
    pad_to = data.draw(st.sampled_from([1, 4]))
    logits = torch.randn(tokens, E, generator=g)
    bias = torch.randn(E, generator=g) * 0.1
    ids, weights = moe.moe_router(logits, bias, top_k=k, n_group=n_group, topk_group=topk_group)
    ref_ids, choice = router_select_ref(logits.double(), bias.double(), k, n_group, topk_group)
    # Same experts in the same order, up to float32-vs-float64 near-ties (equal choice scores).
    assert torch.allclose(choice.gather(1, ids.long()), choice.gather(1, ref_ids), rtol=0, atol=1e-6)
    assert all(len(set(r.tolist())) == k for r in ids)
    plan = moe.moe_permute_plan(ids, E, pad_to)
    counts, offsets, row_of_slot, slot_of_row = permute_plan_ref(ids, E, pad_to)
    assert torch.equal(plan.expert_offsets.long(), offsets) and torch.equal(plan.row_of_slot.long(), row_of_slot)
    x = torch.randn(tokens, 5, generator=g)
    xs = moe.moe_gather(x, plan)
    assert rel_err(xs, gather_ref(x.double(), plan.slot_of_row, k)) < 1e-6
    y = torch.randn(xs.shape, generator=g)
    out = moe.moe_combine(y, plan, weights)
    mag = combine_ref(y.double().abs(), plan.row_of_slot, weights.double().abs(), k)  # |w| |y|: cancellation-proof
    assert_close_to_magnitude(out, combine_ref(y.double(), plan.row_of_slot, weights.double(), k), mag, 1e-5,
                              what="moe_combine")


@SETTINGS
@given(E=st.integers(1, 5), N=st.integers(1, 20), K=st.integers(1, 20), relu=st.booleans(), data=st.data(),
       seed=seeds)
def test_grouped_gemm(E, N, K, relu, data, seed):
    g = torch.Generator().manual_seed(seed)
    counts = data.draw(st.lists(st.integers(0, 7), min_size=E, max_size=E))
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    R = int(offsets[-1]) + data.draw(st.integers(0, 3))  # rows past offsets[E] must come out zero
    a = torch.randn(R, K, generator=g)
    w = torch.randn(E, N, K, generator=g)
    out = moe.grouped_gemm(a, w, offsets, "relu2" if relu else "none")
    ref = torch.zeros(R, N, dtype=F64)
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        ref[lo:hi] = a[lo:hi].double() @ w[e].double().T
    ref = relu2(ref) if relu else ref
    scale = (a.double().abs() @ w.double().abs().amax(0).T)  # |a| |w|: a bound that stays meaningful near 0
    assert bool(((out.double() - ref).abs() <= 1e-5 * (scale + 1) ** (2 if relu else 1)).all())


@SETTINGS
@given(rows=st.integers(1, 20), blocks=st.integers(1, 4), block_2d=st.booleans(), layout=layouts, seed=seeds)
def test_nvfp4_quantize_and_gemm(rows, blocks, block_2d, layout, seed):
    g = torch.Generator().manual_seed(seed)
    K = 16 * blocks
    if block_2d:
        rows = 16 * ((rows + 15) // 16)
    x = torch.randn(rows, K, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    q = nvfp4.quantize(strided(x, layout), block_2d=block_2d)
    ref = quantize_ref(x, block_2d=block_2d)
    assert torch.equal(q.data, ref.data) and torch.equal(q.scales.view(torch.uint8), ref.scales.view(torch.uint8))
    b = nvfp4.quantize(torch.randn(7, K, generator=g))
    out = nvfp4.gemm(q, b, out_dtype=F32)
    exact = gemm_reference(q, b, out_dtype=F64)
    bound = nvfp4.dequantize(q, F32).double().abs() @ nvfp4.dequantize(b, F32).double().abs().T
    assert bool(((out.double() - exact).abs() <= 1e-5 * bound + 1e-30).all())


@SETTINGS
@given(batch=st.integers(1, 4), k=st.integers(1, 5), vocab=st.integers(2, 300), ragged=st.booleans(), seed=seeds)
def test_verify_greedy(batch, k, vocab, ragged, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=g)
    best = logits.argmax(-1)
    # Drafts that agree with the target's argmax for a random prefix, so every accept length occurs.
    agree = torch.randint(0, k + 1, (batch,), generator=g)
    drafts = torch.randint(0, vocab, (batch, k), generator=g)
    for b in range(batch):
        drafts[b, : int(agree[b])] = best[b, : int(agree[b])]
    nd = torch.randint(0, k + 1, (batch,), generator=g) if ragged else None
    tokens, accepted = speculative.verify_greedy(drafts, logits, nd)
    tokens_ref, accepted_ref = verify_greedy_ref(drafts, logits.double(), nd)
    assert torch.equal(tokens.long(), tokens_ref.long()) and torch.equal(accepted.long(), accepted_ref.long())
