"""The speculative-verification CUDA kernels (csrc/speculative/verify_cuda.cu) run on the CPU through
the emulator in tools/cuda_emu (see tests/cuda_emu.py and tools/cuda_emu/README.md):
the .cu file is rewritten by transform.py, compiled with g++ against the mock CUDA headers and
driven through tools/cuda_emu/driver_speculative.cpp with the same parameter structs the op entries
(csrc/speculative/verify.cpp) fill, with the vocab split the CUDA path would use (several chunks per
row). Every output and partial buffer is poisoned first. The emitted tokens must equal those of
the CPU kernels through the public API (nemokernels.speculative.*: both make the same decisions for a
seed, bit for bit); the sampling transform's probabilities are compared with the CPU kernel's
(float32 tolerance; the kept sets must be identical).
"""
import ctypes
import functools

import pytest
import torch

import cuda_emu as base  # build helpers: compiler id, flags, transform, params

DT_ENUM = base.DT_ENUM
POISON_I = -777


class SpecEmu(base.EmuLibrary):
    def split(self, rows, vocab):
        """(nsplit, chunk) as the op entry computes them for a CUDA tensor."""
        nsplit = self.value("emu_spec_cuda_num_splits", ctypes.c_longlong(rows), ctypes.c_longlong(vocab))
        chunk = self.value("emu_spec_chunk_len", ctypes.c_longlong(vocab), ctypes.c_longlong(nsplit))
        return (vocab + chunk - 1) // chunk, chunk


@functools.cache
def emu():
    """The emulated verification library (cached by content hash, see base.build_emulated)."""
    return SpecEmu.build("spec", base.EMU / "driver_speculative.cpp", [base.CSRC / "speculative" / "verify_cuda.cu"],
                         ("speculative",), header=base.CSRC / "speculative" / "verify.h",
                         structs=("SpecArgmaxParams", "SpecGreedyParams", "SpecTreeGreedyParams", "SpecRejectionParams",
                                  "SpecTreeRejectionParams", "SpecSamplingParams"))


def spec_api():
    try:
        import nemokernels.speculative as speculative
        speculative.verify_greedy  # noqa: B018
    except Exception as e:  # pragma: no cover
        pytest.skip(f"nemokernels extension not importable: {e}")
    return speculative.verify


def ptr(t):
    return None if t is None else t.data_ptr()


def ipoison(*shape):
    return torch.full(shape, POISON_I, dtype=torch.int64)


def nan(*shape):
    return torch.full(shape, float("nan"), dtype=torch.float32)


def probs(shape, gen, sharp=3.0):
    return torch.softmax(sharp * torch.randn(*shape, generator=gen), dim=-1)


def sliced(t):
    """Same values, last dim unit stride but rows misaligned (the kernels' scalar paths)."""
    w = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)
    w[..., 1:] = t
    return w[..., 1:]


def set_argmax(e, a, logits, num_draft, keep):
    B, npos, V = logits.shape
    a.batch, a.npos, a.vocab = B, npos, V
    a.dtype = DT_ENUM[logits.dtype]
    a.logits = logits.data_ptr()
    a.l_sb, a.l_st = logits.stride(0), logits.stride(1)
    a.num_draft = ptr(num_draft)
    a.nsplit, a.chunk = e.split(B * npos, V)
    pv, pi, ra = nan(B * npos, a.nsplit), ipoison(B * npos, a.nsplit), ipoison(B * npos)
    keep += [pv, pi, ra]
    a.part_val, a.part_idx, a.row_arg = pv.data_ptr(), pi.data_ptr(), ra.data_ptr()
    return a.nsplit


def run_rejection(e, draft, q, pt, nd, seed_tensor, seed, split):
    """The emulated rejection_sample with the vocab split `split` = (nsplit, chunk): (out, acc)."""
    B, k = draft.shape
    V = pt.shape[-1]
    p = e.S["SpecRejectionParams"]()
    p.batch, p.k, p.vocab = B, k, V
    p.draft, p.d_sb, p.d_st = draft.data_ptr(), draft.stride(0), draft.stride(1)
    if q is not None:
        p.q, p.q_sb, p.q_st = q.data_ptr(), q.stride(0), q.stride(1)
    p.p, p.p_sb, p.p_st = pt.data_ptr(), pt.stride(0), pt.stride(1)
    p.num_draft = ptr(nd)
    p.seed_ptr, p.seed = ptr(seed_tensor), seed
    p.nsplit, p.chunk = split
    keys, idxs = nan(2, B, p.nsplit), ipoison(2, B, p.nsplit)
    p.part_key, p.part_key2 = keys.data_ptr(), keys[1].data_ptr()
    p.part_idx, p.part_idx2 = idxs.data_ptr(), idxs[1].data_ptr()
    out, acc = ipoison(B, k + 1), ipoison(B)
    p.out, p.num_accepted = out.data_ptr(), acc.data_ptr()
    e.call("emu_spec_rejection_sample_cuda", p)
    return out, acc


