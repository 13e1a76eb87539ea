"""Numerical helpers for tests: relative norm error against a float64 reference, tolerances
per dtype, output poisoning, and torch.library.opcheck.

Details: docs/testing.md, section `tests/helpers.py`."""
import importlib.util

import pytest
import torch

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has NaN/Inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def assert_close(out, ref, dtype, factor=1.0, what="output"):
    tol = TOL[dtype] * factor
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def assert_close_to_product(out, ref, abs_a, abs_b, tol, abs_c=None, atol=0.0, what="output"):
    """Elementwise |out - ref| <= tol * (abs_a @ abs_b + abs_c) + atol, in float64.

    For out ~ A @ B (+ C): abs_a (..., M, K) and abs_b (K, N) are |A| and |B| as the kernel
    scales them (dequantized, global scales applied), abs_c the magnitude of any added term (a
    bias, broadcast like it). The bound holds for any summation order (float accumulation of
    K terms errs by at most ~K*eps times the sum of the terms' magnitudes), so it stays
    meaningful where the reference cancels to zero and a relative norm would divide by ~0.
    atol covers the output dtype's subnormal spacing. Fails with the worst element: index,
    out, ref, error, bound, and error / bound."""
    scale = abs_a.detach().double().cpu() @ abs_b.detach().double().cpu()
    if abs_c is not None:
        scale = scale + abs_c.detach().double().cpu()
    assert_close_to_magnitude(out, ref, scale, tol, atol, what)


