"""The gated RMSNorm CUDA kernels (csrc/ssd/rmsnorm_gated_cuda.cu, forward and backward with its
launch plans) run on the CPU through the emulator in tools/cuda_emu (tests/cuda_emu.py,
tools/cuda_emu/README.md), over shapes that take every kernel path (16-byte vectors or scalar
accesses; 1, 2 or 4 cached vectors per thread, one warp or several per unit, several units per
block; uncached long groups, vectorised or scalar, and the column kernel).
out, rstd, dx, dz, dweight and dbias are NaN-poisoned before the launch and compared with the
float64 reference (autograd of nemokernels.ssd.reference.rmsnorm_gated_ref), as the CPU kernel's
are through the public op, with the tolerances of tests/ssd/test_rmsnorm_gated.py. A second
library reports 2 SMs: fewer resident blocks, so the row lanes of both persistent kernels walk
several rows and the backward's blocks sum several rows into their partial rows.
"""
import functools

import pytest
import torch

import cuda_emu as base
from helpers import assert_close

nemokernels = pytest.importorskip("nemokernels")
from nemokernels.ssd.reference import rmsnorm_gated_ref  # noqa: E402

HEADER = base.CSRC / "ssd" / "rmsnorm_gated.h"
DTYPES = [torch.float32, torch.bfloat16]


@functools.cache
def emu(sm_count=None):
    flags = () if sm_count is None else (f"-DEMU_SM_COUNT={sm_count}",)
    return base.EmuLibrary.build("rmsnorm" if sm_count is None else f"rmsnorm_{sm_count}sm",
                                 base.EMU / "driver_rmsnorm.cpp", [base.CSRC / "ssd" / "rmsnorm_gated_cuda.cu"],
                                 ("ssd",), header=HEADER, structs=("RmsNormFwdParams", "RmsNormBwdParams"),
                                 flags=flags)


# (rows, D, G) and the plans they take (forward / backward; V = 4 float32, 8 bfloat16):
# 128: one warp, 1 vector, 8 units per block; 512: float32 forward 4 vectors in one warp,
# backward 2 in two warps, bfloat16 2 / 1; 1536: 3 and 6 warps; 4100/1025: scalar (G not a
# multiple of the vector), 4 vectors over 9 warps; 4096: 8 and 16 warps (the 512-thread limit);
# 8200: scalar uncached (column kernel); 16384: vectorised uncached forward and backward; tiny D,
# several units per block, G = 1.
SHAPES = [(37, 1024, 128), (33, 2048, 512), (9, 1536, 1536), (5, 4100, 1025), (9, 4096, 4096), (2, 8200, 8200),
          (2, 16384, 16384), (5, 7, 7), (70, 96, 32), (3, 24, 1)]
MODES = ["none", "first", "last"]  # no z / gate before the norm / gate after it (norm_before_gate)
# contiguous; x and z with channel stride 2; rows padded (row stride D + 8); dout expanded (strides 0)
LAYOUTS = ["contiguous", "strided", "row_padded", "dout_expanded"]


def _cases():
    out = []
    for si, (rows, D, G) in enumerate(SHAPES):
        for mi, mode in enumerate(MODES):
            layout = LAYOUTS[(2 * mi + 3 * si) % 4]
            for dtype in DTYPES:
                bias = (LAYOUTS.index(layout) % 2 == 0) == (dtype == torch.float32)
                out.append(pytest.param(rows, D, G, mode, layout, bias, dtype,
                                        id=f"{rows}x{D}-G{G}-{mode}-{layout}-{'bias' if bias else 'nobias'}-"
                                           f"{str(dtype)[6:]}"))
    return out


def _activation(rows, D, dtype, layout):
    if layout == "strided":
        return torch.randn(rows, 2 * D).to(dtype)[:, ::2]
    if layout == "row_padded":
        return torch.randn(rows, D + 8).to(dtype)[:, :D]
    if layout == "offset":  # row stride a multiple of 16 bytes, base one element off: misaligned
        return torch.randn(rows, D + 8).to(dtype)[:, 1:D + 1]
    return torch.randn(rows, D).to(dtype)