# ---- tests ------------------------------------------------------------------------------------

def test_layouts_agree():
    emu().check_layouts()


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "contig"), (torch.float16, "sliced"),
                                          (torch.bfloat16, "contig")])
def test_verify_greedy(dtype, layout):
    speculative, e = spec_api(), emu()
    g = torch.Generator().manual_seed(1)
    B, k, V = 4, 3, 5000
    logits = torch.randn(B, k + 1, V, generator=g).to(dtype)
    logits[1, 0, 4000] = logits[1, 0, 17] = logits[1, 0].float().max() + 1  # tie across chunks: lowest wins
    _, chunk = e.split(B * (k + 1), V)
    for (b, j), i in {(0, 0): chunk - 1, (1, 1): chunk, (2, 2): V - 1, (3, 0): 2 * chunk - 1}.items():
        logits[b, j, i] = logits[b, j].float().max() + 2  # winners at the chunk edges
    am = logits.float().argmax(-1)
    draft = am[:, :k].clone()
    draft[0, 1] = (draft[0, 1] + 1) % V  # reject at 1
    draft[2, 0] = (draft[2, 0] + 3) % V  # reject at 0; row 1 and 3 accept all (row 3 limited below)
    nd = torch.tensor([3, 3, 2, 1])
    if layout == "sliced":
        logits = sliced(logits)
    for num_draft in (None, nd):
        keep = []
        p = e.S["SpecGreedyParams"]()
        nsplit = set_argmax(e, p.am, logits, num_draft, keep)
        assert nsplit > 1
        out, acc = ipoison(B, k + 1), ipoison(B)
        p.k, p.draft, p.d_sb, p.d_st = k, draft.data_ptr(), draft.stride(0), draft.stride(1)
        p.out, p.num_accepted = out.data_ptr(), acc.data_ptr()
        e.call("emu_spec_verify_greedy_cuda", p)
        ro, ra = speculative.verify_greedy(draft, logits, num_draft)
        assert torch.equal(out, ro) and torch.equal(acc, ra), (out, ro, acc, ra)
    assert out[1, 0].item() == 17 and acc.tolist() == [1, 3, 0, 1]


