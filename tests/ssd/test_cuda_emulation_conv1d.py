"""The causal conv1d CUDA kernels (csrc/ssd/causal_conv1d_cuda.cu: tiled forward with fused final
states, tiled backward with its fixed-order dweight/dbias reduction, decode update) run on the CPU
through the emulator in tools/cuda_emu (tests/cuda_emu.py, tools/cuda_emu/README.md). Outputs are
NaN-poisoned before each launch and compared with the CPU kernel through the public op: bit for
bit where both compute the same float32 operations in the same order (out, final states, dx,
dinit, the update; the emulator's __expf/__fdividef are expf and true division), within float32
rounding for dweight/dbias (other partial sums). Layouts take every access path of the tiles:
16-byte vectors along channels (channel-last) or along time (contiguous, seqlen a multiple of the
vector), and element access (strided, misaligned). A second library reports 1 SM, so forward
blocks stride over tiles and backward blocks walk several (batch, time tile) items.
"""
import functools

import pytest
import torch

import cuda_emu as base
from helpers import assert_close

nemokernels = pytest.importorskip("nemokernels")

HEADER = base.CSRC / "ssd" / "causal_conv1d.h"
STRUCTS = ("Conv1dFwdParams", "Conv1dBwdParams", "Conv1dUpdateParams")


@functools.cache
def emu(sm_count=None):
    flags = () if sm_count is None else (f"-DEMU_SM_COUNT={sm_count}",)
    return base.EmuLibrary.build("conv1d" if sm_count is None else f"conv1d_{sm_count}sm",
                                 base.EMU / "driver_conv1d.cpp", [base.CSRC / "ssd" / "causal_conv1d_cuda.cu"],
                                 ("ssd",), header=HEADER, structs=STRUCTS, flags=flags)


def test_params_layout():
    emu().check_layouts()


def make_x(batch, dim, seqlen, dtype, layout):
    if layout == "channel_last":  # 16-byte vectors along channels
        return torch.randn(batch, seqlen, dim).to(dtype).transpose(1, 2)
    if layout == "contiguous":  # along time when seqlen is a multiple of the vector, else element access
        return torch.randn(batch, dim, seqlen).to(dtype)
    if layout == "strided":  # neither dimension unit-stride
        return torch.randn(batch, dim * 2, seqlen + 3).to(dtype)[:, ::2, 1:seqlen + 1]
    if layout == "misaligned":  # channel-last, base one element off its 16-byte boundary
        return torch.randn(batch, seqlen, dim + 1).to(dtype)[..., 1:].transpose(1, 2)
    raise ValueError(layout)


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _bcl_like(x):
    """The op's output allocation (empty_bcl): channel-last in, channel-last out."""
    b, c, l = x.shape
    if x.stride(1) == 1 and c > 1:
        return _nan(b, l, c, dtype=x.dtype).transpose(1, 2)
    return _nan(b, c, l, dtype=x.dtype)


def _fwd_params(e, x, w, b, seq_idx, init, silu):
    p = e.S["Conv1dFwdParams"]()
    p.batch, p.dim, p.seqlen = x.shape
    p.width = w.shape[1]
    p.dtype = base.DT_ENUM[x.dtype]
    p.silu = silu
    p.x, (p.x_sb, p.x_sc, p.x_st) = x.data_ptr(), x.stride()
    p.weight, p.w_dtype, (p.w_sc, p.w_sk) = w.data_ptr(), base.DT_ENUM[w.dtype], w.stride()
    if b is not None:
        p.bias, p.b_dtype, p.b_s = b.data_ptr(), base.DT_ENUM[b.dtype], b.stride(0)
    if seq_idx is not None:
        p.seq_idx, (p.seq_sb, p.seq_st) = seq_idx.data_ptr(), seq_idx.stride()
    if init is not None:
        p.init, (p.init_sb, p.init_sc, p.init_sj) = init.data_ptr(), init.stride()
    return p


