"""rmsnorm_fn / RMSNormGated (gated RMSNorm of the Mamba-2 mixer) against the float64 reference
(ssd/reference.py): forward, gradients of x, weight, bias and z, every option, odd shapes and
strides, bad inputs, opcheck, torch.compile."""
from types import SimpleNamespace

import pytest
import torch

import nemokernels
from nemokernels.ssd.reference import rmsnorm_gated_ref

from conftest import DEVICES
from helpers import assert_close, bad_input_test, opcheck, poison_allocator, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# gate mode: no z / z with norm_before_gate=False (gate first, the default) / True (gate last)
MODES = ["none", "first", "last"]

# (leading dims, D, group_size): 1-D x, D = 1, 3 leading dims, odd D with groups, D = 4100,
# group sizes that take every CUDA path (vectorised or scalar; cached with 1, 2 or 4 vectors
# per thread; uncached for long groups).
SHAPES = [
    ((), 7, None),
    ((5,), 1, None),
    ((2, 3, 4), 136, 8),
    ((3,), 4100, 1025),
    ((2, 2), 4100, None),
    ((4,), 2048, 256),
    ((3,), 4096, None),
    ((2,), 20000, None),
    ((17,), 96, 32),
]
LAYOUTS = ["contiguous", "strided", "row_padded", "permuted"]


def make(lead, dim, dtype, device, layout, scale=1.0):
    """A (*lead, dim) tensor in one of several memory layouts (values ~ N(0, scale^2))."""
    shape = (*lead, dim)
    if layout == "strided":  # channel stride 2
        t = torch.randn(*lead, 2 * dim, device=device, dtype=dtype)[..., ::2]
    elif layout == "row_padded":  # rows further apart than dim (a slice of a wider buffer)
        t = torch.randn(*lead, dim + 8, device=device, dtype=dtype)[..., :dim]
    elif layout == "permuted" and len(lead) >= 2:  # leading dims that do not fold into one stride
        t = torch.randn(lead[1], lead[0], *lead[2:], dim, device=device, dtype=dtype).transpose(0, 1)
    else:
        t = torch.randn(shape, device=device, dtype=dtype)
    assert t.shape == shape
    return t * scale if scale != 1.0 else t


def make_case(lead, dim, dtype, device, mode, bias, layout, param_dtype=None):
    param_dtype = param_dtype or dtype
    x = make(lead, dim, dtype, device, layout)
    z = make(lead, dim, dtype, device, LAYOUTS[(LAYOUTS.index(layout) + 1) % 4]) if mode != "none" else None
    w = 1.0 + 0.5 * torch.randn(dim, device=device, dtype=param_dtype)
    b = 0.5 * torch.randn(dim, device=device, dtype=param_dtype) if bias else None
    return x, z, w, b


def eps_for(dim, gs):
    """A group of one channel normalises to +-1 (up to eps): its input gradient is ~eps / x^2, a
    cancellation that no float32 kernel resolves; a larger eps makes such groups well-posed."""
    return 0.5 if (gs or dim) < 4 else 1e-5


def ref64(x, w, b, z, **kw):
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return rmsnorm_gated_ref(d(x), d(w), d(b), z=d(z), **kw)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(device, dtype, mode, bias, sanitizer):
    for i, (lead, dim, gs) in enumerate(SHAPES):
        if sanitizer and i % 2:
            continue
        layout = LAYOUTS[i % len(LAYOUTS)]
        x, z, w, b = make_case(lead, dim, dtype, device, mode, bias, layout)
        kw = dict(eps=eps_for(dim, gs), group_size=gs, norm_before_gate=mode == "last")
        poison_allocator(device)
        out = nemokernels.rmsnorm_fn(x, w, b, z=z, **kw)
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
        assert_close(out, ref64(x, w, b, z, **kw), dtype, what=f"out {lead} D={dim} G={gs} {layout}")


