"""The portable grouped GEMM CUDA kernels (csrc/moe/grouped_gemm_cuda.cu) run on the CPU through
the emulator in tools/cuda_emu (see its README and tests/cuda_emu.py, whose build
helpers this reuses): the wmma tensor-core kernel (fp16/bf16 on sm_80+), the SIMT kernel (fp32,
and fp16/bf16 when the emulated device reports compute capability 7), the tile-map scan and the
zero fill, for fwd (none / relu2, with the pre-activation), dgrad and wgrad (with and without
the fused relu2 backward). Outputs and the tile-map scratch are NaN/garbage-poisoned before the
launch and compared with float64 references at the dtype tolerances of tests/helpers.py.
Shapes cover tile edges (row tiles of 128 / 64, k slices of 32 / 16), empty experts, unpadded
segments, rows past offsets[E], and K/N not multiples of 8 (the element-load path)."""
import ctypes
import functools

import pytest
import torch

import cuda_emu as _emu_base
from helpers import assert_close

CSRC = _emu_base.CSRC
KERNEL = CSRC / "moe" / "grouped_gemm_cuda.cu"
DT_ENUM = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OP_CODE = {"fwd": 0, "dgrad": 1, "wgrad": 2}  # nk::GgOp


@functools.cache
def emu(arch=False):
    """The emulated grouped GEMM library (cached by content hash, see build_emulated); with
    `arch`, built with NK_HAS_SM90 and driver_moe_arch.cpp (the CUTLASS path with a mock GEMM)."""
    return _emu_base.EmuLibrary.build("moe_arch" if arch else "moe",
                                      _emu_base.EMU / ("driver_moe_arch.cpp" if arch else "driver_moe.cpp"), [KERNEL],
                                      ("moe",), header=CSRC / "moe" / "grouped_gemm.h",
                                      structs=("GroupedGemmParams",), flags=["-DNK_HAS_SM90=1"] if arch else [])


@pytest.mark.parametrize("arch", [False, True])
def test_params_layout(arch):
    emu(arch).check_layouts()


def _ptr(t):
    return None if t is None else t.data_ptr()


def run(op, *, a=None, w=None, dout=None, pre=None, offsets, N, K, E, R, act=0, save_pre=False, dtype, cc=9,
        arch=False):
    """One emulated call of fwd / dgrad / wgrad as the op entry sets it up; outputs NaN-poisoned.
    Returns (out, pre_out); with `arch`, on the NK_HAS_SM90 library through
    grouped_gemm_cuda_prepare: (out, pre_out, the path it chose, workspace bytes)."""
    e = emu(arch)
    p = e.S["GroupedGemmParams"]()
    p.dtype, p.R, p.N, p.K, p.E = DT_ENUM[dtype], R, N, K, E
    offs = offsets.contiguous()
    p.offsets = offs.data_ptr()
    shape = {"fwd": (R, N), "dgrad": (R, K), "wgrad": (E, N, K)}[op]
    out = torch.full(shape, float("nan"), dtype=dtype)
    pre_out = torch.full((R, N), float("nan"), dtype=dtype) if save_pre else None
    scratch = torch.full((E + 1,), -7, dtype=torch.int32)  # garbage: the scan must write all of it
    p.a, p.w, p.dout, p.pre_in = _ptr(a), _ptr(w), _ptr(dout), _ptr(pre)
    p.out, p.pre_out, p.act, p.tile_offsets = out.data_ptr(), _ptr(pre_out), act, scratch.data_ptr()
    if not arch:
        e.lib.emu_gg_set_cc_major(ctypes.c_int(cc))
        e.call(f"emu_gg_{op}_cuda", p)
        return out, pre_out
    nbytes = e.value("emu_gg_prepare", p, ctypes.c_int(OP_CODE[op]))
    ws = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8)  # NaN-ish garbage
    if nbytes > 0:
        p.workspace = ws.data_ptr()
    e.call(f"emu_gg_{op}_cuda", p)
    return out, pre_out, p.arch, nbytes