def run_emulated(e, x, w, b, dout, seq_idx=None, init=None, dfinal=None, silu=True, final=False):
    """The op entry's set-up (csrc/ssd/causal_conv1d.cpp) and the emulated forward and backward:
    (out, final states, dx, dweight, dbias, dinit), each NaN-poisoned first."""
    batch, dim, seqlen = x.shape
    width = w.shape[1]
    p = _fwd_params(e, x, w, b, seq_idx, init, silu)
    out = _bcl_like(x)
    p.out, (p.out_sb, p.out_sc, p.out_st) = out.data_ptr(), out.stride()
    fin = _nan(batch, dim, width - 1, dtype=x.dtype) if final else None
    if final:
        p.final_states, (p.fin_sb, p.fin_sc, p.fin_sj) = fin.data_ptr(), fin.stride()
    e.call("emu_conv1d_fwd_cuda", p)

    q = e.S["Conv1dBwdParams"]()
    q.fwd = _fwd_params(e, x, w, b, seq_idx, init, silu)
    q.dout, (q.dout_sb, q.dout_sc, q.dout_st) = dout.data_ptr(), dout.stride()
    if dfinal is not None:
        q.dfinal, (q.dfin_sb, q.dfin_sc, q.dfin_sj) = dfinal.data_ptr(), dfinal.stride()
    dx = _bcl_like(x)
    q.dx, (q.dx_sb, q.dx_sc, q.dx_st) = dx.data_ptr(), dx.stride()
    dinit = _nan(batch, dim, width - 1, dtype=x.dtype) if init is not None else None
    if dinit is not None:
        q.dinit, (q.dinit_sb, q.dinit_sc, q.dinit_sj) = dinit.data_ptr(), dinit.stride()
    dw = _nan(dim, width, dtype=w.dtype)
    db = _nan(dim, dtype=b.dtype) if b is not None else None
    q.dweight = dw.data_ptr()
    q.dbias = None if db is None else db.data_ptr()
    q.num_partials = e.value("emu_conv1d_bwd_num_partials", q)
    partials = _nan(q.num_partials, dim, width + 1, dtype=torch.float32)
    q.partials = partials.data_ptr()
    e.call("emu_conv1d_bwd_cuda", q)
    return out, fin, dx, dw, db, dinit


def run_cpu(x, w, b, dout, seq_idx=None, init=None, dfinal=None, silu=True, final=False):
    """The CPU kernels through the public op: the same tuple."""
    xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
    bl = None if b is None else b.detach().requires_grad_()
    il = None if init is None else init.detach().requires_grad_()
    res = nemokernels.causal_conv1d_fn(xl, wl, bl, seq_idx=seq_idx, initial_states=il, return_final_states=final,
                                       activation="silu" if silu else None)
    out, fin = res if final else (res, None)
    leaves = [t for t in (xl, wl, bl, il) if t is not None]
    outs, grads_out = [out], [dout]
    if final and dfinal is not None:
        outs.append(fin)
        grads_out.append(dfinal)
    g = iter(torch.autograd.grad(outs, leaves, grads_out))
    dx, dw = next(g), next(g)
    db = next(g) if b is not None else None
    dinit = next(g) if init is not None else None
    return out.detach(), None if fin is None else fin.detach(), dx, dw, db, dinit


def _check(emu_res, cpu_res, dtype):
    names = ("out", "final_states", "dx", "dweight", "dbias", "dinit")
    for name, a, c in zip(names, emu_res, cpu_res):
        assert (a is None) == (c is None), name
        if a is None:
            continue
        if name in ("dweight", "dbias"):  # other partial sums: float32 rounding, then the weight's dtype
            assert_close(a, c, torch.float32 if a.dtype == torch.float32 else a.dtype, what=name)
        else:
            assert torch.equal(a, c), f"{name}: emulated CUDA differs from the CPU kernel " \
                                      f"(max |diff| {(a.double() - c.double()).abs().max().item():.3e})"


# (batch, dim, seqlen): several channel and time tiles with partial last tiles; one tile; a
# sequence shorter than the halo; dim below one tile.
SHAPES = [(2, 136, 150), (1, 64, 64), (2, 24, 2), (3, 40, 77)]
LAYOUTS = ["channel_last", "contiguous", "strided", "misaligned"]


def _cases():
    out = []
    for si, shape in enumerate(SHAPES):
        for li, layout in enumerate(LAYOUTS):
            for di, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16]):
                width = 2 + (si + li + di) % 3
                silu = (si + li + di) % 2 == 0
                out.append(pytest.param(shape, layout, dtype, width, silu,
                                        id=f"{'x'.join(map(str, shape))}-{layout}-{str(dtype)[6:]}-w{width}-"
                                           f"{'silu' if silu else 'id'}"))
    return out


