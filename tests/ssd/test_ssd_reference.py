"""The two float64 SSD references (ssd/reference.py) pinned against each other and a hand loop.

ssd_scan_ref runs the recurrence one position at a time; ssd_chunked_ref runs the chunked
decomposition the kernels will use. No op is tested here: these are the oracles for it.
CPU only, small shapes, float64 unless stated.
"""
import math

import pytest
import torch

from nemokernels.ssd.reference import ssd_chunked_ref, ssd_scan_ref, varlen_from_cu_seqlens

from helpers import rel_err

F64 = torch.float64
LENGTHS = [1, 5, 64, 67, 130]
CHUNKS = [1, 3, 16, 64]
TOL = 1e-10
GRAD_TOL = 1e-9


def make_inputs(batch=2, seqlen=67, nheads=4, headdim=3, ngroups=2, dstate=5, dtype=F64, *,
                D=None, z=False, dt_bias=False, dt_softplus=False, initial_states=False):
    """Fresh random inputs (dict of kwargs for both references). D: None, "H" or "HP"."""
    kw = {}
    kw["x"] = torch.randn(batch, seqlen, nheads, headdim, dtype=dtype)
    if dt_softplus:
        kw["dt"] = torch.randn(batch, seqlen, nheads, dtype=dtype) - 1.0  # softplus -> ~0.1..1
    else:
        kw["dt"] = torch.rand(batch, seqlen, nheads, dtype=dtype) * 0.5 + 0.02
    kw["A"] = -torch.exp(torch.rand(nheads, dtype=dtype) * 2 - 1)  # -(0.37..2.7)
    kw["B"] = torch.randn(batch, seqlen, ngroups, dstate, dtype=dtype)
    kw["C"] = torch.randn(batch, seqlen, ngroups, dstate, dtype=dtype)
    if D == "H":
        kw["D"] = torch.randn(nheads, dtype=dtype)
    elif D == "HP":
        kw["D"] = torch.randn(nheads, headdim, dtype=dtype)
    if z:
        kw["z"] = torch.randn(batch, seqlen, nheads, headdim, dtype=dtype)
    if dt_bias:
        kw["dt_bias"] = torch.randn(nheads, dtype=dtype) * 0.3
    if initial_states:
        kw["initial_states"] = torch.randn(batch, nheads, headdim, dstate, dtype=dtype)
    kw["dt_softplus"] = dt_softplus
    return kw


def seq_idx_from_lengths(rows, first_ids=None):
    """seq_idx (len(rows), sum(lens)) int32 from per-row lists of sequence lengths."""
    out = []
    for r, lens in enumerate(rows):
        cu = torch.tensor([0] + list(lens)).cumsum(0)
        ids = varlen_from_cu_seqlens(cu, int(cu[-1]))
        out.append(ids + (0 if first_ids is None else first_ids[r]))
    return torch.cat(out, dim=0)


def check_chunked_equals_scan(kw, chunks=CHUNKS):
    y_ref, fin_ref = ssd_scan_ref(**kw, return_final_states=True)
    assert y_ref.dtype == kw["x"].dtype and fin_ref.dtype == F64
    for cs in chunks:
        y, fin = ssd_chunked_ref(**kw, chunk_size=cs, return_final_states=True)
        assert y.shape == y_ref.shape and fin.shape == fin_ref.shape
        assert rel_err(y, y_ref) < TOL, f"y chunk_size={cs}: {rel_err(y, y_ref):.2e}"
        assert rel_err(fin, fin_ref) < TOL, f"final states chunk_size={cs}: {rel_err(fin, fin_ref):.2e}"
    return y_ref, fin_ref


# ---------------------------------------------------------------- the math itself


