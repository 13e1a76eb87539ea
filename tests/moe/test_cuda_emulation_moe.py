"""The MoE CUDA kernels (csrc/moe/router_cuda.cu, csrc/moe/permute_cuda.cu) run on the CPU through
the emulator in tools/cuda_emu (see tests/cuda_emu.py and tools/cuda_emu/README.md):
each .cu file is rewritten by transform.py, compiled with g++ against the mock CUDA headers and
driven through tools/cuda_emu/driver_moe_{router,permute}.cpp with the same parameter structs the
op entries fill. Every output is poisoned first. The emulated kernels must agree with the CPU
kernels through the public API: router ids (order included), plans, gathers, combines and the
gather backward bit for bit (same arithmetic, same order, same libm); the router backward bit for
bit; the combine backward's dweights (a different summation order) to float32 rounding.
"""
import functools

import pytest
import torch

import cuda_emu as base  # build helpers: compiler id, flags, transform, params

EMU, CSRC = base.EMU, base.CSRC
DT_ENUM = base.DT_ENUM
UNITS = {
    "router": (CSRC / "moe" / "router_cuda.cu", CSRC / "moe" / "router.h", ("RouterParams", "RouterBwdParams")),
    "permute": (CSRC / "moe" / "permute_cuda.cu", CSRC / "moe" / "permute.h",
                ("PermutePlanParams", "GatherParams", "GatherBwdParams", "CombineParams", "CombineBwdParams")),
}


@functools.cache
def emu(unit):
    """The emulated router or permute library (cached by content hash, see base.build_emulated)."""
    kernel, header, structs = UNITS[unit]
    return base.EmuLibrary.build(f"moe_{unit}", EMU / f"driver_moe_{unit}.cpp", [kernel], ("moe",), header=header,
                                 structs=structs)


def moe_api():
    try:
        import nemokernels.moe as moe
        return moe
    except Exception as e:  # pragma: no cover
        pytest.skip(f"nemokernels extension not importable: {e}")


def ptr(t):
    return 0 if t is None else t.data_ptr()


def ipoison(*shape):
    return torch.full(shape, -777, dtype=torch.int32)


@pytest.mark.parametrize("unit", list(UNITS))
def test_layouts_agree(unit):
    emu(unit).check_layouts()


def run_router(logits, bias, k, n_group, topk_group, norm, scale):
    e = emu("router")
    T, E = logits.shape
    ids, w = ipoison(T, k), torch.full((T, k), float("nan"))
    p = e.S["RouterParams"]()
    p.tokens, p.experts, p.top_k, p.n_group, p.topk_group = T, E, k, n_group, topk_group
    p.norm, p.scale = norm, scale
    p.logits, p.logits_st, p.bias = logits.data_ptr(), logits.stride(0), ptr(bias)
    p.ids, p.weights = ids.data_ptr(), w.data_ptr()
    e.call("emu_moe_router_cuda", p)
    return ids, w


@pytest.mark.parametrize("T,E,k,n_group,topk_group", [(5, 512, 22, 1, 1), (9, 128, 6, 1, 1), (6, 64, 8, 8, 3),
                                                      (3, 96, 32, 32, 24), (7, 40, 1, 4, 2), (1, 8, 8, 1, 1),
                                                      (2, 2048, 32, 32, 8), (3, 300, 10, 1, 1), (4, 512, 22, 8, 4),
                                                      (2, 520, 7, 1, 1)])