@pytest.mark.parametrize("greedy_draft,seed_tensor", [(False, False), (True, True)])
def test_rejection_sample(greedy_draft, seed_tensor):
    speculative, e = spec_api(), emu()
    g = torch.Generator().manual_seed(2)
    B, k, V = 8, 3, 3000
    pt = probs((B, k + 1, V), g)
    q = None if greedy_draft else 0.5 * pt[:, :k] + 0.5 * probs((B, k, V), g)
    if q is not None:
        q = q / q.sum(-1, keepdim=True)
        q[3] = pt[3, :k]  # q == p: all accepted (bonus token)
        q[4, 1] = 0.0
        q[4, 1, 5] = 1.0
        pt[4, 1, 5] = 0.0  # p(x) = 0: rejected; residual = p
        q = sliced(q)  # misaligned q: scalar path of the partials
    _, chunk = e.split(B, V)
    pt[3, k] = 0.0
    pt[3, k, chunk - 1] = 1.0  # bonus tokens at the chunk edges (races over one-hot targets)
    for b, i in ((5, V - 1), (6, chunk + 5), (7, 6)):  # requests without drafts: bonus from p_0
        pt[b, 0] = 0.0
        pt[b, 0, i] = 1.0
    pt[2, 0, :] = 0.0
    pt[2, 0, chunk] = 1.0  # position 0 of request 2: accepted only if drafted, else residual -> chunk
    draft = torch.multinomial(pt[:, :k].reshape(-1, V), 1, generator=g).view(B, k)
    if q is not None:
        draft[4, 1] = 5
    nd = torch.tensor([3, 2, 3, 3, 3, 0, 0, 0])
    for seed in (7, 123456789, 5):
        st = torch.tensor([seed * 31 + 5]) if seed_tensor else None  # the seed read from a tensor
        split = e.split(B, V)
        assert split[0] > 1
        out, acc = run_rejection(e, draft, q, pt, nd, st, 0 if seed_tensor else seed, split)
        if st is None:
            ro, ra = speculative.rejection_sample(draft, q, pt, num_draft_tokens=nd, seed=seed)
        else:  # the op as the public API calls it with a generator
            ro, ra = torch.ops.nemokernels.rejection_sample(draft, q, pt, nd, st, 0)
        assert torch.equal(out, ro) and torch.equal(acc, ra), (out, ro, acc, ra)
        assert (out[torch.arange(k + 1)[None] <= acc[:, None]] >= 0).all()
        assert out[5:, 0].tolist() == [V - 1, chunk + 5, 6] and (acc[3].item() < k or out[3, k].item() == chunk - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_greedy_long_chunks(dtype):
    """Two chunks of 10000 (several tiles per thread): the screen (max and sum of a tile) decides
    which tiles get the exact scan. Winners in later tiles, NaN after a finite maximum, ties
    across one thread's tiles, +-0, +-inf (an inf - inf sum) and all -inf must still give
    torch.argmax's index (NaN largest, ties to the lowest index)."""
    speculative, e = spec_api(), emu()
    g = torch.Generator().manual_seed(11)
    B, k, V = 3, 2, 20000
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    logits = torch.randn(B, k + 1, V, generator=g).to(dtype)
    rows = logits.view(-1, V)
    rows[1, 9000] = rows[1, 12000] = float("nan")  # tile 1 of its thread, then chunk 1
    rows[2, 5 * vec] = rows[2, (5 + 1024) * vec] = 10.0  # one thread, tiles 0 and 1: tie
    rows[3] = 0.0
    rows[3, 0] = -0.0
    rows[4, 7000] = rows[4, 13000] = float("inf")
    rows[4, 100] = float("-inf")
    rows[5] = float("-inf")
    rows[6, V - 1] = 20.0
    rows[7, 7 * vec] = 30.0  # thread 7: best of tile 0 ...
    rows[7, (7 + 1024) * vec + 3] = 30.25  # ... beaten by a little in its tile 1
    am = logits.float().argmax(-1)
    assert am.view(-1)[:8].tolist() == [am.view(-1)[0].item(), 9000, 5 * vec, 0, 7000, 0, V - 1, 1031 * vec + 3]
    draft = am[:, :k].clone()  # all accepted: the walk reads every row's argmax
    keep = []
    p = e.S["SpecGreedyParams"]()
    set_argmax(e, p.am, logits, None, keep)
    p.am.chunk = 10000
    p.am.nsplit = 2
    pv, pi, ra = nan(B * (k + 1), 2), ipoison(B * (k + 1), 2), ipoison(B * (k + 1))
    p.am.part_val, p.am.part_idx, p.am.row_arg = pv.data_ptr(), pi.data_ptr(), ra.data_ptr()
    out, acc = ipoison(B, k + 1), ipoison(B)
    p.k, p.draft, p.d_sb, p.d_st = k, draft.data_ptr(), draft.stride(0), draft.stride(1)
    p.out, p.num_accepted = out.data_ptr(), acc.data_ptr()
    e.call("emu_spec_verify_greedy_cuda", p)
    assert torch.equal(ra, am.view(-1)), (ra, am)
    ro, rac = speculative.verify_greedy(draft, logits)
    assert torch.equal(out, ro) and torch.equal(acc, rac) and acc.tolist() == [k] * B


@pytest.mark.parametrize("greedy_draft", [False, True])
def test_rejection_sample_long_chunks(greedy_draft):
    """Two chunks of 10000 (several float4 steps per thread): the screened races skip det_log
    for most entries; the tokens must still be the CPU kernel's for every seed."""
    speculative, e = spec_api(), emu()
    g = torch.Generator().manual_seed(12)
    B, k, V = 4, 3, 20000
    pt = probs((B, k + 1, V), g, sharp=1.0)
    q = None if greedy_draft else probs((B, k, V), g, sharp=1.0)
    draft = torch.multinomial(pt[:, :k].reshape(-1, V), 1, generator=g).view(B, k)
    for seed in range(6):
        out, acc = run_rejection(e, draft, q, pt, None, None, seed, (2, 10000))
        ro, ra = speculative.rejection_sample(draft, q, pt, seed=seed)
        assert torch.equal(out, ro) and torch.equal(acc, ra), (seed, out, ro, acc, ra)


def _tree(B, n, g):
    parents = torch.full((B, n), -1, dtype=torch.int64)
    for b in range(B):
        for i in range(1, n):
            parents[b, i] = torch.randint(0, i, (1,), generator=g).item() if b % 2 else (i - 1 if i < 4 else i - 3)
    return parents


def test_verify_tree_greedy():
    speculative, e = spec_api(), emu()
    g = torch.Generator().manual_seed(3)
    B, n, V = 3, 7, 4100
    logits = torch.randn(B, n, V, generator=g).to(torch.bfloat16)
    parents = _tree(B, n, g)
    am = logits.float().argmax(-1)
    cand = torch.randint(0, V, (B, n), generator=g)
    for b in range(B):  # make some children match their parent's argmax
        for i in range(1, n):
            if (i + b) % 3 != 0:
                cand[b, i] = am[b, parents[b, i]]
    for max_depth in (n - 1, 2):
        keep = []
        p = e.S["SpecTreeGreedyParams"]()
        assert set_argmax(e, p.am, logits, None, keep) > 1
        p.n_nodes, p.max_depth = n, max_depth
        p.cand, p.c_sb, p.c_sn = cand.data_ptr(), cand.stride(0), cand.stride(1)
        p.parents, p.par_sb, p.par_sn = parents.data_ptr(), parents.stride(0), parents.stride(1)
        out, nodes, acc = ipoison(B, max_depth + 1), ipoison(B, max_depth + 1), ipoison(B)
        p.out, p.nodes, p.num_accepted = out.data_ptr(), nodes.data_ptr(), acc.data_ptr()
        e.call("emu_spec_verify_tree_greedy_cuda", p)
        ro, rn, ra = speculative.verify_tree_greedy(cand, parents, logits, max_depth=max_depth)
        assert torch.equal(out, ro) and torch.equal(nodes, rn) and torch.equal(acc, ra), (out, ro, nodes, rn)
        assert acc.max().item() >= 1


def test_verify_tree_rejection():
    speculative, e = spec_api(), emu()
    g = torch.Generator().manual_seed(4)
    B, n, V = 4, 6, 700
    pt = probs((B, n, V), g, sharp=2.0)
    parents = _tree(B, n, g)
    parents[2:] = torch.tensor([-1, 0, 0, 0, 1, 2])  # wide root: several rejections, residual chains
    mix = torch.tensor([0.6, 0.6, 0.15, 0.3])  # weight of the target in the draft: low -> rejections
    q = torch.empty(B, n, V)
    cand = torch.zeros(B, n, dtype=torch.int64)
    for b in range(B):
        for i in range(1, n):
            par = parents[b, i]
            q[b, i] = mix[b] * pt[b, par] + (1 - mix[b]) * probs((V,), g, sharp=3.0)
            cand[b, i] = torch.multinomial(q[b, i], 1, generator=g).item()
    q[:, 0] = 1.0 / V
    q[1, 1:] = pt[1, parents[1, 1:]]  # q == p: accepted deep
    total = 0
    for seed in range(40):  # cheap (4 blocks a launch): many seeds reach the rarer branches
        for max_depth in ((n - 1, 2) if seed < 4 else (n - 1,)):
            p = e.S["SpecTreeRejectionParams"]()
            p.batch, p.n_nodes, p.vocab, p.max_depth = B, n, V, max_depth
            p.cand, p.c_sb, p.c_sn = cand.data_ptr(), cand.stride(0), cand.stride(1)
            p.parents, p.par_sb, p.par_sn = parents.data_ptr(), parents.stride(0), parents.stride(1)
            p.q, p.q_sb, p.q_sn = q.data_ptr(), q.stride(0), q.stride(1)
            p.p, p.p_sb, p.p_sn = pt.data_ptr(), pt.stride(0), pt.stride(1)
            p.seed_ptr, p.seed = None, seed
            out, nodes, acc = ipoison(B, max_depth + 1), ipoison(B, max_depth + 1), ipoison(B)
            p.out, p.nodes, p.num_accepted = out.data_ptr(), nodes.data_ptr(), acc.data_ptr()
            e.call("emu_spec_verify_tree_rejection_cuda", p)
            ro, rn, ra = speculative.verify_tree_rejection(cand, parents, q, pt, max_depth=max_depth, seed=seed)
            assert torch.equal(out, ro) and torch.equal(nodes, rn) and torch.equal(acc, ra), (out, ro, nodes, rn)
            total += acc.sum().item()
    assert total > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sampling_probs(dtype):
    speculative, e = spec_api(), emu()
    g = torch.Generator().manual_seed(5)
    B, T, V = 4, 2, 1500
    logits = (2.0 * torch.randn(B, T, V, generator=g)).to(dtype)
    temp = torch.tensor([1.0, 0.0, 0.7, 1.3])
    top_k = torch.tensor([0, 5, 40, 300])
    top_p = torch.tensor([0.9, 1.0, 0.8, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.01, 0.05])
    cases = [dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p), dict(temperature=1.0, top_k=7),
             dict(temperature=0.5)]
    for layout in ("contig", "sliced"):
        lg = logits if layout == "contig" else sliced(logits)
        for kw in cases:
            p = e.S["SpecSamplingParams"]()
            p.rows, p.per_req, p.vocab = B * T, T, V
            p.dtype = DT_ENUM[dtype]
            p.logits, p.l_sb, p.l_st = lg.data_ptr(), lg.stride(0), lg.stride(1)
            t_t, t_v = speculative._per_request(kw.get("temperature"), 1.0, torch.float32, float)
            k_t, k_v = speculative._per_request(kw.get("top_k"), 0, torch.int64, int)
            p_t, p_v = speculative._per_request(kw.get("top_p"), 1.0, torch.float32, float)
            m_t, m_v = speculative._per_request(kw.get("min_p"), 0.0, torch.float32, float)
            p.temperature, p.temperature_value = ptr(t_t), t_v
            p.top_k, p.top_k_value = ptr(k_t), k_v
            p.top_p, p.top_p_value = ptr(p_t), p_v
            p.min_p, p.min_p_value = ptr(m_t), m_v
            out = nan(B, T, V)
            p.out = out.data_ptr()
            e.call("emu_spec_sampling_probs_cuda", p)
            ref = speculative.sampling_probs(lg, **kw)
            assert not out.isnan().any()
            assert torch.equal(out > 0, ref > 0), "kept sets differ"
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
            if kw is cases[0]:  # request 1: temperature 0 -> one-hot argmax; others: top-k sizes bound
                assert torch.equal(out[1], torch.nn.functional.one_hot(logits[1].float().argmax(-1), V).float())
                assert ((out[2] > 0).sum(-1) <= 40).all() and ((out[3] > 0).sum(-1) <= 300).all()