def make_inputs(rows, D, dtype, mode, layout, bias, seed, misaligned=None):
    """x, z, weight, bias, dout; `misaligned` names one of x, z, dout to start off its 16-byte
    boundary (the kernels must take the scalar path)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lay = lambda name: "offset" if misaligned == name else layout  # noqa: E731
    x = _activation(rows, D, dtype, lay("x"))
    z = _activation(rows, D, dtype, lay("z")) if mode != "none" else None
    w = 1 + 0.5 * torch.randn(D, generator=g)
    b = 0.5 * torch.randn(D, generator=g) if bias else None
    dout = (torch.randn(()).to(dtype).expand(rows, D) if layout == "dout_expanded"
            else _activation(rows, D, dtype, lay("dout")))
    return x, z, w, b, dout


def _ptr(t):
    return None if t is None else t.data_ptr()


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


def run_emulated(e, x, z, w, b, dout, G, eps, norm_before_gate):
    """The op entry's parameter set-up (csrc/ssd/rmsnorm_gated.cpp) and the emulated forward and
    backward launches: ((out, rstd, dx, dz, dweight, dbias), the backward's partial-row count),
    every output NaN-poisoned first."""
    rows, D = x.shape
    out, rstd = _nan(rows, D, dtype=x.dtype), _nan(rows, D // G)
    p = e.S["RmsNormFwdParams"]()
    p.rows, p.dim, p.group_size, p.eps, p.norm_before_gate = rows, D, G, eps, norm_before_gate
    p.dtype = base.DT_ENUM[x.dtype]
    p.x, p.x_sr, p.x_sc = x.data_ptr(), x.stride(0), x.stride(1)
    if z is not None:
        p.z, p.z_sr, p.z_sc = z.data_ptr(), z.stride(0), z.stride(1)
    p.weight, p.bias, p.out, p.rstd = w.data_ptr(), _ptr(b), out.data_ptr(), rstd.data_ptr()
    p.weight_dtype = base.DT_ENUM[w.dtype]
    p.bias_dtype = base.DT_ENUM[b.dtype if b is not None else torch.float32]
    e.call("emu_rmsnorm_fwd_cuda", p)

    dx, dz = _nan(rows, D, dtype=x.dtype), (_nan(rows, D, dtype=x.dtype) if z is not None else None)
    dw, db = _nan(D, dtype=w.dtype), (_nan(D, dtype=b.dtype) if b is not None else None)
    q = e.S["RmsNormBwdParams"]()
    q.fwd = p
    q.fwd.out = None
    q.dout, q.dout_sr, q.dout_sc = dout.data_ptr(), dout.stride(0), dout.stride(1)
    q.dx, q.dz, q.dweight, q.dbias = dx.data_ptr(), _ptr(dz), dw.data_ptr(), _ptr(db)
    q.num_partials = e.value("emu_rmsnorm_bwd_num_partials", q)
    partials = _nan(q.num_partials, 2, D)
    q.partials = partials.data_ptr()
    e.call("emu_rmsnorm_bwd_cuda", q)
    return (out, rstd, dx, dz, dw, db), q.num_partials


def run_cpu(x, z, w, b, dout, G, eps, norm_before_gate):
    """The CPU kernel through the public API: (out, None, dx, dz, dweight, dbias)."""
    leaves = {k: None if t is None else t.detach().requires_grad_() for k, t in dict(x=x, z=z, w=w, b=b).items()}
    out = nemokernels.rmsnorm_fn(leaves["x"], leaves["w"], leaves["b"], z=leaves["z"], eps=eps, group_size=G,
                                 norm_before_gate=norm_before_gate)
    grads = iter(torch.autograd.grad(out, [t for t in leaves.values() if t is not None], dout))
    dx, dz, dw, db = [None if t is None else next(grads) for t in leaves.values()]
    return out.detach(), None, dx, dz, dw, db


def reference(x, z, w, b, dout, G, eps, norm_before_gate):
    """float64 (out, rstd, dx, dz, dweight, dbias) by autograd of the reference."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    z64 = None if z is None else z.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    out = rmsnorm_gated_ref(x64, w64, b64, z=z64, eps=eps, group_size=G, norm_before_gate=norm_before_gate)
    leaves = [t for t in (x64, z64, w64, b64) if t is not None]
    grads = iter(torch.autograd.grad(out, leaves, dout.double()))
    dx, dz, dw, db = [None if t is None else next(grads) for t in (x64, z64, w64, b64)]
    u = x.double() * torch.nn.functional.silu(z.double()) if z is not None and not norm_before_gate else x.double()
    rstd = 1 / torch.sqrt(u.reshape(x.shape[0], -1, G).square().mean(-1) + eps)
    return out.detach(), rstd, dx, dz, dw, db


def check(got, want, dtype, what):
    """Tolerances of tests/ssd/test_rmsnorm_gated.py: outputs at the dtype's, gradients at 10x
    (float32) / 2x (16-bit), rstd at float32's, dweight/dbias at their own dtype's."""
    for name, a, r in zip(("out", "rstd", "dx", "dz", "dweight", "dbias"), got, want):
        if a is None:
            assert r is None or name == "rstd", name  # the public API does not return rstd
            continue
        grad = name not in ("out", "rstd")
        dt = dtype if name in ("out", "dx", "dz") else a.dtype
        assert_close(a, r, dt, factor=(10.0 if dtype == torch.float32 else 2.0) if grad else 1.0,
                     what=f"{what}: {name}")


def _run_case(e, rows, D, G, mode, layout, bias, dtype, misaligned=None, param_dtype=torch.float32):
    """Emulated CUDA and CPU kernel against float64; returns the CUDA backward's partial rows."""
    x, z, w, b, dout = make_inputs(rows, D, dtype, mode, layout, bias, seed=rows * 7 + D, misaligned=misaligned)
    w, b = w.to(param_dtype), (None if b is None else b.to(param_dtype))
    eps, nbg = 1e-5, mode == "last"
    want = reference(x, z, w, b, dout, G, eps, nbg)
    got, num_partials = run_emulated(e, x, z, w, b, dout, G, eps, nbg)
    check(got, want, dtype, "emulated CUDA")
    check(run_cpu(x, z, w, b, dout, G, eps, nbg), want, dtype, "CPU kernel")
    return num_partials


def test_params_layout():
    emu().check_layouts()


@pytest.mark.parametrize("rows,D,G,mode,layout,bias,dtype", _cases())
def test_rmsnorm_emulated(rows, D, G, mode, layout, bias, dtype):
    _run_case(emu(), rows, D, G, mode, layout, bias, dtype)


@pytest.mark.parametrize("rows,D,G,mode,layout,bias,dtype", [c for c in _cases() if c.values[0] > 9])
def test_rmsnorm_emulated_two_sms(rows, D, G, mode, layout, bias, dtype):
    """Two SMs: the backward grid has fewer row blocks than rows need, so its row loop runs more
    than once and more rows fold into each partial row."""
    assert _run_case(emu(2), rows, D, G, mode, layout, bias, dtype) < rows  # several rows per row lane


@pytest.mark.parametrize("misaligned", ["x", "z", "dout"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_emulated_misaligned(misaligned, dtype):
    """One activation starts one element off a 16-byte boundary (row stride still a multiple of
    16 bytes): the launch plans must fall back to scalar accesses (a vector access there throws
    under the emulator, as it faults on the GPU)."""
    _run_case(emu(), 37, 1024, 128, "first", "contiguous", True, dtype, misaligned=misaligned)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_rmsnorm_emulated_param_dtypes(mode, param_dtype):
    """16-bit weight and bias are read in their own dtype (cached weight, per-row bias, uncached
    path) and dweight/dbias come back in it: no float32 copy before or cast after the kernels."""
    for rows, D, G in [(37, 1024, 128), (2, 8200, 8200)]:
        _run_case(emu(), rows, D, G, mode, "contiguous", True, torch.bfloat16, param_dtype=param_dtype)


@pytest.mark.parametrize("rows,D,G,launches", [(37, 1024, 128, 2), (9, 4096, 4096, 2), (2, 16384, 16384, 3)])
def test_backward_paths_taken(rows, D, G, launches):
    """The shapes reach both backward variants: cached (the row kernel writes one dweight/dbias
    partial row per block, then the reduction: 2 launches; 4096 channels still fit 512 threads
    of 2 float32 vectors) and uncached (+ the column kernel: 3)."""
    e = emu()
    x, z, w, b, dout = make_inputs(rows, D, torch.float32, "first", "contiguous", True, seed=0)
    before = e.launches()
    run_emulated(e, x, z, w, b, dout, G, 1e-5, False)
    assert e.launches() - before == 1 + launches  # the forward, then the backward's