def offsets_of(counts):
    o = [0]
    for c in counts:
        o.append(o[-1] + c)
    return torch.tensor(o, dtype=torch.int32)


def ref_segments(counts):
    """(expert, lo, hi) of every segment; rows past the last segment belong to none."""
    offs = offsets_of(counts).tolist()
    return [(e, offs[e], offs[e + 1]) for e in range(len(counts))]


# (counts, N, K): 128-row tiles with partial tails, empty experts, K/N odd (element loads)
CASES = [
    ([130, 0, 7, 128], 136, 40),
    ([1, 0, 0, 200], 17, 33),
    ([0, 64, 65], 72, 24),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cc", [9, 7])
def test_fwd_dgrad_wgrad(dtype, cc):
    if dtype == torch.float32 and cc == 7:
        pytest.skip("float32 always takes the SIMT kernel")
    for counts, N, K in CASES:
        extra = 3
        offsets = offsets_of(counts)
        R = int(offsets[-1]) + extra
        E = len(counts)
        a = torch.randn(R, K).to(dtype)
        w = (torch.randn(E, N, K) / K ** 0.5).to(dtype)
        dout = torch.randn(R, N).to(dtype)
        segs = ref_segments(counts)
        pre_ref = torch.zeros(R, N, dtype=torch.float64)
        for e, lo, hi in segs:
            pre_ref[lo:hi] = a[lo:hi].double() @ w[e].double().T
        out_ref = torch.relu(pre_ref).square()
        kw = dict(offsets=offsets, N=N, K=K, E=E, R=R, dtype=dtype, cc=cc)
        out, pre = run("fwd", a=a, w=w, act=1, save_pre=True, **kw)
        assert_close(out, out_ref, dtype, what=f"fwd relu2 out {counts, N, K}")
        assert_close(pre, pre_ref, dtype, what=f"fwd pre {counts, N, K}")
        out, _ = run("fwd", a=a, w=w, act=0, **kw)
        assert_close(out, pre_ref, dtype, what=f"fwd none {counts, N, K}")
        for use_pre in (False, True):
            preact = pre.clone() if use_pre else None
            g = dout.double()
            if use_pre:
                g = (dout.double() * 2 * torch.relu(preact.double())).to(dtype).double()
            da_ref = torch.zeros(R, K, dtype=torch.float64)
            dw_ref = torch.zeros(E, N, K, dtype=torch.float64)
            for e, lo, hi in segs:
                da_ref[lo:hi] = g[lo:hi] @ w[e].double()
                dw_ref[e] = g[lo:hi].T @ a[lo:hi].double()
            da, _ = run("dgrad", dout=dout, w=w, pre=preact, **kw)
            assert_close(da, da_ref, dtype, what=f"dgrad pre={use_pre} {counts, N, K}")
            dw, _ = run("wgrad", dout=dout, a=a, pre=preact, **kw)
            assert_close(dw, dw_ref, dtype, what=f"wgrad pre={use_pre} {counts, N, K}")


def test_misaligned_operands_take_the_element_path():
    """K a multiple of 8 but the base one element off: 16-byte loads would fault in the emulator."""
    dtype = torch.bfloat16
    counts, N, K = [40, 0, 30], 24, 32
    offsets = offsets_of(counts)
    R, E = 70, 3
    abuf = torch.randn(R * K + 1).to(dtype)
    a = abuf[1:].view(R, K)
    w = (torch.randn(E, N, K) / K ** 0.5).to(dtype)
    out, _ = run("fwd", a=a, w=w, offsets=offsets, N=N, K=K, E=E, R=R, dtype=dtype)
    ref = torch.zeros(R, N, dtype=torch.float64)
    offs = offsets.tolist()
    for e in range(E):
        ref[offs[e]:offs[e + 1]] = a[offs[e]:offs[e + 1]].double() @ w[e].double().T
    assert_close(out, ref, dtype)


# ---------------------------------------------------------------- the arch (CUTLASS) path's passes

def run_arch(op, **kw):
    return run(op, arch=True, **kw)


def arch_case():
    """A bf16 case the arch path takes (N, K multiples of 8, an empty and a one-row expert, 4
    padding rows): a, w, dout, the float64 pre-activation and run()'s keywords."""
    dtype = torch.bfloat16
    counts, N, K = [5, 0, 19, 1], 24, 16
    offsets = offsets_of(counts)
    R, E = int(offsets[-1]) + 4, len(counts)
    a = torch.randn(R, K).to(dtype)
    w = (torch.randn(E, N, K) / K ** 0.5).to(dtype)
    dout = torch.randn(R, N).to(dtype)
    offs = offsets.tolist()
    pre_ref = torch.zeros(R, N, dtype=torch.float64)
    for e in range(E):
        pre_ref[offs[e]:offs[e + 1]] = a[offs[e]:offs[e + 1]].double() @ w[e].double().T
    return a, w, dout, pre_ref, dict(offsets=offsets, N=N, K=K, E=E, R=R, dtype=dtype)


def test_arch_path_passes():
    """bf16, N and K multiples of 8, aligned: prepare picks sm90 and the passes around the (mock)
    grouped GEMM give the right fwd (relu2, preact), dgrad and wgrad (with the relu2 backward)."""
    a, w, dout, pre_ref, kw = arch_case()
    dtype, offs, R, N, K, E = kw["dtype"], kw["offsets"].tolist(), kw["R"], kw["N"], kw["K"], kw["E"]
    lib = emu(True)
    calls0 = lib.value("emu_gg_mock_calls")
    fused0, pre0 = lib.value("emu_gg_mock_relu2_calls"), lib.value("emu_gg_mock_relu2_pre_calls")
    # A saved preact: out and pre from one epilogue (grouped_gemm_relu2_pre_sm90.cu), no pass.
    out_train, pre, arch, _ = run_arch("fwd", a=a, w=w, act=1, save_pre=True, **kw)
    assert arch == 90
    assert_close(out_train, torch.relu(pre_ref).square(), dtype, what="fwd relu2 out")
    assert_close(pre, pre_ref, dtype, what="fwd preact")
    assert lib.value("emu_gg_mock_relu2_pre_calls") - pre0 == 1, "a saved preact must take the pre-storing epilogue"
    assert lib.value("emu_gg_mock_relu2_calls") == fused0
    # No preact to save: relu^2 in the GEMM's epilogue (grouped_gemm_relu2_sm90.cu), no pass.
    out, _, _, _ = run_arch("fwd", a=a, w=w, act=1, **kw)
    assert_close(out, torch.relu(pre_ref).square(), dtype, what="fwd relu2 fused")
    assert lib.value("emu_gg_mock_relu2_calls") - fused0 == 1, "relu2 without preact must take the fused GEMM"
    assert torch.equal(out, out_train), "training and inference forwards must give the same out"
    out, _, _, _ = run_arch("fwd", a=a, w=w, act=0, **kw)
    assert_close(out, pre_ref, dtype, what="fwd none")
    for use_pre in (False, True):
        preact = pre if use_pre else None
        g = (dout.double() * 2 * torch.relu(preact.double())).to(dtype).double() if use_pre else dout.double()
        da_ref = torch.zeros(R, K, dtype=torch.float64)
        dw_ref = torch.zeros(E, N, K, dtype=torch.float64)
        for e in range(E):
            lo, hi = offs[e], offs[e + 1]
            da_ref[lo:hi] = g[lo:hi] @ w[e].double()
            dw_ref[e] = g[lo:hi].T @ a[lo:hi].double()
        da, _, arch, nbytes = run_arch("dgrad", dout=dout, w=w, pre=preact, **kw)
        assert arch == 90 and (nbytes > 0) == use_pre
        assert_close(da, da_ref, dtype, what=f"dgrad pre={use_pre}")
        dw, _, arch, _ = run_arch("wgrad", dout=dout, a=a, pre=preact, **kw)
        assert arch == 90
        assert_close(dw, dw_ref, dtype, what=f"wgrad pre={use_pre}")
    assert lib.value("emu_gg_mock_calls") - calls0 == 5, "every other call must reach the (mock) CUTLASS GEMM"


def test_arch_path_shared_backward_operand():
    """grouped_gemm_bwd on the arch path: g = round(dout * 2 * relu(pre)) written once (for dgrad
    and wgrad both) against float64 over NaN-poisoned memory; taken only where both backward GEMMs
    take the arch kernels and a pre-activation is given."""
    a, w, dout, pre_ref, kw = arch_case()
    dtype, R, N = kw["dtype"], kw["R"], kw["N"]
    pre = pre_ref.to(dtype)
    lib = emu(True)

    def params(dout_, pre_, dt=dtype):
        p = lib.S["GroupedGemmParams"]()
        p.dtype, p.R, p.N, p.K, p.E = DT_ENUM[dt], R, N, kw["K"], kw["E"]
        p.offsets = kw["offsets"].data_ptr()
        p.a, p.w, p.dout, p.pre_in = _ptr(a), _ptr(w), _ptr(dout_), _ptr(pre_)
        return p

    p = params(dout, pre)
    assert lib.value("emu_gg_shared_operand", p) == 1
    g = torch.full((R, N), float("nan"), dtype=dtype)
    lib.value("emu_gg_relu2_operand", p, ctypes.c_void_p(g.data_ptr()))
    ref = dout.double() * 2 * torch.relu(pre.double())
    assert torch.equal(g, ref.to(dtype)), "g must be dout * 2 * relu(pre) rounded once"
    # The pass itself over a length that is no multiple of 8 (16-byte steps, then the tail).
    p.N = N - 3
    n = R * (N - 3)
    g = torch.full((R, N), float("nan"), dtype=dtype)
    lib.value("emu_gg_relu2_operand", p, ctypes.c_void_p(g.data_ptr()))
    assert n % 8 != 0 and torch.equal(g.flatten()[:n], ref.to(dtype).flatten()[:n])
    assert g.flatten()[n:].isnan().all(), "the pass must stop at R * N"
    assert lib.value("emu_gg_shared_operand", params(dout, None)) == 0, "no pre-activation: nothing to share"
    odd = torch.empty(R * N + 1, dtype=dtype)[1:].view(R, N).copy_(dout)  # 2-byte aligned base
    assert lib.value("emu_gg_shared_operand", params(odd, pre)) == 0, "a misaligned dout takes the portable kernels"
    h = dout.half()
    assert lib.value("emu_gg_shared_operand", params(h, pre.half(), torch.float16)) == 0, "fp16: portable kernels"


def test_arch_path_m64_tiles_opt_in(monkeypatch):
    """NEMOKERNELS_GROUPED_GEMM_TILE=64 sends the forward (plain, preact-saving and fused relu2)
    to the 64-row-tile kernels; dgrad and wgrad keep the 128-row ones."""
    a, w, dout, pre_ref, kw = arch_case()
    dtype = kw["dtype"]
    lib = emu(True)
    monkeypatch.setenv("NEMOKERNELS_GROUPED_GEMM_TILE", "64")
    m0, c0, f0 = (lib.value(f) for f in ("emu_gg_mock_m64_calls", "emu_gg_mock_calls", "emu_gg_mock_relu2_calls"))
    out, _, arch, _ = run_arch("fwd", a=a, w=w, act=0, **kw)
    assert arch == 90
    assert_close(out, pre_ref, dtype, what="m64 fwd none")
    out, pre, _, _ = run_arch("fwd", a=a, w=w, act=1, save_pre=True, **kw)
    assert_close(out, torch.relu(pre_ref).square(), dtype, what="m64 fwd relu2 with preact")
    assert_close(pre, pre_ref, dtype, what="m64 fwd preact")
    out, _, _, _ = run_arch("fwd", a=a, w=w, act=1, **kw)
    assert_close(out, torch.relu(pre_ref).square(), dtype, what="m64 fwd relu2 fused")
    run_arch("dgrad", dout=dout, w=w, **kw)
    assert lib.value("emu_gg_mock_m64_calls") - m0 == 3, "every forward must take the 64-row tiles"
    assert lib.value("emu_gg_mock_calls") - c0 == 1, "only dgrad keeps the 128-row kernel"
    assert lib.value("emu_gg_mock_relu2_calls") == f0


def test_arch_path_swap_ab_opt_in(monkeypatch):
    """NEMOKERNELS_GROUPED_GEMM_SWAP_AB=1 sends the forward (plain and fused relu2, no preact) to
    the swapped-operand kernels when the experts average at most 32 rows; a saved preact, more
    rows per expert, dgrad and the switch unset keep the other kernels."""
    a, w, dout, pre_ref, kw = arch_case()  # R 29, E 4: 7.25 rows per expert
    dtype = kw["dtype"]
    lib = emu(True)
    names = ("emu_gg_mock_swap_calls", "emu_gg_mock_calls", "emu_gg_mock_relu2_calls", "emu_gg_mock_relu2_pre_calls")

    def counts():
        return [lib.value(n) for n in names]

    c0 = counts()
    run_arch("fwd", a=a, w=w, act=0, **kw)
    assert [x - y for x, y in zip(counts(), c0)] == [0, 1, 0, 0], "unset: the 128-row forward"
    monkeypatch.setenv("NEMOKERNELS_GROUPED_GEMM_SWAP_AB", "1")
    c0 = counts()
    out, _, arch, _ = run_arch("fwd", a=a, w=w, act=0, **kw)
    assert arch == 90
    assert_close(out, pre_ref, dtype, what="swap fwd none")
    out, _, _, _ = run_arch("fwd", a=a, w=w, act=1, **kw)
    assert_close(out, torch.relu(pre_ref).square(), dtype, what="swap fwd relu2")
    R0 = int(kw["offsets"][-1])
    assert torch.equal(out[R0:], torch.zeros_like(out[R0:])), "rows past offsets[E] must be 0"
    assert [x - y for x, y in zip(counts(), c0)] == [2, 0, 0, 0], "both forwards must take the swapped kernels"
    c0 = counts()
    run_arch("fwd", a=a, w=w, act=1, save_pre=True, **kw)
    run_arch("dgrad", dout=dout, w=w, **kw)
    assert [x - y for x, y in zip(counts(), c0)] == [0, 1, 0, 1], "a saved preact and dgrad are not swapped"
    # More than 32 rows per expert on average: the 128-row kernels.
    many = dict(kw, E=1, offsets=torch.tensor([0, 25], dtype=torch.int32), R=40)
    c0 = counts()
    run_arch("fwd", a=torch.cat([a, a])[:40], w=w[:1], act=0, **many)
    assert [x - y for x, y in zip(counts(), c0)] == [0, 1, 0, 0], "40 rows for 1 expert: not swapped"


def test_arch_path_not_taken():
    """fp16, K not a multiple of 8, or a misaligned base: the portable kernels run instead."""
    counts, N, K = [5, 3], 24, 16
    offsets = offsets_of(counts)
    R, E = 8, 2
    kw = dict(offsets=offsets, N=N, E=E, R=R)
    w16 = torch.randn(E, N, K).to(torch.float16)
    _, _, arch, _ = run_arch("fwd", a=torch.randn(R, K).half(), w=w16, K=K, dtype=torch.float16, **kw)
    assert arch == 0
    w12 = torch.randn(E, N, 12).to(torch.bfloat16)
    _, _, arch, _ = run_arch("fwd", a=torch.randn(R, 12).bfloat16(), w=w12, K=12, dtype=torch.bfloat16, **kw)
    assert arch == 0
    abuf = torch.randn(R * K + 1).bfloat16()
    out, _, arch, _ = run_arch("fwd", a=abuf[1:].view(R, K), w=w16.bfloat16(), K=K, dtype=torch.bfloat16, **kw)
    assert arch == 0 and torch.isfinite(out).all()