def test_sampling_probs_ties_and_overflow():
    """The bounded top-k path (gather, sort, thresholds in shared memory) with many exact ties at
    the top-k and top-p cuts (logits on a 0.5 grid), and with more tied candidates than it holds
    (a constant row: the general path). Kept sets equal the CPU kernel's (ties all kept)."""
    speculative, e = spec_api(), emu()
    g = torch.Generator().manual_seed(13)
    B, V = 4, 3000
    logits = (torch.randn(B, V, generator=g) * 4).round() / 2
    logits[3] = 0.25  # 3000 ties > the 2048 candidates of the bounded path
    for kw in (dict(top_k=torch.tensor([3, 10, 50, 5])), dict(top_k=torch.tensor([7, 40, 2, 100]), top_p=0.7),
               dict(top_k=20, top_p=0.5, min_p=0.3)):
        p = e.S["SpecSamplingParams"]()
        p.rows, p.per_req, p.vocab = B, 1, V
        p.dtype = DT_ENUM[torch.float32]
        p.logits, p.l_sb, p.l_st = logits.data_ptr(), logits.stride(0), 0
        k_t, k_v = speculative._per_request(kw.get("top_k"), 0, torch.int64, int)
        p_t, p_v = speculative._per_request(kw.get("top_p"), 1.0, torch.float32, float)
        m_t, m_v = speculative._per_request(kw.get("min_p"), 0.0, torch.float32, float)
        p.temperature, p.temperature_value = None, 0.8
        p.top_k, p.top_k_value = ptr(k_t), k_v
        p.top_p, p.top_p_value = ptr(p_t), p_v
        p.min_p, p.min_p_value = ptr(m_t), m_v
        out = nan(B, V)
        p.out = out.data_ptr()
        e.call("emu_spec_sampling_probs_cuda", p)
        ref = speculative.sampling_probs(logits, temperature=0.8, **kw)
        assert torch.equal(out > 0, ref > 0), "kept sets differ"
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
        kept = (out > 0).sum(-1)
        k_req = k_t if k_t is not None else torch.full((B,), k_v)
        assert kept[3].item() == V
        if "top_p" not in kw:  # top-k alone: at least k kept, more where ties straddle the cut
            assert (kept >= k_req).all() and (kept[:3] > k_req[:3]).any(), (kept, k_req)