def test_scan_matches_hand_loop():
    """ssd_scan_ref against scalar loops written straight from DESIGN 4.1 (with the
    mamba_ssm seq_idx / initial_states convention: previous id 0 before position 0)."""
    b, L, H, P, G, N = 2, 6, 4, 2, 2, 3
    kw = make_inputs(b, L, H, P, G, N, D="HP", z=True, dt_bias=True, dt_softplus=True, initial_states=True)
    kw["dt_limit"] = (0.05, 0.9)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2], [1, 1, 1, 2, 3, 3]], dtype=torch.int32)
    y = ssd_scan_ref(**kw, seq_idx=seq_idx)
    x, dt, A, Bm, Cm, D, z, db, h0 = (kw[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"))
    expect = torch.zeros_like(x)
    for bi in range(b):
        for h in range(H):
            g = h // (H // G)
            state = [[float(h0[bi, h, p, n]) for n in range(N)] for p in range(P)]
            prev = 0
            for t in range(L):
                if int(seq_idx[bi, t]) != prev:
                    state = [[0.0] * N for _ in range(P)]
                prev = int(seq_idx[bi, t])
                d = float(dt[bi, t, h]) + float(db[h])
                d = math.log1p(math.exp(d)) if d <= 20 else d
                d = min(max(d, 0.05), 0.9)
                a = math.exp(d * float(A[h]))
                for p in range(P):
                    acc = 0.0
                    for n in range(N):
                        state[p][n] = a * state[p][n] + d * float(x[bi, t, h, p]) * float(Bm[bi, t, g, n])
                        acc += float(Cm[bi, t, g, n]) * state[p][n]
                    out = acc + float(D[h, p]) * float(x[bi, t, h, p])
                    zz = float(z[bi, t, h, p])
                    expect[bi, t, h, p] = out * zz / (1 + math.exp(-zz))
    assert rel_err(y, expect) < 1e-12


def test_default_dt_limit_clamps_negative_dt():
    """dt_limit=(0, inf) always applies (as in mamba_ssm): a negative dt acts as dt' = 0."""
    kw = make_inputs(1, 9, 4, 3, 1, 4, D="H")
    kw["dt"] = -kw["dt"]
    for y in (ssd_scan_ref(**kw), ssd_chunked_ref(**kw, chunk_size=4)):
        assert rel_err(y, kw["D"][:, None] * kw["x"]) < 1e-15


# ---------------------------------------------------------------- chunked == sequential


@pytest.mark.parametrize("seqlen", LENGTHS)
def test_chunked_matches_scan_plain(seqlen):
    check_chunked_equals_scan(make_inputs(seqlen=seqlen))


@pytest.mark.parametrize("seqlen", LENGTHS)
def test_chunked_matches_scan_all_options(seqlen):
    kw = make_inputs(seqlen=seqlen, D="HP", z=True, dt_bias=True, dt_softplus=True, initial_states=True)
    kw["dt_limit"] = (0.01, 0.8)
    check_chunked_equals_scan(kw)


OPTIONS = {
    "D_head": dict(D="H"),
    "D_headdim": dict(D="HP"),
    "z": dict(z=True),
    "dt_bias": dict(dt_bias=True),
    "dt_softplus": dict(dt_softplus=True),
    "dt_limit": dict(dt_softplus=True, dt_limit=(0.2, 0.6)),  # clamps both ends often
    "initial_states": dict(initial_states=True),
}


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_chunked_matches_scan_option(option, ngroups):
    opts = dict(OPTIONS[option])
    dt_limit = opts.pop("dt_limit", None)
    for seqlen in (67,):  # not a multiple of 3, 16, 64; other lengths: the tests above
        kw = make_inputs(seqlen=seqlen, ngroups=ngroups, **opts)
        if dt_limit is not None:
            kw["dt_limit"] = dt_limit
        y, _ = check_chunked_equals_scan(kw)
        if option == "initial_states":  # the states-in really enter the output
            y0 = ssd_scan_ref(**{**kw, "initial_states": None})
            assert rel_err(y0, y) > 1e-3


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("initial_states", [False, True])
def test_chunked_matches_scan_seq_idx(ngroups, initial_states):
    """Several sequences per row, including length-1 ones and ones crossing chunk ends;
    row 1's ids start at 3, so its initial state is dropped (mamba_ssm convention)."""
    rows = [[1, 5, 1, 20, 3, 1, 36], [30, 1, 1, 35]]
    seq_idx = seq_idx_from_lengths(rows, first_ids=[0, 3])
    kw = make_inputs(seqlen=67, ngroups=ngroups, D="H", z=True, dt_bias=True, dt_softplus=True,
                     initial_states=initial_states)
    kw["seq_idx"] = seq_idx
    check_chunked_equals_scan(kw)
    # A reset really happens: the output after the first boundary ignores what came before it.
    kw2 = dict(kw, x=kw["x"].clone())
    kw2["x"][:, 0] += 1.0
    y1, y2 = ssd_chunked_ref(**kw, chunk_size=16), ssd_chunked_ref(**kw2, chunk_size=16)
    assert torch.equal(y1[0, 1:], y2[0, 1:]) and not torch.equal(y1[0, :1], y2[0, :1])
    assert torch.equal(y1[1, 30:], y2[1, 30:])


@pytest.mark.parametrize("ref", ["scan", "chunked"])
def test_initial_states_apply_only_to_sequence_id_0(ref):
    """initial_states continue the sequence with id 0 ending before position 0: used when a row
    starts with id 0, dropped when it starts with any other id, invisible to later sequences."""
    run = ssd_scan_ref if ref == "scan" else (lambda **kw: ssd_chunked_ref(**kw, chunk_size=4))
    kw = make_inputs(2, 11, 4, 3, 2, 5, initial_states=True)
    init = kw.pop("initial_states")
    for first in (0, 2):
        seq_idx = seq_idx_from_lengths([[3, 8], [6, 5]], first_ids=[first, first])
        y_with = run(**kw, seq_idx=seq_idx, initial_states=init)
        y_without = run(**kw, seq_idx=seq_idx)
        if first == 0:
            assert rel_err(y_with[0, :3], y_without[0, :3]) > 1e-3
        else:
            assert torch.equal(y_with, y_without)
        assert torch.equal(y_with[0, 3:], y_without[0, 3:]) and torch.equal(y_with[1, 6:], y_without[1, 6:])


# ---------------------------------------------------------------- varlen and state passing


@pytest.mark.parametrize("ref", ["scan", "chunked"])
@pytest.mark.parametrize("initial_states", [False, True])
def test_varlen_equals_separate_sequences(ref, initial_states):
    """Packed sequences (batch 1, seq_idx from cu_seqlens) give each sequence's own output and
    final state; initial_states belong to the first sequence. Chunk 3: the first sequence (5)
    spans chunks; chunk 16: it ends inside chunk 0 (where mamba_ssm's varlen states would
    leave initial_states out)."""
    lens = [5, 1, 0, 16, 3, 1, 40, 1]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    L = int(cu[-1])
    kw = make_inputs(1, L, 4, 3, 2, 5, D="HP", z=True, dt_bias=True, dt_softplus=True,
                     initial_states=initial_states)
    seq_idx = varlen_from_cu_seqlens(cu, L)
    chunks = [None] if ref == "scan" else [3, 16]
    for cs in chunks:
        extra = {} if cs is None else {"chunk_size": cs}
        run = ssd_scan_ref if cs is None else ssd_chunked_ref
        y, fin, varlen = run(**kw, **extra, seq_idx=seq_idx, cu_seqlens=cu,
                             return_final_states=True, return_varlen_states=True)
        assert varlen.shape == (len(lens), 4, 3, 5)
        for i, n in enumerate(lens):
            s, e = int(cu[i]), int(cu[i + 1])
            if n == 0:
                assert torch.equal(varlen[i], torch.zeros_like(varlen[i]))
                continue
            part = {k: (v[:, s:e] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
            if i > 0:
                part["initial_states"] = None
            y_i, fin_i = ssd_scan_ref(**part, return_final_states=True)
            assert rel_err(y[:, s:e], y_i) < TOL, f"y of sequence {i} (chunk {cs})"
            assert rel_err(varlen[i], fin_i[0]) < TOL, f"varlen state {i} (chunk {cs})"
        assert rel_err(fin[0], varlen[-1]) < TOL


def test_varlen_states_chunked_equals_scan():
    lens = [1, 1, 17, 2, 64, 1, 13]
    cu = torch.tensor([0] + lens).cumsum(0)
    L = int(cu[-1])
    kw = make_inputs(1, L, initial_states=True, dt_bias=True, dt_softplus=True)
    kw.update(seq_idx=varlen_from_cu_seqlens(cu, L), cu_seqlens=cu, return_varlen_states=True)
    _, ref = ssd_scan_ref(**kw)
    for cs in CHUNKS:
        _, st = ssd_chunked_ref(**kw, chunk_size=cs)
        assert rel_err(st, ref) < TOL, f"chunk {cs}"


@pytest.mark.parametrize("ref", ["scan", "chunked"])
@pytest.mark.parametrize("split", [30, 32])
def test_states_out_then_in_equals_whole(ref, split):
    """The final state of the first part, fed as initial_states of the second part, gives the
    output and final state of the whole. With seq_idx, the second part's ids are renumbered so
    that the sequence running across the split has id 0 (mamba_ssm convention); in row 1 a new
    sequence starts exactly at split 32, so its id stays nonzero and it starts from zero."""
    run = ssd_scan_ref if ref == "scan" else (lambda **kw: ssd_chunked_ref(**kw, chunk_size=16))
    for with_seq_idx in (False, True):
        kw = make_inputs(seqlen=67, D="H", z=True, dt_bias=True, dt_softplus=True, initial_states=True)
        if with_seq_idx:
            kw["seq_idx"] = seq_idx_from_lengths([[10, 40, 17], [31, 1, 35]])
        y, fin = run(**kw, return_final_states=True)
        first = {k: (v[:, :split] if k in ("x", "dt", "B", "C", "z", "seq_idx") else v) for k, v in kw.items()}
        second = {k: (v[:, split:] if k in ("x", "dt", "B", "C", "z", "seq_idx") else v) for k, v in kw.items()}
        if with_seq_idx:
            second["seq_idx"] = second["seq_idx"] - first["seq_idx"][:, -1:]
        y1, mid = run(**first, return_final_states=True)
        second["initial_states"] = mid
        y2, fin2 = run(**second, return_final_states=True)
        assert rel_err(torch.cat([y1, y2], dim=1), y) < TOL
        assert rel_err(fin2, fin) < TOL


# ---------------------------------------------------------------- gradients


GRAD_NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]


@pytest.mark.parametrize("D", ["H", "HP"])
@pytest.mark.parametrize("with_seq_idx", [False, True])
def test_gradients_chunked_match_scan(D, with_seq_idx):
    kw = make_inputs(2, 13, 4, 3, 2, 4, D=D, z=True, dt_bias=True, dt_softplus=True, initial_states=True)
    kw["dt_limit"] = (0.0, 0.7) if D == "H" else (0.0, float("inf"))
    if with_seq_idx:
        kw["seq_idx"] = seq_idx_from_lengths([[4, 1, 8], [13]])
    gy = torch.randn_like(kw["x"])
    gf = torch.randn_like(kw["initial_states"])
    grads = {}
    for name, run in (("scan", ssd_scan_ref), ("chunk4", lambda **a: ssd_chunked_ref(**a, chunk_size=4)),
                      ("chunk5", lambda **a: ssd_chunked_ref(**a, chunk_size=5))):
        leaves = {k: kw[k].detach().clone().requires_grad_(True) for k in GRAD_NAMES}
        y, fin = run(**{**kw, **leaves}, return_final_states=True)
        ((y * gy).sum() + (fin * gf).sum()).backward()
        grads[name] = {k: leaves[k].grad for k in GRAD_NAMES}
    for name in ("chunk4", "chunk5"):
        for k in GRAD_NAMES:
            g, g_ref = grads[name][k], grads["scan"][k]
            assert g is not None and g_ref.abs().sum() > 0, k
            assert rel_err(g, g_ref) < GRAD_TOL, f"d{k} ({name}): {rel_err(g, g_ref):.2e}"


# ---------------------------------------------------------------- float32, realistic ranges


def test_float32_realistic_ranges_finite():
    """Mamba-2-like parameters: A = -exp(U(log 1, log 16)), dt = softplus(N(-2, 1)), L = 512."""
    b, L, H, P, G, N = 1, 512, 4, 8, 2, 16
    kw = dict(x=torch.randn(b, L, H, P), dt=torch.randn(b, L, H) - 2.0,
              A=-torch.exp(torch.rand(H) * math.log(16)), B=torch.randn(b, L, G, N),
              C=torch.randn(b, L, G, N), D=torch.randn(H), z=torch.randn(b, L, H, P),
              dt_softplus=True, return_final_states=True)
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    y64, fin64 = ssd_scan_ref(**kw64)
    # The chunked form decays by exp(dA_cumsum_i - dA_cumsum_j): a difference of float32 sums
    # of up to Q terms whose magnitude reaches hundreds for Q = 256, so it loses about
    # |dA_cumsum| * 2^-24 (measured up to 2e-5 on the final states; the recurrence ~1e-7).
    for tol, (y, fin) in ((1e-6, ssd_scan_ref(**kw)), (1e-4, ssd_chunked_ref(**kw, chunk_size=64)),
                          (1e-4, ssd_chunked_ref(**kw, chunk_size=256))):
        assert y.dtype == torch.float32 and fin.dtype == torch.float32
        assert torch.isfinite(y).all() and torch.isfinite(fin).all()
        assert rel_err(y, y64) < tol and rel_err(fin, fin64) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    """Low-precision inputs: the math runs in float32 (states float32), y comes back in dtype."""
    kw = make_inputs(1, 33, dtype=dtype, D="H", z=True, dt_bias=True, dt_softplus=True, initial_states=True)
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    y64, fin64 = ssd_scan_ref(**kw64, return_final_states=True)
    for y, fin in (ssd_scan_ref(**kw, return_final_states=True),
                   ssd_chunked_ref(**kw, chunk_size=16, return_final_states=True)):
        assert y.dtype == dtype and fin.dtype == torch.float32
        assert rel_err(fin, fin64) < 1e-5 and rel_err(y, y64) < 1e-2


# ---------------------------------------------------------------- helpers and bad input


def test_varlen_from_cu_seqlens():
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    seq_idx = varlen_from_cu_seqlens(cu, 6)
    assert seq_idx.dtype == torch.int32 and seq_idx.tolist() == [[0, 0, 2, 2, 2, 3]]
    with pytest.raises(ValueError):
        varlen_from_cu_seqlens(cu, 7)
    with pytest.raises(ValueError):
        varlen_from_cu_seqlens(torch.tensor([0, 3, 2, 6]), 6)


BAD_INPUT = {
    "heads % groups": dict(B=torch.randn(1, 7, 3, 5, dtype=F64), C=torch.randn(1, 7, 3, 5, dtype=F64)),
    "dt shape": dict(dt=torch.rand(1, 7, 3, dtype=F64)),
    "D shape": dict(D=torch.randn(3, dtype=F64)),
    "decreasing seq_idx": dict(seq_idx=torch.tensor([[0, 0, 1, 1, 0, 2, 2]])),
    "negative seq_idx": dict(seq_idx=torch.tensor([[-1, 0, 0, 0, 0, 0, 0]])),
    "varlen without seq_idx": dict(cu_seqlens=torch.tensor([0, 3, 7]), return_varlen_states=True),
    "seq_idx not matching cu_seqlens": dict(cu_seqlens=torch.tensor([0, 3, 7]), return_varlen_states=True,
                                            seq_idx=torch.tensor([[0, 0, 1, 1, 1, 1, 1]])),
}


@pytest.mark.parametrize("ref", ["scan", "chunked"])
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_raises(ref, case):
    run = ssd_scan_ref if ref == "scan" else (lambda **kw: ssd_chunked_ref(**kw, chunk_size=4))
    kw = make_inputs(1, 7, 4, 3, 2, 5)
    with pytest.raises(ValueError):
        run(**{**kw, **BAD_INPUT[case]})


@pytest.mark.parametrize("ref", ["scan", "chunked"])
def test_varlen_needs_batch_1(ref):
    run = ssd_scan_ref if ref == "scan" else (lambda **kw: ssd_chunked_ref(**kw, chunk_size=4))
    with pytest.raises(ValueError, match="batch 1"):
        run(**make_inputs(2, 7), seq_idx=torch.zeros(2, 7, dtype=torch.int32), cu_seqlens=torch.tensor([0, 7]),
            return_varlen_states=True)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError):
        ssd_chunked_ref(**make_inputs(1, 7), chunk_size=0)