@pytest.mark.parametrize("device", DEVICES)
def test_default_is_gate_first(device):
    """Our default is norm_before_gate=False (Nemotron-H / Mamba-2 usage), eps 1e-6, one group."""
    x, z = torch.randn(4, 64, device=device), torch.randn(4, 64, device=device)
    w = torch.randn(64, device=device)
    out = nemokernels.rmsnorm_fn(x, w, z=z)
    assert_close(out, ref64(x, w, None, z, eps=1e-6, group_size=None, norm_before_gate=False), torch.float32)
    assert rel_err(out, ref64(x, w, None, z, norm_before_gate=True)) > 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rstd_output(device, dtype):
    x, z = torch.randn(3, 5, 96, device=device, dtype=dtype), torch.randn(3, 5, 96, device=device, dtype=dtype)
    w = torch.randn(96, device=device, dtype=dtype)
    out, rstd = torch.ops.nemokernels.rmsnorm_gated_fwd(x, w, None, z, 1e-6, 32, False)
    assert rstd.shape == (3, 5, 3) and rstd.dtype == torch.float32
    u = (x.double() * torch.nn.functional.silu(z.double())).reshape(3, 5, 3, 32)
    ref = 1.0 / torch.sqrt(u.square().mean(-1) + 1e-6)
    assert_close(rstd, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_large_and_tiny_values(device):
    """Rows of very different scales (rstd spans orders of magnitude); eps dominates tiny rows."""
    x = torch.randn(6, 256, device=device) * torch.tensor([1e-4, 1e-2, 1.0, 1e2, 1e4, 0.0], device=device)[:, None]
    z = torch.randn(6, 256, device=device)
    w = torch.randn(256, device=device)
    for nbg in (False, True):
        out = nemokernels.rmsnorm_fn(x, w, z=z, eps=1e-6, group_size=64, norm_before_gate=nbg)
        assert torch.isfinite(out).all()
        assert_close(out, ref64(x, w, None, z, eps=1e-6, group_size=64, norm_before_gate=nbg), torch.float32)


# ---------------------------------------------------------------- backward


def _grads_check(device, dtype, mode, bias, lead, dim, gs, layout, param_dtype=None):
    x, z, w, b = make_case(lead, dim, dtype, device, mode, bias, layout, param_dtype)
    leaves = [t.requires_grad_() for t in (x, z, w, b) if t is not None]
    kw = dict(eps=eps_for(dim, gs), group_size=gs, norm_before_gate=mode == "last")
    out = nemokernels.rmsnorm_fn(x, w, b, z=z, **kw)
    # Non-contiguous upstream gradient (channel stride 2).
    g = make(lead, dim, dtype, device, "strided")
    poison_allocator(device)
    grads = torch.autograd.grad(out, leaves, g)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(l64)
    x64, z64, w64, b64 = next(it), (next(it) if z is not None else None), next(it), (next(it) if bias else None)
    r = rmsnorm_gated_ref(x64, w64, b64, z=z64, **kw)
    want = torch.autograd.grad(r, l64, g.double())
    names = ["dx"] + (["dz"] if z is not None else []) + ["dweight"] + (["dbias"] if bias else [])
    f = 2.0 if dtype != torch.float32 else 10.0
    for name, t, got, ref in zip(names, leaves, grads, want):
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.isfinite(got).all(), f"{name} not finite"
        assert_close(got, ref, dtype if name in ("dx", "dz") else (param_dtype or dtype), factor=f,
                     what=f"{name} {lead} D={dim} G={gs} {layout}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_backward_matches_reference(device, dtype, mode, bias, sanitizer):
    for i, (lead, dim, gs) in enumerate(SHAPES):
        if sanitizer and i % 2:
            continue
        _grads_check(device, dtype, mode, bias, lead, dim, gs, LAYOUTS[(i + 1) % len(LAYOUTS)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_backward_contiguous_vectorised(device, mode):
    """Everything contiguous and aligned (the vectorised CUDA path, also for the gradient)."""
    for dtype in DTYPES:
        x, z, w, b = make_case((8, 16), 512, dtype, device, mode, True, "contiguous")
        for t in (x, z, w, b):
            if t is not None:
                t.requires_grad_()
        kw = dict(group_size=128, norm_before_gate=mode == "last")
        out = nemokernels.rmsnorm_fn(x, w, b, z=z, **kw)
        g = torch.randn_like(out)
        leaves = [t for t in (x, z, w, b) if t is not None]
        got = torch.autograd.grad(out, leaves, g)
        l64 = [t.detach().double().requires_grad_() for t in leaves]
        zz = l64[1] if z is not None else None
        r = rmsnorm_gated_ref(l64[0], l64[-2], l64[-1], z=zz, **kw)
        want = torch.autograd.grad(r, l64, g.double())
        for a, e in zip(got, want):
            assert_close(a, e, dtype, factor=2.0 if dtype != torch.float32 else 10.0)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_mixed_param_dtype(device):
    """bf16 activations with float32 weight and bias (how mixed-precision training holds them)."""
    for mode in MODES:
        _grads_check(device, torch.bfloat16, mode, True, (6, 5), 256, 64, "contiguous", param_dtype=torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_many_rows(device):
    """More rows than one partial-sum chunk or row lane (dweight/dbias summed across them)."""
    _grads_check(device, torch.float32, "first", True, (300,), 64, 16, "contiguous")
    _grads_check(device, torch.bfloat16, "last", True, (2, 150), 128, None, "row_padded")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_of_sum_expanded_grad(device, dtype):
    """out.sum().backward() hands the backward an expanded gradient (all strides 0)."""
    x = torch.randn(3, 7, 256, device=device, dtype=dtype, requires_grad=True)
    z = torch.randn(3, 7, 256, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(256, device=device, dtype=dtype, requires_grad=True)
    nemokernels.rmsnorm_fn(x, w, z=z, group_size=64).sum().backward()
    x64, z64, w64 = [t.detach().double().requires_grad_() for t in (x, z, w)]
    rmsnorm_gated_ref(x64, w64, z=z64, group_size=64).sum().backward()
    for got, want in [(x.grad, x64.grad), (z.grad, z64.grad), (w.grad, w64.grad)]:
        assert_close(got, want, dtype, factor=2.0 if dtype != torch.float32 else 10.0)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(device):
    x = torch.randn(257, 512, device=device, requires_grad=True)
    z = torch.randn(257, 512, device=device, requires_grad=True)
    w = torch.randn(512, device=device, requires_grad=True)
    b = torch.randn(512, device=device, requires_grad=True)
    g = torch.randn(257, 512, device=device)
    runs = [torch.autograd.grad(nemokernels.rmsnorm_fn(x, w, b, z=z, group_size=64), (x, z, w, b), g)
            for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c), "gradients must be bitwise reproducible"


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_gradients_finite_in_a_stack(device):
    """Several gated norms in a row (with the gate recomputed from the output), bf16: the
    gradients of x and of every weight are finite and match the float64 stack. Every layer's
    output is rounded to bf16 on our side and the residual stream carries those roundings to
    dx: measured 1.3-1.5x the bf16 tolerance over 15 seeds, hence 4x (dweight: 0.6x, 2x)."""
    dim = 256
    norms = [nemokernels.RMSNormGated(dim, group_size=64, device=device, dtype=torch.bfloat16) for _ in range(6)]
    with torch.no_grad():
        for n in norms:
            n.weight.copy_(1.0 + 0.3 * torch.randn(dim, device=device))
    x = torch.randn(4, 33, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    h = x
    for n in norms:
        h = n(h, z=h * 0.5) + h
    h.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(n.weight.grad).all() for n in norms)
    x64 = x.detach().double().requires_grad_()
    w64 = [n.weight.detach().double().requires_grad_() for n in norms]
    h64 = x64
    for n, w in zip(norms, w64):
        h64 = rmsnorm_gated_ref(h64, w, None, z=h64 * 0.5, eps=n.eps, group_size=64) + h64
    h64.square().mean().backward()
    assert_close(x.grad, x64.grad, torch.bfloat16, factor=4, what="dx through 6 norms")
    for i, (n, w) in enumerate(zip(norms, w64)):
        assert_close(n.weight.grad, w.grad, torch.bfloat16, factor=2, what=f"dweight of norm {i}")


# ---------------------------------------------------------------- module


@pytest.mark.parametrize("device", DEVICES)
def test_module(device):
    m = nemokernels.RMSNormGated(128, eps=1e-5, group_size=32, device=device)
    assert m.norm_before_gate is False and m.bias is None and torch.equal(m.weight, torch.ones(128, device=device))
    assert list(m.state_dict()) == ["weight"]
    with torch.no_grad():
        m.weight.copy_(torch.randn(128, device=device))
    x, z = torch.randn(2, 3, 128, device=device), torch.randn(2, 3, 128, device=device)
    assert_close(m(x, z), ref64(x, m.weight, None, z, eps=1e-5, group_size=32), torch.float32)
    assert_close(m(x), ref64(x, m.weight, None, None, eps=1e-5, group_size=32), torch.float32)
    m2 = nemokernels.RMSNormGated(128, norm_before_gate=True, device=device)
    assert_close(m2(x, z), ref64(x, m2.weight, None, z, eps=1e-5, norm_before_gate=True), torch.float32)
    assert "group_size=32" in repr(m)


# ---------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    x = torch.randn(0, 3, 64, device=device, requires_grad=True)
    z = torch.randn(0, 3, 64, device=device, requires_grad=True)
    out = nemokernels.rmsnorm_fn(x, w, b, z=z, group_size=16)
    assert out.shape == (0, 3, 64)
    _, rstd = torch.ops.nemokernels.rmsnorm_gated_fwd(x, w, b, z, 1e-6, 16, False)
    assert rstd.shape == (0, 3, 4)
    gx, gz, gw, gb = torch.autograd.grad(out, (x, z, w, b), torch.randn_like(out))
    assert gx.shape == x.shape and gz.shape == z.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))
    # D = 0: nothing to normalise.
    e = nemokernels.rmsnorm_fn(torch.randn(3, 0, device=device), torch.randn(0, device=device))
    assert e.shape == (3, 0)


# ---------------------------------------------------------------- bad input


# One table per op, rows (id, where, call, message[, exc]) as in helpers.bad_input_params: the
# call changes one argument of a good call of the raw op (or of a public function). Every check
# here is a shape, dtype, device or scalar check: none reads tensor values, so none is CPU-only.

ops = torch.ops.nemokernels


def good_args(device):
    d = dict(device=device)
    x = torch.randn(2, 3, 64, **d)
    return SimpleNamespace(x=x, z=torch.randn(2, 3, 64, **d), w=torch.randn(64, **d), b=torch.randn(64, **d),
                           dout=torch.randn(2, 3, 64, **d), rstd=torch.rand(2, 3, 4, **d) + 0.5)


def fwd(t, **kw):
    a = dict(x=t.x, weight=t.w, bias=t.b, z=t.z, eps=1e-6, group_size=16, norm_before_gate=False)
    a.update(kw)
    return ops.rmsnorm_gated_fwd(*a.values())


def bwd(t, **kw):
    a = dict(dout=t.dout, x=t.x, weight=t.w, bias=t.b, z=t.z, rstd=t.rstd, group_size=16, norm_before_gate=False)
    a.update(kw)
    return ops.rmsnorm_gated_bwd(*a.values())


R_ = r"rmsnorm_fn: "
RB_ = r"rmsnorm_fn \(backward\): "
FLOATS = r"must be one of \{float32, float16, bfloat16\}, got "
DEVMIX = r" is on cpu but x is on cuda:\d+; all tensors must be on one device"

FWD_CASES = [
    ("x_scalar", "any", lambda t: fwd(t, x=t.x[0, 0, 0], z=None),
     R_ + r"x must have at least 1 dimension \(..., D\), got a 0-d tensor"),
    ("x_dtype", "any", lambda t: fwd(t, x=t.x.double(), z=None), R_ + "x " + FLOATS + "float64"),
    ("weight_rank", "any", lambda t: fwd(t, weight=t.w[:, None]),
     R_ + r"weight must have 1 dimensions, got shape \(64, 1\)"),
    ("weight_size", "any", lambda t: fwd(t, weight=t.w[:63]),
     R_ + r"weight must have shape \(64,\) = \(D,\) where D = x.shape\[-1\], got \(63,\)"),
    ("weight_dtype", "any", lambda t: fwd(t, weight=t.w.long()), R_ + "weight " + FLOATS + "int64"),
    ("bias_size", "any", lambda t: fwd(t, bias=t.b[:32]),
     R_ + r"bias must have shape \(64,\) = \(D,\) where D = x.shape\[-1\], got \(32,\)"),
    ("bias_dtype", "any", lambda t: fwd(t, bias=t.b.int()), R_ + "bias " + FLOATS + "int32"),
    ("z_shape", "any", lambda t: fwd(t, z=t.z[:, :2]), R_ + r"z must have x's shape \(2, 3, 64\), got \(2, 2, 64\)"),
    ("z_dtype", "any", lambda t: fwd(t, z=t.z.half()), R_ + "z must have x's dtype float32, got float16"),
    ("group_size_zero", "any", lambda t: fwd(t, group_size=0), R_ + "group_size must be positive, got 0"),
    ("group_size_negative", "any", lambda t: fwd(t, group_size=-16), R_ + "group_size must be positive, got -16"),
    ("group_size_divides", "any", lambda t: fwd(t, group_size=48),
     R_ + r"group_size \(48\) must divide D = x.shape\[-1\] \(64\)"),
    ("eps_negative", "any", lambda t: fwd(t, eps=-1.0), R_ + r"eps must be finite and >= 0, got -1\.0*"),
    ("eps_nan", "any", lambda t: fwd(t, eps=float("nan")), R_ + "eps must be finite and >= 0, got -?nan"),
    ("eps_inf", "any", lambda t: fwd(t, eps=float("inf")), R_ + "eps must be finite and >= 0, got inf"),
    ("weight_device", "cuda", lambda t: fwd(t, weight=t.w.cpu()), R_ + "weight" + DEVMIX),
    ("z_device", "cuda", lambda t: fwd(t, z=t.z.cpu()), R_ + "z" + DEVMIX),
]

BWD_CASES = [
    ("dout_shape", "any", lambda t: bwd(t, dout=t.dout[:1]),
     RB_ + r"dout must have x's shape \(2, 3, 64\), got \(1, 3, 64\)"),
    ("dout_dtype", "any", lambda t: bwd(t, dout=t.dout.bfloat16()),
     RB_ + "dout must have x's dtype float32, got bfloat16"),
    ("rstd_dtype", "any", lambda t: bwd(t, rstd=t.rstd.half()), RB_ + r"rstd must be one of \{float32\}, got float16"),
    ("rstd_groups", "any", lambda t: bwd(t, rstd=t.rstd[..., :0]),
     RB_ + r"rstd must have shape \(2, 3, 4\) = x.shape\[:-1\] \+ \(D / group_size,\), got \(2, 3, 0\)"),
    ("rstd_rank", "any", lambda t: bwd(t, rstd=t.rstd[0]),
     RB_ + r"rstd must have shape \(2, 3, 4\) = x.shape\[:-1\] \+ \(D / group_size,\), got \(3, 4\)"),
    ("z_shape", "any", lambda t: bwd(t, z=t.z[..., :32]),
     RB_ + r"z must have x's shape \(2, 3, 64\), got \(2, 3, 32\)"),
    ("weight_size", "any", lambda t: bwd(t, weight=t.w[:60]),
     RB_ + r"weight must have shape \(64,\) = \(D,\) where D = x.shape\[-1\], got \(60,\)"),
    ("bias_rank", "any", lambda t: bwd(t, bias=t.b[None]), RB_ + r"bias must have 1 dimensions, got shape \(1, 64\)"),
    ("group_size_divides", "any", lambda t: bwd(t, group_size=24),
     RB_ + r"group_size \(24\) must divide D = x.shape\[-1\] \(64\)"),
    ("x_dtype", "any", lambda t: bwd(t, x=t.x.long()), RB_ + "x " + FLOATS + "int64"),
    ("rstd_device", "cuda", lambda t: bwd(t, rstd=t.rstd.cpu()), RB_ + "rstd" + DEVMIX),
    ("dout_device", "cuda", lambda t: bwd(t, dout=t.dout.cpu()), RB_ + "dout" + DEVMIX),
]


PUBLIC_CASES = [  # the public function and the module reach the same checks
    ("fn_group_size", "any", lambda t: nemokernels.rmsnorm_fn(t.x, t.w, group_size=5),
     R_ + r"group_size \(5\) must divide D = x.shape\[-1\] \(64\)"),
    ("module_weight_size", "any", lambda t: nemokernels.RMSNormGated(32, device=t.x.device)(t.x),
     R_ + r"weight must have shape \(64,\) = \(D,\) where D = x.shape\[-1\]"),
]


test_bad_input = bad_input_test(
    fwd=(good_args, FWD_CASES), bwd=(good_args, BWD_CASES), public=(good_args, PUBLIC_CASES))


# ---------------------------------------------------------------- GPU agrees with CPU kernel


@pytest.mark.gpu
@pytest.mark.racecheck
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead,dim,gs", [
    ((37,), 1024, 128),     # one warp per unit, 8 units per block
    ((33,), 2048, 512),     # forward one warp of 4 vectors per unit, backward two warps of 2
    ((9,), 1536, None),     # forward 3 warps, backward 6 warps per unit
    ((5, 7), 4100, 1025),   # scalar accesses, 4 cached vectors per thread, 9 warps per unit
    ((9,), 4096, None),     # forward 8 warps of 4 vectors, backward 16 warps of 2 (512 threads)
    ((3,), 40000, None),    # uncached forward and backward (column kernel)
])
def test_cuda_matches_cpu_kernel(mode, lead, dim, gs):
    x, z, w, b = make_case(lead, dim, torch.float32, "cuda", mode, True, "contiguous")
    leaves = [t.requires_grad_() for t in (x, z, w, b) if t is not None]
    kw = dict(group_size=gs, norm_before_gate=mode == "last")
    g = torch.randn(*lead, dim, device="cuda")
    out = nemokernels.rmsnorm_fn(x, w, b, z=z, **kw)
    grads = torch.autograd.grad(out, leaves, g)
    cpu = [t.detach().cpu().requires_grad_() for t in leaves]
    zc = cpu[1] if z is not None else None
    outc = nemokernels.rmsnorm_fn(cpu[0], cpu[-2], cpu[-1], z=zc, **kw)
    gradsc = torch.autograd.grad(outc, cpu, g.cpu())
    assert rel_err(out, outc) < 1e-6
    for a, c in zip(grads, gradsc):
        assert rel_err(a, c) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nemotron_shapes_gpu(dtype, sanitizer):
    """Super (D = 8192, 8 groups) and Nano (D = 4096) shapes, z given, gate first."""
    rows = 64 if sanitizer else 2048
    for dim in (8192, 4096):
        x, z, w, _ = make_case((rows,), dim, dtype, "cuda", "first", False, "contiguous")
        for t in (x, z, w):
            t.requires_grad_()
        out = nemokernels.rmsnorm_fn(x, w, z=z, group_size=dim // 8)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, z, w), g)
        l64 = [t.detach().double().requires_grad_() for t in (x, z, w)]
        r = rmsnorm_gated_ref(l64[0], l64[2], z=l64[1], group_size=dim // 8)
        want = torch.autograd.grad(r, l64, g.double())
        assert_close(out, r, dtype)
        for a, e in zip(got, want):
            assert_close(a, e, dtype, factor=2.0 if dtype != torch.float32 else 10.0)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_inputs():
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    z = torch.randn_like(x)
    w = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        nemokernels.rmsnorm_fn(x, w, z=z, group_size=64)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = nemokernels.rmsnorm_fn(x, w, z=z, group_size=64)
    x.copy_(torch.randn_like(x))
    z.copy_(torch.randn_like(z))
    g.replay()
    assert torch.equal(y, nemokernels.rmsnorm_fn(x, w, z=z, group_size=64))


# ---------------------------------------------------------------- opcheck, compile


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ops = torch.ops.nemokernels
    x = torch.randn(2, 3, 48, device=device, requires_grad=True)
    z = torch.randn(2, 3, 48, device=device, requires_grad=True)
    w = torch.randn(48, device=device, requires_grad=True)
    b = torch.randn(48, device=device, requires_grad=True)
    opcheck(ops.rmsnorm_gated_fwd, (x, w, b, z, 1e-6, 16, False))
    opcheck(ops.rmsnorm_gated_fwd, (x, w, None, z, 1e-5, 48, True))
    opcheck(ops.rmsnorm_gated_fwd, (x.detach().bfloat16(), w.detach().bfloat16(), None, None, 1e-6, 8, False))
    rstd = ops.rmsnorm_gated_fwd(x, w, b, z, 1e-6, 16, False)[1].detach()
    dout = torch.randn(2, 3, 48, device=device)
    opcheck(ops.rmsnorm_gated_bwd, (dout, x.detach(), w.detach(), b.detach(), z.detach(), rstd, 16, False))
    opcheck(ops.rmsnorm_gated_bwd, (dout, x.detach(), w.detach(), None, None, rstd, 16, True))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    norm = nemokernels.RMSNormGated(64, group_size=16, device=device)
    x = torch.randn(3, 5, 64, device=device, requires_grad=True)
    z = torch.randn(3, 5, 64, device=device, requires_grad=True)

    def f(x, z):
        y = norm(x, z)
        return nemokernels.rmsnorm_fn(y, norm.weight, z=None, norm_before_gate=True).square().sum()

    eager = f(x, z)
    compiled = torch.compile(f, fullgraph=True, backend=backend)(x, z)
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-5)
    ge = torch.autograd.grad(eager, (x, z, norm.weight))
    gc = torch.autograd.grad(compiled, (x, z, norm.weight))
    for a, c in zip(ge, gc):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-5)