@pytest.mark.parametrize("shape,layout,dtype,width,silu", _cases())
def test_conv1d_emulated_matches_cpu(shape, layout, dtype, width, silu):
    torch.manual_seed(hash((shape, layout, str(dtype), width)) % 2**31)
    batch, dim, seqlen = shape
    x = make_x(batch, dim, seqlen, dtype, layout)
    w = (torch.randn(dim, width) / width**0.5).to(dtype)
    b = torch.randn(dim).to(dtype)
    dout = make_x(batch, dim, seqlen, dtype, layout)
    init = torch.randn(batch, dim, width - 1).to(dtype)
    dfinal = torch.randn(batch, dim, width - 1).to(dtype)
    kw = dict(init=init, dfinal=dfinal, silu=silu, final=True)
    _check(run_emulated(emu(), x, w, b, dout, **kw), run_cpu(x, w, b, dout, **kw), dtype)


@pytest.mark.parametrize("layout", ["channel_last", "contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_emulated_seq_idx(layout, dtype):
    """Packed sequences: taps and gradients never cross a change of id (ids arbitrary int32)."""
    torch.manual_seed(3)
    lens = [5, 1, 2, 70, 64, 3]
    dim, L = 72, sum(lens)
    x = make_x(2, dim, L, dtype, layout)
    seq = torch.cat([torch.full((n,), 7 * i - 20, dtype=torch.int32) for i, n in enumerate(lens)])
    seq_idx = torch.stack([seq, seq.flip(0)])
    w, b = (torch.randn(dim, 4) / 2).to(dtype), None
    dout = make_x(2, dim, L, dtype, layout)
    _check(run_emulated(emu(), x, w, b, dout, seq_idx=seq_idx), run_cpu(x, w, b, dout, seq_idx=seq_idx), dtype)


def test_conv1d_emulated_weight_dtypes_and_strides():
    """bfloat16 activations with float32 / float16 taps read where they lie (a transposed weight,
    a strided bias): no float32 copies, gradients in the parameters' dtypes."""
    torch.manual_seed(4)
    x = make_x(2, 64, 130, torch.bfloat16, "channel_last")
    dout = make_x(2, 64, 130, torch.bfloat16, "channel_last")
    for wdt, bdt in [(torch.float32, torch.float16), (torch.float16, torch.float32)]:
        w = torch.randn(4, 64).to(wdt).t()  # (64, 4), channel stride 1
        b = torch.randn(128).to(bdt)[::2]
        emu_res = run_emulated(emu(), x, w, b, dout)
        assert emu_res[3].dtype == wdt and emu_res[4].dtype == bdt
        _check(emu_res, run_cpu(x, w, b, dout), torch.bfloat16)


@pytest.mark.parametrize("layout", ["channel_last", "contiguous"])
def test_conv1d_emulated_one_sm(layout):
    """1 SM: the forward grid (8 waves of 16 blocks) is smaller than the 150 tiles, so blocks
    stride over tiles; the backward's 4 blocks walk 37-38 (batch, time tile) items each and its
    dweight partial rows are 4 (not one per tile)."""
    torch.manual_seed(5)
    x = make_x(3, 64, 64 * 50, torch.bfloat16, layout)
    w, b = (torch.randn(64, 4) / 2).to(torch.bfloat16), torch.randn(64).to(torch.bfloat16)
    dout = make_x(3, 64, 64 * 50, torch.bfloat16, layout)
    _check(run_emulated(emu(1), x, w, b, dout), run_cpu(x, w, b, dout), torch.bfloat16)


def test_conv1d_emulated_final_states_without_sequence():
    """seqlen 0 with final states: one time tile copies the initial states (nothing else written)."""
    x = torch.randn(2, 16, 0)
    w, init = torch.randn(16, 4), torch.randn(2, 16, 3)
    e = emu()
    p = _fwd_params(e, x, w, None, None, init, True)
    fin = _nan(2, 16, 3, dtype=torch.float32)
    p.final_states, (p.fin_sb, p.fin_sc, p.fin_sj) = fin.data_ptr(), fin.stride()
    e.call("emu_conv1d_fwd_cuda", p)
    assert torch.equal(fin, init)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_update_emulated(dtype):
    """The decode update (taps in their own dtype, padded and permuted slots, 2 tokens) against
    the CPU kernel: outputs and the in-place state bit for bit."""
    torch.manual_seed(6)
    batch, dim, width, state_len, T = 3, 136, 4, 5, 2
    x = torch.randn(batch, dim, T).to(dtype)
    w, b = torch.randn(dim, width), torch.randn(dim).to(dtype)
    state = torch.randn(4, dim, state_len).to(dtype)
    idx = torch.tensor([2, -1, 0], dtype=torch.int32)
    state_cpu = state.clone()
    out_cpu = nemokernels.causal_conv1d_update(x, state_cpu, w, b, activation="silu", conv_state_indices=idx)
    out = _update_emulated(x, state, w, b, idx)
    assert torch.equal(out, out_cpu) and torch.equal(state, state_cpu)


def _update_emulated(x, state, w, b, idx, parents=None):
    """One emulated launch of the decode update (silu), as the op entry sets it up; returns the
    output (NaN-poisoned first). Mutates state unless parents (a tree) is given."""
    e = emu()
    batch, dim, T = x.shape
    p = e.S["Conv1dUpdateParams"]()
    p.batch, p.dim, p.seqlen, p.state_len, p.width = batch, dim, T, state.shape[2], w.shape[1]
    p.dtype, p.silu = base.DT_ENUM[x.dtype], True
    p.x, (p.x_sb, p.x_sc, p.x_st) = x.data_ptr(), x.stride()
    p.conv_state, (p.st_sb, p.st_sc, p.st_sj), p.state_batch = state.data_ptr(), state.stride(), state.shape[0]
    p.state_indices = idx.data_ptr()
    p.parents = None if parents is None else parents.data_ptr()
    p.weight, p.w_dtype, (p.w_sc, p.w_sk) = w.data_ptr(), base.DT_ENUM[w.dtype], w.stride()
    p.bias, p.b_dtype, p.b_s = b.data_ptr(), base.DT_ENUM[b.dtype], b.stride(0)
    out = _nan(batch, dim, T, dtype=x.dtype)
    p.out, (p.out_sb, p.out_sc, p.out_st) = out.data_ptr(), out.stride()
    e.call("emu_conv1d_update_cuda", p)
    return out


@pytest.mark.parametrize("dtype,width", [(torch.float32, 4), (torch.bfloat16, 3), (torch.float16, 2)])
def test_conv1d_update_tree_emulated(dtype, width):
    """The update over a draft tree (each window follows the node's ancestors into the state)
    against the CPU kernel, bit for bit; conv_state is only read. A second launch with invalid
    parents: NaN exactly where a window meets one."""
    torch.manual_seed(7)
    batch, dim, state_len, T = 3, 72, 5, 6
    x = torch.randn(batch, dim, T).to(dtype)
    w, b = torch.randn(dim, width), torch.randn(dim).to(dtype)
    state = torch.randn(4, dim, state_len).to(dtype)
    idx = torch.tensor([2, -1, 0], dtype=torch.int32)
    parents = torch.tensor([[-1, 0, 0, -1, 2, 4], [-1, 0, 1, 2, 3, 4], [-1, -1, 1, 0, 3, 1]], dtype=torch.int32)
    before = state.clone()
    out_cpu = nemokernels.causal_conv1d_update(x, state.clone(), w, b, activation="silu", conv_state_indices=idx,
                                               parents=parents)
    out = _update_emulated(x, state, w, b, idx, parents)
    assert torch.equal(out, out_cpu) and torch.equal(state, before)
    bad = parents.clone()
    bad[0, 4] = 4  # not earlier: node 4, and node 5 (its child) when the width reaches back 2 nodes
    bad[2, 3] = 2**30
    out_bad = _update_emulated(x, state, w, b, idx, bad)
    nan_nodes = {(0, 4), (2, 3)} | ({(0, 5)} if width >= 3 else set()) | ({(2, 4)} if width >= 3 else set())
    for bb in (0, 2):
        for t in range(T):
            if (bb, t) in nan_nodes:
                assert out_bad[bb, :, t].isnan().all(), f"node ({bb}, {t}) must be NaN"
            else:
                assert torch.equal(out_bad[bb, :, t], out_cpu[bb, :, t]), f"node ({bb}, {t})"
    assert torch.equal(state, before)