def assert_close_to_magnitude(out, ref, scale, tol, atol=0.0, what="output"):
    """Elementwise |out - ref| <= tol * scale + atol, in float64: `scale` is the magnitude the
    op's rounding errors are proportional to (for a product, |A| @ |B|; see
    assert_close_to_product), so the check stays meaningful where the reference is ~0."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"{what}: shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    if out64.numel() == 0:
        return
    bad = ~torch.isfinite(out64)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite outputs, first at {idx}: {out64[idx].item()}")
    scale = scale.detach().double().cpu().expand_as(out64)
    bound = tol * scale + atol
    err = (out64 - ref64).abs()
    ratio = torch.where(bound > 0, err / bound, torch.where(err > 0, float("inf"), 0.0))
    worst = int(ratio.argmax())
    if ratio.flatten()[worst] > 1:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), out64.shape))
        n_bad = int((ratio > 1).sum())
        raise AssertionError(
            f"{what}: |out - ref| exceeds tol * magnitude at {n_bad} of {out64.numel()} elements; worst at "
            f"{idx}: out {out64[idx].item():.9g}, ref {ref64[idx].item():.9g}, error {err[idx].item():.3e} > "
            f"bound {bound[idx].item():.3e} (tol {tol:.3e} x magnitude {scale[idx].item():.3e}"
            f"{f' + atol {atol:.1e}' if atol else ''}), ratio {ratio[idx].item():.3g}")


# Draft trees of decode tests, per batch entry: a branching tree with a second root, a chain,
# and nodes that continue from the previous token, from a sibling's subtree and from the state.
TREE_PARENTS = [[-1, 0, 0, 1, 2, -1, 3], [-1, 0, 1, 2, 3, 4, 5], [-1, -1, 1, 0, 3, 1, 5]]


def tree_path(parents, t):
    """The nodes of a draft tree from its root to node t (t last); parents[t] = -1 at a root."""
    path = [t]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def poison_allocator(device):
    """Fill freed allocator memory with NaN so a kernel that leaves output unwritten is caught."""
    sizes = (32 << 20,) if torch.device(device).type == "cuda" else (1 << 10, 1 << 14, 1 << 18, 1 << 22)
    for n in sizes:
        torch.full((n,), float("nan"), device=device)  # freed at once: the allocator keeps the NaNs


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def to64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def opcheck(op, args, kwargs=None):
    """torch.library.opcheck on every test utility (schema, fake, autograd registration, aot)."""
    torch.library.opcheck(op, args, kwargs or {})


# Checkpoint I/O needs safetensors (a dependency; absent on the bare GPU machine, where tests run
# without network installs).
needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="needs safetensors (checkpoint I/O)")


# ---------------------------------------------------------------- bad-input tables
#
# Each op family file keeps its refused calls in tables of rows (id, where, call, match[, exc]):
# `call(args)` makes one call with one argument wrong, where `args` are the table's valid arguments
# (built per device by the table's `make`); `match` is the regex of the expected message, which
# names the op, the argument, and what was expected and what came; `exc` (default RuntimeError,
# the C++ entry's checks) is ValueError or TypeError for a check of a Python wrapper; `where` is
# where the check runs: "any" (every device), "cpu" (a check that reads values on the host: on CUDA
# it would need a sync, and the CUDA behaviour has its own test) or "cuda" (a device mix, a CUDA-only
# limit). One `test_bad_input` per file runs them all on every device:
#
#   test_bad_input = bad_input_test(fwd=(good_args, FWD_CASES), bwd=mutation_table(...))


def bad_call(fn, match, *args, exc=RuntimeError, **kw):
    """Asserts that fn(*args, **kw) raises `exc` with a message matching the regex `match`."""
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def bad_input_params(**tables):
    """One pytest.param (make, where, call, match, exc) per row of every table, with the id
    "<table>-<row id>"; tables are name=(make, rows)."""
    params = []
    for name, (make, rows) in tables.items():
        for row in rows:
            case_id, where, call, match, *exc = row
            assert where in ("any", "cpu", "cuda"), f"{name}-{case_id}: where = {where!r}"
            params.append(pytest.param(make, where, call, match, exc[0] if exc else RuntimeError,
                                       id=f"{name}-{case_id}"))
    return params


def run_bad_input(device, make, where, call, match, exc=RuntimeError):
    """Runs one row of a bad-input table on `device` (skipped where the check does not run there);
    returns the arguments the call got (a test may check that a refused call wrote nothing)."""
    if where != "any" and where != torch.device(device).type:
        pytest.skip(f"a {where}-only check")
    args = make(device)
    bad_call(call, match, args, exc=exc)
    return args


def mutation_table(make, call, rows):
    """A table of mutations, rows (id, mutate, match, where[, exc]): `mutate(args)` changes one
    entry of the valid argument dict, then `call(args)` must raise. Returns (make, rows) for
    bad_input_params; its make checks that the unmutated call is valid first."""
    def make_valid(device):
        args = make(device)
        call(args)  # the unmutated call is valid
        return args

    def mutated(mutate):
        def run(args):
            mutate(args)
            return call(args)
        return run

    return make_valid, [(r[0], r[3], mutated(r[1]), r[2], *r[4:]) for r in rows]


def bad_input_test(after=None, **tables):
    """The `test_bad_input` of a test file: every row of its tables (name=(make, rows), as in
    bad_input_params) on every device. `after(args)`, when given, runs after each refused call
    (e.g. to check that the call wrote nothing)."""
    from conftest import DEVICES

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("make,where,call,match,exc", bad_input_params(**tables))
    def test_bad_input(device, make, where, call, match, exc):
        args = run_bad_input(device, make, where, call, match, exc)
        if after is not None:
            after(args)

    return test_bad_input


def nvcc_and_cutlass():
    """(nvcc, the CUTLASS source directory) as setup.py finds them, or a skip: the host checks of
    the CUTLASS and CuTe code (tests/*/_check.cu) need only those."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("nk_setup_for_host_checks", root / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    nvcc = setup.find_nvcc()
    try:
        cutlass = setup.cutlass_dir()
    except Exception:  # noqa: BLE001 - any failure to find it means: not installed here
        cutlass = None
    if nvcc is None or cutlass is None or not (Path(cutlass) / "include" / "cute").exists():
        pytest.skip("needs nvcc and the CUTLASS headers (requirements-build.txt)")
    return nvcc, cutlass


def run_host_check(source, tmp_path, *flags):
    """Compiles a host check program (tests/*/..._check.cu: CUTLASS/CuTe code run on the host)
    with nvcc against csrc/ and the CUTLASS headers, runs it, and asserts it printed "ok"."""
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    nvcc, cutlass = nvcc_and_cutlass()
    exe = tmp_path / Path(source).stem
    build = subprocess.run([str(nvcc), "-std=c++20", "--expt-relaxed-constexpr", *flags, "-I", str(root / "csrc"),
                            "-I", str(Path(cutlass) / "include"), "-I", str(Path(cutlass) / "tools" / "util" / "include"),
                            str(source), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