def test_router(T, E, k, n_group, topk_group):
    moe = moe_api()
    g = torch.Generator().manual_seed(T * 1000 + E)
    logits = torch.randn(T, E, generator=g) * 2
    logits[0, : E // 2] = 0.25  # exact ties
    bias = torch.randn(E, generator=g) * 0.1
    for b in (bias, None):
        for norm, scale in ((True, 2.5), (False, 1.0)):
            ids, w = run_router(logits, b, k, n_group, topk_group, norm, scale)
            rids, rw = moe.moe_router(logits, b, k, n_group, topk_group, norm, scale)
            assert torch.equal(ids, rids), (ids, rids)
            assert torch.equal(w, rw)
    # backward
    e = emu("router")
    dw = torch.randn(k, T, generator=g).t()  # strided rows (dw_st = 1? no: rows of a transpose)
    dw = dw.contiguous()
    dl = torch.full((T, E), float("nan"))
    p = e.S["RouterBwdParams"]()
    p.tokens, p.experts, p.top_k, p.norm, p.scale = T, E, k, True, 2.5
    p.dweights, p.dw_st, p.logits, p.logits_st = dw.data_ptr(), dw.stride(0), logits.data_ptr(), logits.stride(0)
    p.ids, p.dlogits = rids.data_ptr(), dl.data_ptr()
    rids, _ = moe.moe_router(logits, bias, k, n_group, topk_group, True, 2.5)
    p.ids = rids.data_ptr()
    e.call("emu_moe_router_bwd_cuda", p)
    ref = torch.ops.nemokernels.moe_router_bwd(dw, logits, rids, True, 2.5)
    assert torch.equal(dl, ref)


def run_plan(ids, E, pad_to):
    e = emu("permute")
    N = ids.numel()
    R = N + E * (pad_to - 1)
    chunks = (N + 511) // 512  # kPermChunk
    scratch = ipoison(max(chunks, 1), E)
    counts, offsets, ros, sor = ipoison(E), ipoison(E + 1), ipoison(N), ipoison(R)
    p = e.S["PermutePlanParams"]()
    p.slots, p.experts, p.pad_to, p.rows = N, E, pad_to, R
    p.ids, p.num_chunks, p.chunk_counts = ids.data_ptr(), chunks, scratch.data_ptr()
    p.counts, p.offsets, p.row_of_slot, p.slot_of_row = counts.data_ptr(), offsets.data_ptr(), ros.data_ptr(), sor.data_ptr()
    e.call("emu_moe_permute_plan_cuda", p)
    return counts, offsets, ros, sor


@pytest.mark.parametrize("T,E,k,pad_to", [(1, 8, 2, 1), (37, 16, 4, 16), (128, 64, 4, 1), (171, 64, 3, 16),
                                          (300, 64, 8, 128), (1000, 512, 22, 128), (5, 2048, 3, 4),
                                          (300, 2048, 4, 2)])
def test_plan(T, E, k, pad_to):
    moe = moe_api()
    g = torch.Generator().manual_seed(T + E)
    if T == 1000:  # skewed: a few experts take most slots, many get none
        ids = (torch.rand(T, E, generator=g) * torch.linspace(4, 0, E) ** 4).argsort(-1, descending=True)[:, :k]
    else:
        ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    ids = ids.to(torch.int32).contiguous()
    got = run_plan(ids, E, pad_to)
    ref = moe.moe_permute_plan(ids, E, pad_to)
    for name, a, b in zip(("counts", "offsets", "row_of_slot", "slot_of_row"), got, ref[:4]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("repeat", [1, 100])  # one launch (6 slots) and the multi-kernel path (600 slots)
def test_plan_drops_out_of_range_ids(repeat):
    ids = torch.tensor([[0, 8], [1, -3], [0, 2]] * repeat, dtype=torch.int32)
    counts, offsets, ros, sor = run_plan(ids, 8, 1)
    assert ros[:6].tolist() == [0, -1, 2 * repeat, -1, 1, 3 * repeat]
    assert counts.sum().item() == 4 * repeat and offsets[-1].item() == 4 * repeat
    assert sor.tolist()[:2] == [0, 4] and (sor[4 * repeat:] == -1).all()
    assert (ros.view(-1, 2)[:, 1][1::3] == -1).all() and (ros.view(-1, 2)[:, 1][0::3] == -1).all()


def _sliced(t):
    """Same values with misaligned rows (the scalar path)."""
    w = torch.zeros(t.shape[0], t.shape[1] + 1, dtype=t.dtype)
    w[:, 1:] = t
    return w[:, 1:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["aligned", "sliced"])
def test_gather_combine(dtype, layout):
    moe = moe_api()
    e = emu("permute")
    g = torch.Generator().manual_seed(3)
    T, E, k, L, pad_to = 23, 16, 4, 200 if dtype == torch.float32 else 264, 8
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k].to(torch.int32).contiguous()
    plan = moe.moe_permute_plan(ids, E, pad_to)
    R = plan.num_rows
    x = torch.randn(T, L, generator=g).to(dtype)
    y = torch.randn(R, L, generator=g).to(dtype)
    dout = torch.randn(T, L, generator=g).to(dtype)
    w = torch.rand(T, k, generator=g)
    if layout == "sliced":
        x, y, dout = _sliced(x), _sliced(y), _sliced(dout)
    poison = float("nan")
    # gather
    out = torch.full((R, L), poison, dtype=dtype)
    p = e.S["GatherParams"]()
    p.tokens, p.rows, p.width, p.top_k, p.dtype = T, R, L, k, DT_ENUM[dtype]
    p.x, p.x_st, p.slot_of_row, p.out = x.data_ptr(), x.stride(0), plan.slot_of_row.data_ptr(), out.data_ptr()
    e.call("emu_moe_gather_cuda", p)
    assert torch.equal(out, moe.moe_gather(x, plan))
    # gather backward
    dx = torch.full((T, L), poison, dtype=dtype)
    p = e.S["GatherBwdParams"]()
    p.tokens, p.rows, p.width, p.top_k, p.dtype = T, R, L, k, DT_ENUM[dtype]
    p.dxs, p.dxs_st, p.row_of_slot, p.dx = y.data_ptr(), y.stride(0), plan.row_of_slot.data_ptr(), dx.data_ptr()
    e.call("emu_moe_gather_bwd_cuda", p)
    assert torch.equal(dx, torch.ops.nemokernels.moe_gather_bwd(y, plan.row_of_slot, k))
    # combine, with and without weights
    for wt in (w, None):
        o = torch.full((T, L), poison, dtype=dtype)
        p = e.S["CombineParams"]()
        p.tokens, p.rows, p.width, p.top_k, p.dtype = T, R, L, k, DT_ENUM[dtype]
        p.y, p.y_st, p.row_of_slot, p.slot_of_row = y.data_ptr(), y.stride(0), plan.row_of_slot.data_ptr(), plan.slot_of_row.data_ptr()
        p.weights, p.out = ptr(wt), o.data_ptr()
        e.call("emu_moe_combine_cuda", p)
        assert torch.equal(o, moe.moe_combine(y, plan, wt))
        # combine backward
        dy = torch.full((R, L), poison, dtype=dtype)
        dw = torch.full((T, k), poison)
        q = e.S["CombineBwdParams"]()
        q.fwd = p
        q.fwd.out = 0
        q.dout, q.dout_st, q.dy = dout.data_ptr(), dout.stride(0), dy.data_ptr()
        q.dweights = dw.data_ptr() if wt is not None else 0
        e.call("emu_moe_combine_bwd_cuda", q)
        rdy, rdw = torch.ops.nemokernels.moe_combine_bwd(dout, y, plan.row_of_slot, plan.slot_of_row, wt, k,
                                                         wt is not None)
        assert torch.equal(dy, rdy)
        if wt is not None:
            torch.testing.assert_close(dw, rdw, rtol=1e-5, atol=1e-5)
