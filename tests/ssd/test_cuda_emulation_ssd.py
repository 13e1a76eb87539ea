"""The SSD CUDA kernels (csrc/ssd/ssd_chunk_scan_{fwd,bwd}_cuda.cu) run on the CPU through the
emulator in tools/cuda_emu: the .cu files are rewritten by tools/cuda_emu/transform.py, compiled
with g++ against mock CUDA headers (no nvcc, no torch headers), loaded with ctypes, and their
outputs compared with the float64 recurrence (ssd_scan_ref, gradients by autograd). This checks
indexing, masking, barriers, tile logic and alignment of the real kernel code on machines and CI
runners without a GPU; see tools/cuda_emu/README.md for what it cannot check.

The library is built once per content hash of its sources into $NK_CUDA_EMU_BUILD_DIR (default
<tmp>/nk_cuda_emu); later runs reuse it. Cases marked `slow` are skipped unless NK_CUDA_EMU_SLOW=1.
"""
import ctypes
import functools
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import TOL, rel_err

from cuda_emu import (CSRC, DT_ENUM, EMU, ROOT, EmuLibrary, _load, build_emulated, emu_params, emu_transform, slow,
                      transformed)

KERNELS = {"fwd": CSRC / "ssd" / "ssd_chunk_scan_fwd_cuda.cu", "bwd": CSRC / "ssd" / "ssd_chunk_scan_bwd_cuda.cu"}
# nemokernels/ssd/reference.py by path (it needs torch only): this test needs neither the
# built extension nor the package import.
ssd_scan_ref = _load("_nk_reference", ROOT / "nemokernels" / "ssd" / "reference.py").ssd_scan_ref


STRUCTS = ("SsdParams", "SsdBwdParams")
HEADER = CSRC / "ssd" / "ssd_chunk_scan.h"
# The backward's B3 blocks take hs heads of a group, hs the largest divisor of H/G that keeps
# NK_SSD_BWD_TARGET_BLOCKS blocks (1024 in production: hs = 1 for every shape small enough to
# emulate). Target 4 gives hs = H/G (one split per group: the B3 kernels store dB, dC
# themselves) in most cases with H > G (hs > 1), hs = 1 where H == G, and two splits per group
# (summed by sum_bc_kernel) in q64_bf16_headdim_padded (hs 2 of 4) and q64_bf16_hs4 (hs 4 of
# 8), in one build; the production value is built in the slow tier.
DEFAULT_TARGET_BLOCKS = 4


@functools.cache
def emu(target_blocks=DEFAULT_TARGET_BLOCKS):
    """The emulator library (fwd + bwd + mock self-tests, one object each, cached by content
    hash); target_blocks sets NK_SSD_BWD_TARGET_BLOCKS (None: the kernel file's own)."""
    gen = {  # generated sources of each unit: name -> text
        "params_layout.inc": emu_params.layout_table_cpp(HEADER.read_text(), STRUCTS),
        "ssd_chunk_scan_fwd_cuda.emu.cpp": transformed(KERNELS["fwd"]),
        "ssd_chunk_scan_bwd_cuda.emu.cpp": transformed(KERNELS["bwd"]),
        "selftest.emu.cpp": transformed(EMU / "selftest.cpp"),
    }
    defines_bwd = [] if target_blocks is None else [f"-DNK_SSD_BWD_TARGET_BLOCKS={int(target_blocks)}"]
    units = {  # object: (main source, generated files it includes, extra flags); biggest first
        "bwd": (EMU / "driver_bwd.cpp", ["ssd_chunk_scan_bwd_cuda.emu.cpp"], defines_bwd),
        "fwd": (EMU / "driver_fwd.cpp", ["ssd_chunk_scan_fwd_cuda.emu.cpp", "params_layout.inc"], []),
        "selftest": (None, ["selftest.emu.cpp"], []),
    }
    return EmuLibrary(build_emulated("ssd", None, gen, ("ssd",), units=units), HEADER, STRUCTS)


# ---- inputs ----------------------------------------------------------------------------------

def act(shape, dtype, layout):
    """An activation with unit-stride last dim: contiguous, padded rows (16-byte aligned
    strides: the kernels' vector path), or sliced from a wider row (misaligned: scalar path)."""
    if layout == "contig":
        return torch.randn(*shape).to(dtype)
    if layout == "padded":
        return torch.randn(*shape[:-1], shape[-1] + 8).to(dtype)[..., : shape[-1]]
    if layout == "sliced":
        return torch.randn(*shape[:-1], 2 * shape[-1] + 3).to(dtype)[..., 1 : shape[-1] + 1]
    raise ValueError(layout)


def nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


def ptr(t):
    return None if t is None else t.data_ptr()


def make_case(b, L, H, P, G, N, Q, dtype, *, z=True, D="head", bias=True, softplus=True, limit=(0.0, float("inf")),
              init=True, dfinal=True, seq=True, layout="contig", varlen=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    t = dict(
        x=act((b, L, H, P), dtype, layout),
        # scaled in place: the views keep their strides
        B=act((b, L, G, N), dtype, "padded" if layout == "sliced" else layout).mul_(N**-0.25),
        C=act((b, L, G, N), dtype, "sliced" if layout == "padded" else layout).mul_(N**-0.25),
        dt=torch.randn(b, L, H) * 0.5 - 1.0,
        # even heads decay slowly (exp(dt' A) ~ 0.98 a step: chunk-distant terms, hence the
        # off-diagonal tiles and the state hand-over, matter), odd heads fast (Mamba-2 range)
        A=torch.where(torch.arange(H) % 2 == 0, -(torch.rand(H) * 0.1 + 0.02), -(torch.rand(H) * 4 + 0.5)),
    )
    assert layout == "contig" or not (t["x"].is_contiguous() or t["B"].is_contiguous() or t["C"].is_contiguous())
    t["D"] = {None: None, "head": torch.randn(H), "headdim": torch.randn(H, P)}[D]
    t["z"] = act((b, L, H, P), dtype, layout) if z else None
    t["dt_bias"] = torch.randn(H) * 0.5 if bias else None
    t["init"] = torch.randn(b, H, P, N) if init else None
    t["seq"] = None
    t["cu"] = None
    if seq:
        cuts = torch.sort(torch.randint(1, L, (b, 2), generator=g), dim=1)[0]
        s = torch.zeros(b, L, dtype=torch.int32)
        for i in range(b):
            for c in cuts[i]:
                s[i, int(c):] += 1
        t["seq"] = s
        if varlen:
            assert b == 1
            ends = [0] + [int(c) for c in torch.unique(cuts[0])] + [L]
            t["cu"] = torch.tensor(ends, dtype=torch.int32)
            s = torch.zeros(1, L, dtype=torch.int32)
            for k in range(len(ends) - 1):
                s[0, ends[k]:ends[k + 1]] = k
            t["seq"] = s
    t["dout"] = act((b, L, H, P), dtype, "sliced" if layout == "contig" else "contig")
    t["dfinal"] = torch.randn(b, H, P, N) if dfinal else None
    t.update(b=b, L=L, H=H, P=P, G=G, N=N, Q=Q, dtype=dtype, softplus=softplus, limit=limit)
    return t


def fill_params(S, t, keep):
    """SsdParams from the case's CPU tensors; keep holds every buffer alive."""
    b, L, H, P, G, N, Q = (t[k] for k in "b L H P G N Q".split())
    nc = max(1, -(-L // Q)) if t.get("plan") is None else t["plan"].shape[1] - 1
    p = S()
    p.batch, p.seqlen, p.nheads, p.headdim, p.ngroups, p.dstate, p.chunk_size, p.nchunks = b, L, H, P, G, N, Q, nc
    p.dtype = DT_ENUM[t["dtype"]]
    for name, (s0, s1, s2) in (("x", ("x_sb", "x_sl", "x_sh")), ("B", ("B_sb", "B_sl", "B_sg")),
                               ("C", ("C_sb", "C_sl", "C_sg")), ("z", ("z_sb", "z_sl", "z_sh"))):
        v = t[name]
        if v is None:
            continue
        assert v.stride(-1) == 1
        setattr(p, name, v.data_ptr())
        setattr(p, s0, v.stride(0)); setattr(p, s1, v.stride(1)); setattr(p, s2, v.stride(2))
    small = dict(dt=t["dt"].float().contiguous(), A=t["A"].float().contiguous(),
                 D=None if t["D"] is None else t["D"].float().contiguous(),
                 dt_bias=None if t["dt_bias"] is None else t["dt_bias"].float().contiguous(),
                 init=None if t["init"] is None else t["init"].float().contiguous())
    keep.extend(v for v in small.values() if v is not None)
    p.dt, p.A, p.D, p.dt_bias, p.init = (ptr(small[k]) for k in ("dt", "A", "D", "dt_bias", "init"))
    p.init_rows = 0 if t["init"] is None else t["init"].shape[0]
    p.D_per_p = t["D"] is not None and t["D"].dim() == 2
    p.dt_softplus = t["softplus"]
    p.dt_min, p.dt_max = t["limit"]
    p.seq_idx = ptr(t["seq"])
    if t.get("plan") is not None:
        p.chunk_plan, p.cu_seqlens, p.nseq = t["plan"].data_ptr(), t["cu"].data_ptr(), t["cu"].numel() - 1
    inter = dict(dtp=nan(b, H, nc, Q), cs=nan(b, H, nc, Q), states=nan(b, nc, H, P, N))
    keep.extend(inter.values())
    p.dtp, p.cs, p.states = (ptr(inter[k]) for k in ("dtp", "cs", "states"))
    return p, inter


def reference(t, want_grads):
    """float64 recurrence: y_pre (no z) and final states in one pass, y = y_pre silu(z)."""
    dd = torch.float64
    leaves = dict(x=t["x"], dt=t["dt"], A=t["A"], B=t["B"], C=t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"], init=t["init"])
    leaves = {k: (None if v is None else v.detach().to(dd).requires_grad_(want_grads)) for k, v in leaves.items()}
    kw = dict(D=leaves["D"], dt_bias=leaves["dt_bias"], initial_states=leaves["init"], seq_idx=t["seq"],
              dt_softplus=t["softplus"], dt_limit=t["limit"])
    args = [leaves[k] for k in ("x", "dt", "A", "B", "C")]
    y_pre, fin = ssd_scan_ref(*args, **kw, return_final_states=True)
    y = y_pre if t["z"] is None else y_pre * torch.nn.functional.silu(leaves["z"])
    out = dict(y=y.detach(), y_pre=y_pre.detach(), final=fin.detach())
    with torch.no_grad():  # the state entering each chunk (F3, returned by return_chunk_states)
        Q, L, nc = t["Q"], t["L"], max(1, -(-t["L"] // t["Q"]))
        ent = [leaves["init"].detach() if leaves["init"] is not None else torch.zeros_like(fin)]
        for c in range(1, nc):
            cut = lambda v: None if v is None else v[:, :c * Q]  # noqa: E731
            ent.append(ssd_scan_ref(*(cut(a) for a in args[:2]), args[2], *(cut(a) for a in args[3:]),
                                    **dict(kw, seq_idx=cut(t["seq"])), return_final_states=True)[1])
        out["entering"] = torch.stack(ent, 1)
    if t["cu"] is not None:
        with torch.no_grad():
            out["varlen"] = ssd_scan_ref(*args, **kw, cu_seqlens=t["cu"], return_varlen_states=True)[-1]
    if want_grads:
        loss = (y * t["dout"].to(dd)).sum()
        if t["dfinal"] is not None:
            loss = loss + (fin * t["dfinal"].to(dd)).sum()
        names = [k for k, v in leaves.items() if v is not None]
        out["grads"] = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))
    return out


def check(got, want, dtype, factor, what):
    tol = TOL[dtype] * factor
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def fwd_workspace(e, p, keep):
    """The forward's workspace (H1's ticket and per-chain counters: 1 + b*H*tiles of 4 bytes),
    filled with garbage: the launcher must zero it."""
    tiles = -(-p.headdim // 64) * -(-p.dstate // 64)
    nbytes = e.value("emu_ssd_fwd_cuda_workspace_bytes", p)
    assert nbytes == 4 * (1 + p.batch * p.nheads * tiles), nbytes
    ws = torch.full((nbytes // 4,), -1, dtype=torch.int32)
    keep.append(ws)
    p.workspace = ws.data_ptr()
    return ws


def emu_backward(e, q, t, dinit, keep):
    """Runs the emulated backward on q (SsdBwdParams with fwd, dout and dfinal set) into
    NaN-poisoned gradient buffers (dinit as given) and a NaN workspace; returns the gradients by
    input name."""
    b, L, H, P, G, N, dtype = (t[k] for k in "b L H P G N dtype".split())
    nc = q.fwd.nchunks
    bufs = dict(dstates=nan(b, nc, H, P, N), dcs_last=nan(b, H, nc), dA_part=nan(b, nc, H), dbias_part=nan(b, nc, H),
                dD_part=nan(b, nc, H, P), dx=nan(b, L, H, P, dtype=dtype), dB=nan(b, L, G, N, dtype=dtype),
                dC=nan(b, L, G, N, dtype=dtype), ddt=nan(b, L, H), dA=nan(H),
                dz=nan(b, L, H, P, dtype=dtype) if t["z"] is not None else None,
                dD=None if t["D"] is None else nan(*t["D"].shape),
                ddt_bias=None if t["dt_bias"] is None else nan(H), dinit=dinit)
    for k, v in bufs.items():
        setattr(q, k, ptr(v))
    ws_bytes = e.value("emu_ssd_bwd_cuda_workspace_bytes", q)
    ws = torch.full((max(1, ws_bytes) // 4 + 1,), float("nan"))
    q.workspace = ws.data_ptr()
    keep += [ws] + [v for v in bufs.values() if v is not None]
    e.call("emu_ssd_bwd_cuda", q)
    return dict(x=bufs["dx"], B=bufs["dB"], C=bufs["dC"], z=bufs["dz"], dt=bufs["ddt"], A=bufs["dA"], D=bufs["dD"],
                dt_bias=bufs["ddt_bias"], init=bufs["dinit"])


def run_case(t, lib=None, backward=True):
    e = lib or emu()
    keep = []
    b, L, H, P, G, N, Q, dtype = (t[k] for k in "b L H P G N Q dtype".split())
    ref = reference(t, backward)
    f32 = dtype == torch.float32
    # ---- forward (F1-F5)
    p, inter = fill_params(e.S["SsdParams"], t, keep)
    y = nan(b, L, H, P, dtype=dtype)
    y_pre = nan(b, L, H, P, dtype=dtype) if t["z"] is not None else None
    fin = nan(b, H, P, N)
    keep += [y, fin] + ([y_pre] if y_pre is not None else [])
    p.y, p.y_pre, p.final_states = y.data_ptr(), ptr(y_pre), fin.data_ptr()
    if t["cu"] is not None:
        nseq = t["cu"].numel() - 1
        var = nan(nseq, H, P, N)
        keep.append(var)
        p.cu_seqlens, p.nseq, p.varlen_states = t["cu"].data_ptr(), nseq, var.data_ptr()
    ws = fwd_workspace(e, p, keep)
    e.call("emu_ssd_fwd_cuda", p)
    assert ws[0].item() == (ws.numel() - 1) * p.nchunks  # one ticket per block of H1
    assert (ws[1:] == p.nchunks - 1).all()  # every chain published its nc - 1 steps
    fwd_factor = 5 if f32 else 2
    check(y, ref["y"], dtype, fwd_factor, "y")
    check(fin, ref["final"], torch.float32 if f32 else dtype, fwd_factor, "final_states")
    if y_pre is not None:
        check(y_pre, ref["y_pre"], dtype, fwd_factor, "y_pre")
    if t["cu"] is not None:
        check(var, ref["varlen"], torch.float32 if f32 else dtype, fwd_factor, "varlen_states")
    # F1 intermediates: dt' and its in-chunk cumsum, padding positions included (dt' = 0 there)
    dtv = t["dt"].double() + (0 if t["dt_bias"] is None else t["dt_bias"].double())
    if t["softplus"]:
        dtv = torch.nn.functional.softplus(dtv)
    dtv = dtv.clamp(*t["limit"])
    nc = p.nchunks
    dtpad = torch.nn.functional.pad(dtv, (0, 0, 0, nc * Q - L)).reshape(b, nc, Q, H).permute(0, 3, 1, 2)
    check(inter["dtp"], dtpad, torch.float32, 2, "dtp")
    check(inter["cs"], torch.cumsum(dtpad * t["A"].double()[None, :, None, None], -1), torch.float32, 5, "cs")
    assert torch.isfinite(inter["states"]).all(), "states (F3 output) not fully written"
    check(inter["states"], ref["entering"], torch.float32 if f32 else dtype, fwd_factor, "entering states (F3)")
    if not backward:
        return
    # ---- backward (F1-F3 recomputed, B0-B3, reductions)
    Sb = e.S["SsdBwdParams"]
    q = Sb()
    pf, inter = fill_params(e.S["SsdParams"], t, keep)  # fresh NaN intermediates
    pf.y_pre = ptr(y_pre)
    q.fwd = pf
    dout = t["dout"]
    q.dout, q.dout_sb, q.dout_sl, q.dout_sh = dout.data_ptr(), dout.stride(0), dout.stride(1), dout.stride(2)
    dfin = None if t["dfinal"] is None else t["dfinal"].float().contiguous()
    q.dfinal = ptr(dfin)
    keep += [dfin, dout]
    dinit = None if t["init"] is None else nan(b, H, P, N)
    got = emu_backward(e, q, t, dinit, keep)
    gref = ref["grads"]
    bwd_factor = 10 if f32 else 2
    act_tol = dtype
    for k, want in gref.items():
        check(got[k], want, act_tol, bwd_factor, f"grad {k}")


def packed_plan(lens, Q):
    """The chunk plan of packed sequences, written independently of the package's chunk_plan:
    each sequence's chunks at its start, +Q, ...; then empty chunks (L, S) up to the bound."""
    L, S = sum(lens), len(lens)
    starts, seqs, t = [], [], 0
    for s, n in enumerate(lens):
        starts += list(range(t, t + n, Q))
        seqs += [s] * len(range(t, t + n, Q))
        t += n
    nc = max(1, min(L, (L + S * (Q - 1)) // Q))
    assert len(starts) <= nc
    starts += [L] * (nc + 1 - len(starts))
    seqs += [S] * (nc + 1 - len(seqs))
    return torch.tensor([starts, seqs], dtype=torch.int32)


def run_packed_case(lens, H, P, G, N, Q, dtype, *, init_rows, seed):
    """Packed sequences with chunks aligned to their starts (chunk_plan), a state each: y, the
    varlen and final states and every gradient (initial_states' rows included) against the
    float64 recurrence run on each sequence alone."""
    e = emu()
    keep = []
    L, S = sum(lens), len(lens)
    t = make_case(1, L, H, P, G, N, Q, dtype, seq=False, init=False, seed=seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    R = {"all": S, 1: 1, 0: 0}[init_rows]
    t["init"] = torch.randn(R, H, P, N) if R else None
    t["cu"], t["plan"] = cu, packed_plan(lens, Q)
    dd = torch.float64
    leaves = {k: (None if t[k] is None else t[k].detach().to(dd).requires_grad_(True))
              for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "init")}
    ys, var_ref, fin_ref, loss = [], [], None, 0
    last = max(i for i, n in enumerate(lens) if n > 0)
    for i, n in enumerate(lens):
        s0 = int(cu[i])
        sl = lambda v: None if v is None else v[:, s0:s0 + n]  # noqa: E731
        init = leaves["init"][i:i + 1] if R > i else None
        if n == 0:
            var_ref.append(init[0].detach() if init is not None else torch.zeros(H, P, N, dtype=dd))
            continue
        y_pre, fs = ssd_scan_ref(sl(leaves["x"]), sl(leaves["dt"]), leaves["A"], sl(leaves["B"]), sl(leaves["C"]),
                                 D=leaves["D"], dt_bias=leaves["dt_bias"], initial_states=init,
                                 dt_softplus=t["softplus"], dt_limit=t["limit"], return_final_states=True)
        y = y_pre * torch.nn.functional.silu(sl(leaves["z"]))
        ys.append(y)
        var_ref.append(fs[0].detach())
        loss = loss + (y * sl(t["dout"]).to(dd)).sum()
        if i == last:
            fin_ref = fs.detach()
            loss = loss + (fs * t["dfinal"].to(dd)).sum()
    y_ref = torch.cat(ys, 1).detach()
    names = [k for k, v in leaves.items() if v is not None]
    gref = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))
    f32 = dtype == torch.float32
    fwd_factor, bwd_factor = (5, 10) if f32 else (2, 2)
    st_dtype = torch.float32 if f32 else dtype

    p, inter = fill_params(e.S["SsdParams"], t, keep)
    nc = p.nchunks
    y, y_pre, fin, var = nan(1, L, H, P, dtype=dtype), nan(1, L, H, P, dtype=dtype), nan(1, H, P, N), nan(S, H, P, N)
    keep += [y, y_pre, fin, var]
    p.y, p.y_pre, p.final_states, p.varlen_states = y.data_ptr(), y_pre.data_ptr(), fin.data_ptr(), var.data_ptr()
    ws = fwd_workspace(e, p, keep)
    e.call("emu_ssd_fwd_cuda", p)
    assert ws[0].item() == (ws.numel() - 1) * nc and (ws[1:] == nc - 1).all()
    check(y, y_ref, dtype, fwd_factor, "y")
    check(fin, fin_ref, st_dtype, fwd_factor, "final_states")
    check(var, torch.stack(var_ref), st_dtype, fwd_factor, "varlen_states")
    for i, n in enumerate(lens):
        if n == 0:  # an empty sequence keeps its initial state exactly
            assert torch.equal(var[i], t["init"][i] if R > i else torch.zeros(H, P, N)), i

    q = e.S["SsdBwdParams"]()
    pf, _ = fill_params(e.S["SsdParams"], t, keep)
    pf.y_pre = y_pre.data_ptr()
    q.fwd = pf
    dout = t["dout"]
    q.dout, q.dout_sb, q.dout_sl, q.dout_sh = dout.data_ptr(), dout.stride(0), dout.stride(1), dout.stride(2)
    dfin = t["dfinal"].float().contiguous()
    q.dfinal = dfin.data_ptr()
    keep += [dfin, dout]
    got = emu_backward(e, q, t, torch.zeros(R, H, P, N) if R else None, keep)  # the entry zeroes dinit with a plan
    for k, want in gref.items():
        check(got[k], want, dtype, bwd_factor, f"grad {k}")


# name: (lengths, H, P, G, N, Q, dtype, init rows)
PACKED_CASES = {
    # one-token, exactly one chunk, empty, a split inside a chunk, the 3-chunk chain
    "q64_f32_mixed": ([1, 64, 0, 150, 9], 2, 16, 1, 16, 64, torch.float32, "all"),
    # empty first and last sequences, bf16, two heads per group
    "q64_bf16_empty_ends": ([0, 70, 33, 0], 4, 8, 2, 16, 64, torch.bfloat16, "all"),
    # mamba_ssm's single initial state (the first sequence only)
    "q128_f32_first_only": ([40, 130, 3], 2, 8, 1, 8, 128, torch.float32, 1),
}


@pytest.mark.parametrize("name", list(PACKED_CASES))
def test_ssd_emulated_packed_initial_states(name):
    lens, H, P, G, N, Q, dtype, rows = PACKED_CASES[name]
    run_packed_case(lens, H, P, G, N, Q, dtype, init_rows=rows, seed=sum(lens))


# ---- the tests -------------------------------------------------------------------------------

def test_params_layout_matches_ctypes():
    """The ctypes mirrors parsed from ssd_chunk_scan.h have the compiler's offsets and sizes."""
    emu().check_layouts()


def test_transform_rewrites_everything():
    for cu in KERNELS.values():
        out, stats = emu_transform.transform(cu.read_text(), str(cu))
        assert stats["launches"] >= 3, stats  # the forward: H1, F4, F5


# name: (b, L, H, P, G, N, Q, dtype, options)
CASES = {
    # partial last chunk, seq_idx, init, dfinal, z, D per head, bias + softplus, ngroups > 1,
    # 2 heads per group (backward head split hs = 2)
    "q64_f32_all": (2, 100, 4, 16, 2, 16, 64, torch.float32, dict()),
    # D per headdim, padded (16-byte aligned, non-contiguous) activations: the vector path
    "q64_bf16_headdim_padded": (1, 90, 4, 32, 1, 32, 64, torch.bfloat16, dict(D="headdim", layout="padded", seed=1)),
    # misaligned sliced activations (scalar path), no z/D/bias, dt limit
    "q64_f16_sliced_plain": (1, 70, 2, 16, 2, 24, 64, torch.float16,
                             dict(z=False, D=None, bias=False, softplus=False, limit=(0.0, 2.0), init=False, seq=False, layout="sliced", seed=2)),
    # Q 128 with a full first chunk (two row blocks, two causal steps), packed sequences with
    # cu_seqlens (F5 varlen states); float32, whose tolerance sees a corrupted distant tile
    "q128_f32_varlen": (1, 150, 2, 16, 1, 32, 128, torch.float32, dict(varlen=True, seed=3)),
    # L < Q, groups of one head each
    "q128_bf16_short": (2, 40, 2, 8, 2, 8, 128, torch.bfloat16, dict(D="headdim", dfinal=False, seed=4)),
    # H1's chain over 8 chunks (two seq_idx cuts per row reset it), with initial states
    "q64_f32_chain": (2, 457, 2, 8, 1, 8, 64, torch.float32, dict(seed=11)),
    # 6 chunks, 2 x 2 state tiles per head (four chains per (b, h)), partial P and N tiles
    "q64_bf16_chain_tiles": (1, 330, 2, 80, 1, 72, 64, torch.bfloat16, dict(seq=False, seed=12)),
    # D without z: B0 runs for dD alone (from dout; with z it sums it from the float32 dy)
    "q64_bf16_D_no_z": (2, 150, 4, 16, 2, 16, 64, torch.bfloat16, dict(z=False, D="headdim", seed=13)),
    # B0's scalar loads (sliced), headdim 24 (P/8 = 3 does not divide the block: idle threads)
    "q64_bf16_z_D_sliced": (1, 130, 4, 24, 2, 16, 64, torch.bfloat16, dict(D="headdim", layout="sliced", seed=21)),
    # B0's dD without z at headdim 80 (P/8 = 10 does not divide the block: idle threads)
    "q64_bf16_no_z_p80": (1, 150, 2, 80, 1, 24, 64, torch.bfloat16, dict(z=False, seed=22)),
    # 8 heads per group: hs 4 (two splits per group)
    "q64_bf16_hs4": (1, 130, 8, 16, 1, 16, 64, torch.bfloat16, dict(seed=23)),
}
SLOW_CASES = {
    "q256_f32": (1, 300, 2, 32, 1, 32, 256, torch.float32, dict(seed=5)),
    "q64_bf16_p128_n128": (1, 130, 2, 128, 1, 128, 64, torch.bfloat16, dict(seed=6)),
    "q128_f16_long": (2, 300, 4, 24, 2, 40, 128, torch.float16, dict(D="headdim", layout="padded", seed=7)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_ssd_emulated(name):
    b, L, H, P, G, N, Q, dtype, opts = CASES[name]
    run_case(make_case(b, L, H, P, G, N, Q, dtype, **opts))


def states_two_ways(t, keep):
    """The state chain (ssd_states_cuda) run twice on case t: with float32 states, and without
    (the sm_90a forward's mode: one tile per chain in the workspace carries the state), each also
    writing states_lp (the entering states in the activation dtype) and final_states into
    poisoned buffers. Returns (states, lp with states, lp without, final with, final without)."""
    e = emu()
    b, H, P, N, dtype = (t[k] for k in "b H P N dtype".split())
    out = []
    for with_states in (True, False):
        p, inter = fill_params(e.S["SsdParams"], t, keep)
        nc = p.nchunks
        lp, fin = nan(b, nc, H, P, N, dtype=dtype), nan(b, H, P, N)
        keep += [lp, fin]
        p.states_lp, p.final_states = lp.data_ptr(), fin.data_ptr()
        if not with_states:
            p.states = None
        nbytes = e.value("emu_ssd_fwd_cuda_workspace_bytes", p)
        ws = torch.full((max(nbytes, 4) // 4,), -1, dtype=torch.int32)  # garbage: counters zeroed by the launcher
        keep.append(ws)
        p.workspace = ws.data_ptr()
        e.call("emu_ssd_states_cuda", p)
        out.append((inter["states"], lp, fin))
    (states, lp_full, fin_full), (_, lp_ring, fin_ring) = out
    return states, lp_full, lp_ring, fin_full, fin_ring


@pytest.mark.parametrize("name", ["q64_f32_chain", "q64_bf16_chain_tiles", "q128_bf16_short", "packed"])
def test_state_chain_without_float32_states(name):
    """Without float32 states the chain carries its state in one tile per chain in the workspace
    and still writes the entering states rounded to the activation dtype (what the
    sm_90a chunk output reads) and the final states: bit for bit those of the float32 chain."""
    keep = []
    if name == "packed":  # sequences starting mid-chain, an empty one, empty chunks at the end
        lens, Q = [70, 0, 150, 20], 64
        t = make_case(1, sum(lens), 2, 16, 1, 16, Q, torch.bfloat16, seq=False, seed=31)
        t["cu"] = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        t["plan"] = packed_plan(lens, Q)
        t["init"] = torch.randn(len(lens), 2, 16, 16)
    else:
        b, L, H, P, G, N, Q, dtype, opts = CASES[name]
        t = make_case(b, L, H, P, G, N, Q, dtype, **opts)
    states, lp_full, lp_ring, fin_full, fin_ring = states_two_ways(t, keep)
    assert torch.isfinite(states).all() and torch.isfinite(lp_full.float()).all()
    assert torch.equal(lp_full, states.to(lp_full.dtype)), "states_lp is not the float32 states rounded"
    assert torch.equal(lp_ring, lp_full), "the ring's entering states differ from the float32 chain's"
    assert torch.equal(fin_ring, fin_full) and torch.isfinite(fin_full).all()


def test_forward_without_float32_states_needs_the_sm90_output():
    """Only the sm_90a chunk output reads states_lp: a forward without float32 states that would
    run the portable chunk scan (as under the emulator) is refused, not run on a null pointer."""
    e, keep = emu(), []
    b, L, H, P, G, N, Q, dtype, opts = CASES["q64_bf16_chain_tiles"]
    t = make_case(b, L, H, P, G, N, Q, dtype, **opts)
    p, _ = fill_params(e.S["SsdParams"], t, keep)
    lp, y = nan(b, p.nchunks, H, P, N, dtype=dtype), nan(b, L, H, P, dtype=dtype)
    keep += [lp, y]
    p.states, p.states_lp, p.y = None, lp.data_ptr(), y.data_ptr()
    ws = torch.zeros(max(e.value("emu_ssd_fwd_cuda_workspace_bytes", p), 4) // 4, dtype=torch.int32)
    keep.append(ws)
    p.workspace = ws.data_ptr()
    with pytest.raises(RuntimeError, match="portable chunk scan and F5 need the float32 states"):
        e.call("emu_ssd_fwd_cuda", p)
    assert torch.isnan(y.float()).all()  # nothing ran


def test_ssd_emulated_q256():
    """Q = 256 once (4 row tiles per chunk), small shapes."""
    run_case(make_case(1, 70, 2, 8, 1, 8, 256, torch.float32, seed=8))


@slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_ssd_emulated_slow(name):
    b, L, H, P, G, N, Q, dtype, opts = SLOW_CASES[name]
    run_case(make_case(b, L, H, P, G, N, Q, dtype, **opts))


def test_bwd_head_split_build():
    assert emu().value("emu_ssd_bwd_target_blocks") == DEFAULT_TARGET_BLOCKS


@slow
def test_ssd_emulated_production_target_blocks():
    """The kernel file's own NK_SSD_BWD_TARGET_BLOCKS (hs = 1 at these sizes)."""
    lib = emu(target_blocks=None)
    assert lib.value("emu_ssd_bwd_target_blocks") == 1024
    run_case(make_case(1, 100, 4, 16, 2, 16, 64, torch.bfloat16, seed=9), lib=lib)


def test_forward_misaligned_base_takes_scalar_path():
    """x's base only 4-byte aligned while its strides are 16-byte multiples: the host must pick
    scalar loads for x (a 16-byte access would throw in the emulator)."""
    t = make_case(1, 20, 2, 8, 1, 8, 64, torch.float32, z=False, D=None, init=False, seq=False, dfinal=False, seed=10)
    base = torch.randn(1 + 20 * 2 * 8 + 4)
    t["x"] = base[1 : 1 + 20 * 2 * 8].view(1, 20, 2, 8)
    run_case(t, backward=False)


SELFTEST_ERRORS = {
    2: "barrier deadlock",
    3: "misaligned 16-byte vector access",
    4: "not 32-byte aligned",
    6: "write past the end of dynamic shared memory",
    7: "dynamic shared memory",
    8: "invalid launch configuration",
}


@pytest.mark.parametrize("case", [0, 1, 2, 3, 4, 5, 6, 7, 8])
def test_emulator_catches_defects(case):
    """The mocks report what the GPU would (or poison what it would leave undefined)."""
    lib = emu().lib
    lib.emu_selftest.restype = ctypes.c_int
    lib.emu_selftest.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    out = torch.full((4096,), -1.0)
    inp = torch.arange(64, dtype=torch.float32)
    err = ctypes.create_string_buffer(1024)
    rc = lib.emu_selftest(case, out.data_ptr(), inp.data_ptr(), err, len(err))
    msg = err.value.decode()
    if case in SELFTEST_ERRORS:
        assert rc == 1 and SELFTEST_ERRORS[case] in msg, (rc, msg)
    elif case == 0:
        assert rc == 0, msg
        s = torch.arange(64, dtype=torch.float32).flip(0)
        want = s + s.view(32, 2).flip(1).reshape(64)  # lane ^ 1 partner
        torch.testing.assert_close(out[:128], torch.cat([want, want]))
    else:  # 1: read before the barrier, 5: wmma tile read before __syncwarp: poison seen
        assert rc == 0, msg
        assert torch.isnan(out[0]), out[:4]


def test_emulated_conversions_round_to_nearest_even():
    lib = emu().lib
    v = torch.cat([torch.randn(20000) * 10.0 ** torch.randint(-9, 6, (20000,)),
                   torch.tensor([0.0, -0.0, 65504.0, 65520.0, 65519.0, 1e-8, 5.96e-8, 2.98e-8, 6.1e-5, float("inf"), -float("inf")])])
    v = v.float().contiguous()
    n = v.numel()
    h = torch.empty(n, dtype=torch.int16)
    bf = torch.empty(n, dtype=torch.int16)
    lib.emu_float2half(ctypes.c_void_p(v.data_ptr()), ctypes.c_void_p(h.data_ptr()), n)
    lib.emu_float2bf16(ctypes.c_void_p(v.data_ptr()), ctypes.c_void_p(bf.data_ptr()), n)
    assert torch.equal(h.view(torch.float16), v.to(torch.float16))
    assert torch.equal(bf.view(torch.bfloat16), v.to(torch.bfloat16))
    back = torch.empty(n)
    lib.emu_half2float(ctypes.c_void_p(h.data_ptr()), ctypes.c_void_p(back.data_ptr()), n)
    assert torch.equal(back, v.to(torch.float16).float())


def test_transform_leaves_no_launch_syntax():
    """Every <<<...>>> launch of the kernel files becomes an emulated launch."""
    for cu in list(KERNELS.values()) + [CSRC / "ssd" / "state_update_cuda.cu"]:
        src = cu.read_text()
        out, stats = emu_transform.transform(src, str(cu))
        assert stats["launches"] == src.count("<<<") and "<<<" not in out, (cu.name, stats)


# ---- launch limits (csrc/ssd/launch_limits.h) --------------------------------------------------
# The grids of the SSD family's CUDA kernels are computed in a plain C++ header, compiled here on
# its own (no CUDA, no torch) behind a small extern "C" shim, and checked at and past CUDA's
# limits (grid.x <= 2^31 - 1, grid.y and grid.z <= 65535) with sizes no GPU memory would hold.
# The CPU kernels have none of these limits.

LIMITS_SHIM = r"""
#include <cstdint>
#include <cstring>
#include <exception>
#include "ssd/launch_limits.h"

namespace {
int fail(const std::exception& e, char* msg, int n) {
  std::strncpy(msg, e.what(), n - 1);
  msg[n - 1] = 0;
  return 1;
}
void put(const nk::LaunchGrid& g, int64_t* out) { out[0] = g.x; out[1] = g.y; out[2] = g.z; }
}  // namespace

#define NK_SHIM(body) try { body; return 0; } catch (const std::exception& e) { return fail(e, msg, n); }

#pragma GCC visibility push(default)
extern "C" {
int lim_conv_fwd(int64_t b, int64_t d, int64_t l, int64_t sms, int64_t* o, char* msg, int n) {
  NK_SHIM(put(nk::conv1d_fwd_grid(b, d, l, sms), o))
}
int lim_conv_bwd(int64_t b, int64_t d, int64_t l, int64_t target, int64_t* o, char* msg, int n) {
  NK_SHIM(auto g = nk::conv1d_bwd_grid(b, d, l, target); put(g.grid, o); o[3] = g.time_splits)
}
int lim_conv_update(int64_t b, int64_t d, int64_t* o, char* msg, int n) { NK_SHIM(put(nk::conv1d_update_grid(b, d), o)) }
int lim_ssd_fwd(int64_t b, int64_t nc, int64_t h, int64_t p, int64_t nn, int64_t q, int64_t nseq, int64_t* o, char* msg,
                int n) {
  NK_SHIM(auto g = nk::ssd_fwd_grids(b, nc, h, p, nn, q, nseq); put(g.chain, o); put(g.scan, o + 3);
          put(g.varlen, o + 6))
}
int lim_ssd_bwd(int64_t b, int64_t nc, int64_t h, int64_t p, int64_t nn, int64_t q, int64_t hs, int64_t* o, char* msg,
                int n) {
  NK_SHIM(auto g = nk::ssd_bwd_grids(b, nc, h, p, nn, q, hs); put(g.dstate_chain, o); put(g.col, o + 3);
          put(g.row, o + 6); put(g.chunk_fin, o + 9))
}
int lim_grid(int64_t x, int64_t y, int64_t z, int64_t* o, char* msg, int n) {
  NK_SHIM(put(nk::checked_grid("some_op", "some", {x, y, z}, "advice x", "advice y", "advice z"), o))
}
}
#pragma GCC visibility pop
"""

_LIMITS = []


def limits():
    """ctypes handle of the launch-limit shim, built once per content hash (build_emulated)."""
    if not _LIMITS:
        bdir = Path(os.environ.get("NK_CUDA_EMU_BUILD_DIR", Path(tempfile.gettempdir()) / "nk_cuda_emu"))
        bdir.mkdir(parents=True, exist_ok=True)
        src = bdir / f"launch_limits_shim_{hashlib.sha256(LIMITS_SHIM.encode()).hexdigest()[:16]}.cpp"
        if not src.exists():
            src.write_text(LIMITS_SHIM)
        _LIMITS.append(ctypes.CDLL(str(build_emulated("launch_limits", src, {}, families=("ssd",)))))
    return _LIMITS[0]


def grid_of(fn, *args, n_out=3):
    """(grid values, None) or (None, error message) of a shim function."""
    out = (ctypes.c_int64 * 16)()
    msg = ctypes.create_string_buffer(1024)
    cargs = [ctypes.c_int64(a) if isinstance(a, int) and not isinstance(a, bool) else ctypes.c_int(int(a))
             for a in args]
    f = getattr(limits(), fn)
    f.restype = ctypes.c_int
    rc = f(*cargs, out, msg, len(msg))
    return (list(out[:n_out]), None) if rc == 0 else (None, msg.value.decode())


I32 = 2**31 - 1


def test_grid_check_names_dimension_limit_and_advice():
    assert grid_of("lim_grid", I32, 65535, 65535)[0] == [I32, 65535, 65535]
    for dims, dim, val, lim, adv in [((I32 + 1, 1, 1), "x", I32 + 1, I32, "advice x"),
                                     ((1, 65536, 1), "y", 65536, 65535, "advice y"),
                                     ((1, 1, 65536), "z", 65536, 65535, "advice z"),
                                     ((0, 1, 1), "x", 0, I32, "advice x")]:
        _, msg = grid_of("lim_grid", *dims)
        assert msg == (f"nemokernels: some_op: the CUDA some kernel needs grid.{dim} = {val} blocks, CUDA allows "
                       f"1..{lim}; {adv}"), msg


def test_conv1d_forward_grid_has_no_sequence_or_batch_limit():
    """The forward's tiles (64 time steps x 64 channels) are one flat grid.x index: one block per
    tile up to 8 waves of 16 resident blocks per SM, then blocks stride over the tiles. The old
    grids failed past 65535 x 64 tokens (grid.y) or 65535 sequences (grid.z)."""
    for b, L in [(1, 65535 * 64 + 1), (1, 10**9), (1, 2**40), (65536, 100), (10**6, 2048), (3, 0)]:
        tiles = b * (4096 // 64) * max(1, -(-L // 64))
        g, err = grid_of("lim_conv_fwd", b, 4096, L, 132)
        assert err is None and g == [min(tiles, 8 * 16 * 132), 1, 1], (b, L, g, err)
    assert grid_of("lim_conv_fwd", 1, 6144, 2048, 132)[0] == [96 * 32, 1, 1]  # Nano L2048: one block per tile
    assert grid_of("lim_conv_fwd", 1, 6144, 2048, 1)[0] == [128, 1, 1]  # 1 SM: 8 waves of 16 blocks


def test_conv1d_backward_grid_splits_time_evenly():
    """Backward blocks = channel blocks x time splits, at most `target` blocks (one wave of
    resident blocks) unless the channel blocks alone are more; each split walks
    ceil or floor of items / splits (batch x time tiles) items; the partial rows the entry
    allocates are the splits, whatever the batch and length."""
    for b, L in [(1, 1), (2, 100), (1, 2048), (2, 65535 * 64 + 1), (65536, 100), (1, 2**40)]:
        items = b * max(1, -(-L // 64))
        g, err = grid_of("lim_conv_bwd", b, 512, L, 528, n_out=4)
        splits = g[3]
        assert err is None and g[:3] == [8 * splits, 1, 1], (b, L, g, err)
        assert 1 <= splits <= min(items, 528 // 8), (b, L, splits)
        per_block = -(-items // splits)
        assert (splits - 1) * per_block < items <= splits * per_block, (b, L, splits)
        assert g[0] <= 528, (b, L, g)
    assert grid_of("lim_conv_bwd", 1, 6144, 2048, 528, n_out=4)[0] == [96 * 5, 1, 1, 5]  # Nano L2048 on 132 SMs
    assert grid_of("lim_conv_bwd", 1, 2**20, 100, 528, n_out=4)[0] == [2**14, 1, 1, 1]  # channel blocks > target


def test_conv1d_update_limits():
    assert grid_of("lim_conv_update", 65535, 4096)[0] == [32, 65535, 1]
    _, err = grid_of("lim_conv_update", 65536, 4096)
    assert err.startswith("nemokernels: causal_conv1d_update: the CUDA update kernel needs grid.y = 65536 blocks")
    assert "split the batch into calls of at most 65535 sequences" in err


def test_ssd_forward_grid_limits():
    # At the limit: batch 2^31 - 1 with one chunk of 64, one head, P = N = 8: every grid is 2^31 - 1.
    g, err = grid_of("lim_ssd_fwd", I32, 1, 1, 8, 8, 64, 0, n_out=9)
    assert err is None and g[0] == g[3] == I32, g  # H1 and F4 (F5 has one block per sequence)
    _, err = grid_of("lim_ssd_fwd", I32 + 1, 1, 1, 8, 8, 64, 0)
    assert err.startswith("nemokernels: mamba_chunk_scan_combined: the CUDA state_chain kernel needs grid.x = "
                          "2147483648 blocks, CUDA allows 1..2147483647; split the batch, or the sequence")
    _, err = grid_of("lim_ssd_fwd", I32, 1, 1, 8, 8, 128, 0)  # two row tiles per chunk
    assert "the CUDA chunk_scan kernel needs grid.x = 4294967294" in err
    g, err = grid_of("lim_ssd_fwd", 1, 1, 2**16, 128, 256, 64, 0)  # 2 x 4 state tiles per head
    assert err is None and g[0] == 2**16 * 8, (g, err)
    g, err = grid_of("lim_ssd_fwd", 1, 2**15, 2**13, 128, 128, 64, 0)  # 2^15 chunks x 2^13 heads x 4 tiles
    assert err is None and g[0] == 2**30, (g, err)
    _, err = grid_of("lim_ssd_fwd", 1, 2**16, 2**13, 128, 128, 64, 0)
    assert "the CUDA state_chain kernel needs grid.x = 2147483648" in err
    _, err = grid_of("lim_ssd_fwd", 1, 1, 2**16, 8, 8, 64, 2**15)
    assert "the CUDA varlen_states kernel needs grid.x = 2147483648" in err and "fewer sequences" in err


def test_ssd_backward_grid_limits():
    """The backward cast its grid sizes to unsigned unchecked (2^32 blocks wrapped to 0, 2^31
    made an invalid launch); every grid-sized kernel is now checked, by name."""
    g, err = grid_of("lim_ssd_bwd", I32, 1, 1, 8, 8, 64, 1, n_out=12)
    assert err is None and [g[0], g[3], g[6], g[9]] == [I32] * 4, g
    cases = [((1, 2**15, 2**16, 8, 8, 64, 1), "dstate_chain", 2**31),           # b nc H tiles
             ((2**31, 1, 1, 8, 8, 64, 1), "dstate_chain", 2**31),
             ((1, 1, 2**31, 8, 8, 64, 1), "dstate_chain", 2**31),
             ((I32, 1, 1, 8, 8, 128, 1), "col", 2 * I32),                       # two position tiles
             ((1, 2**20, 2**11, 8, 8, 64, 1), "dstate_chain", 2**31)]
    for args, kernel, blocks in cases:
        _, err = grid_of("lim_ssd_bwd", *args)
        assert err == (f"nemokernels: mamba_chunk_scan_combined (backward): the CUDA {kernel} kernel needs grid.x = "
                       f"{blocks} blocks, CUDA allows 1..2147483647; split the batch, or the sequence (passing "
                       f"final_states on as initial_states), into smaller calls"), (args, err)
    # Large state tiles: dstate_chain has 2 x 4 tiles per (b, chunk, h).
    _, err = grid_of("lim_ssd_bwd", 2**24, 1, 16, 128, 256, 64, 16)
    assert "the CUDA dstate_chain kernel needs grid.x = 2147483648" in err
