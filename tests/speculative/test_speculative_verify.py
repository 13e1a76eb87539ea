"""MTP verification (nemokernels.speculative): greedy, rejection sampling, trees, the fused sampling
transform. Exact cases against the PyTorch references (nemokernels/speculative/reference.py),
chi-square tests that emitted tokens follow the target at every position, acceptance rates,
at most k + 1 tokens always, reproducibility, bad input, opcheck, compile, CUDA graphs."""
from types import SimpleNamespace

import pytest
import torch

from nemokernels import _C, speculative
from nemokernels.speculative import reference as R

from conftest import DEVICES
from helpers import TOL, bad_input_test, mutation_table, opcheck, poison_allocator, rel_err

ops = torch.ops.nemokernels
LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of `counts` against `probs` (bins with expected
    count < 5 are merged into one)."""
    counts, probs = counts.double().cpu(), probs.double().cpu()
    total = counts.sum()
    exp = probs * total
    big = exp >= 5
    obs_b = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp_b = torch.cat([exp[big], exp[~big].sum().reshape(1)])
    keep = exp_b > 0
    assert (obs_b[~keep] == 0).all(), "a token with zero target probability was emitted"
    obs_b, exp_b = obs_b[keep], exp_b[keep]
    stat = ((obs_b - exp_b) ** 2 / exp_b).sum()
    df = max(int(keep.sum()) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def rand_dist(*shape, device="cpu", sharp=1.5):
    return torch.softmax(torch.randn(*shape, device=device) * sharp, -1)


def check_padding(out, num, k1):
    """Exactly num + 1 tokens, then -1: never more than k + 1 (flashinfer 879)."""
    assert out.shape[1] == k1
    assert ((num >= 0) & (num < k1)).all()
    emitted = (out >= 0).sum(1)
    assert torch.equal(emitted.cpu(), (num + 1).cpu()), "emitted count must be num_accepted + 1"
    pos = torch.arange(k1, device=out.device).expand_as(out)
    assert torch.equal((out >= 0), pos <= num[:, None]), "tokens must be a prefix, -1 after"


# ---------------------------------------------------------------- Philox


def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32-10."""
    assert _C.philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _C.philox4x32_10([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert _C.philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("device", DEVICES)
def test_verify_greedy_crafted(device):
    V = 10
    logits = torch.full((4, 4, V), -1.0, device=device)
    best = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1], [9, 0, 9, 0]], device=device)
    logits.scatter_(2, best[..., None], 5.0)
    logits[3, 0, 2] = 5.0  # a tie with index 9: argmax is the lower index 2
    drafts = torch.tensor([[1, 2, 3], [5, 0, 7], [2, 1, 1], [9, 0, 9]], device=device)
    out, num = speculative.verify_greedy(drafts, logits)
    assert num.tolist() == [3, 1, 0, 0]
    assert out.tolist() == [[1, 2, 3, 4], [5, 6, -1, -1], [1, -1, -1, -1], [2, -1, -1, -1]]
    # ragged: row 0 drafts only 1 token, its bonus comes from position 1
    out, num = speculative.verify_greedy(drafts, logits, num_draft_tokens=torch.tensor([1, 3, 0, 3], device=device))
    assert num.tolist() == [1, 1, 0, 0]
    assert out.tolist() == [[1, 2, -1, -1], [5, 6, -1, -1], [1, -1, -1, -1], [2, -1, -1, -1]]
    # k = 0: only the bonus token
    out, num = speculative.verify_greedy(drafts[:, :0], logits[:, :1])
    assert out[:, 0].tolist() == [1, 5, 1, 2] and num.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_verify_greedy_matches_reference(device, dtype):
    for B, k, V, layout in [(7, 4, 1000, "contiguous"), (3, 1, 33, "strided"), (5, 8, 20011, "transposed"),
                            (1, 3, 1, "contiguous")]:
        if layout == "strided":
            logits = torch.randn(B, k + 1, 2 * V, device=device, dtype=dtype)[..., ::2]
        elif layout == "transposed":
            logits = torch.randn(k + 1, B, V, device=device, dtype=dtype).transpose(0, 1)
        else:
            logits = torch.randn(B, k + 1, V, device=device, dtype=dtype)
        am = logits.float().argmax(-1)
        drafts = am[:, :k].clone()
        flip = torch.rand(B, k, device=device) < 0.25
        drafts[flip] = (drafts[flip] + 1) % V
        nd = torch.randint(0, k + 1, (B,), device=device)
        for num_draft in (None, nd):
            poison_allocator(device)
            out, num = speculative.verify_greedy(drafts, logits, num_draft)
            ref_out, ref_num = R.verify_greedy_ref(drafts, logits.float(), num_draft)
            assert torch.equal(out, ref_out) and torch.equal(num, ref_num), (B, k, V, layout)
            check_padding(out, num, k + 1)


@pytest.mark.parametrize("device", DEVICES)
def test_verify_greedy_nan_and_inf_like_torch_argmax(device):
    logits = torch.randn(3, 2, 50, device=device)
    logits[0, 0, 7] = float("nan")
    logits[1, 0] = float("-inf")
    logits[2, 0, 3] = float("inf")
    logits[2, 0, 40] = float("inf")
    am = logits.argmax(-1)
    out, num = speculative.verify_greedy(am[:, :1], logits)
    assert out[:, 0].tolist() == am[:, 0].tolist() == [7, 0, 3]
    assert num.tolist() == [1, 1, 1]


# ---------------------------------------------------------------- rejection sampling


def _draw(q, generator=None):
    B, k, V = q.shape
    return torch.multinomial(q.reshape(-1, V), 1, generator=generator).reshape(B, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("greedy_draft", [False, True])
def test_rejection_sample_follows_target_at_every_position(device, greedy_draft):
    """Chi-square: the token emitted at position j (given the walk reached j) follows p_j, and
    the acceptance rate at position 0 is sum(min(p_0, q_0)) (p_0(x_0) for a greedy draft)."""
    N, k, V = 24000, 3, 7
    p1 = rand_dist(k + 1, V, device=device)
    q1 = rand_dist(k, V, device=device)
    p = p1.expand(N, -1, -1)
    if greedy_draft:
        drafts = q1.argmax(-1).expand(N, -1).contiguous()
        q = None
        acc_rate = float(p1[0, drafts[0, 0]])
    else:
        q = q1.expand(N, -1, -1)
        drafts = _draw(q.contiguous())
        acc_rate = float(torch.minimum(p1[0], q1[0]).sum())
    gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**31, ())))
    out, num = speculative.rejection_sample(drafts, q, p, generator=gen)
    check_padding(out, num, k + 1)
    assert torch.equal(out[num > 0][:, 0], drafts[num > 0][:, 0]), "accepted tokens are the drafts"
    for j in range(k + 1):
        reached = num >= j
        counts = torch.bincount(out[reached, j], minlength=V)
        pval = chi2_pvalue(counts, p1[j])
        assert pval > 1e-5, f"position {j}: tokens do not follow the target (p={pval:.2e}, counts {counts.tolist()})"
    rate = float((num >= 1).double().mean())
    sigma = (acc_rate * (1 - acc_rate) / N) ** 0.5
    assert abs(rate - acc_rate) < 5 * sigma + 1e-9, f"acceptance rate {rate:.4f}, expected sum(min(p,q)) = {acc_rate:.4f}"


@pytest.mark.parametrize("device", DEVICES)
def test_rejection_sample_ragged_bonus_position(device):
    """Rows with n drafts take the bonus token from p_n (chi-square), never from later rows."""
    N, k, V = 12000, 3, 5
    p1 = rand_dist(k + 1, V, device=device)
    p = p1.expand(N, -1, -1)
    drafts = torch.full((N, k), -1, dtype=torch.int64, device=device)  # padded ids are ignored
    nd = torch.zeros(N, dtype=torch.int64, device=device)
    out, num = speculative.rejection_sample(drafts, None, p, num_draft_tokens=nd, seed=123)
    assert (num == 0).all()
    assert chi2_pvalue(torch.bincount(out[:, 0], minlength=V), p1[0]) > 1e-5
    # n = 2 with drafts the target is certain about: always accepted, bonus from p_2
    pc = p1.clone()
    pc[0] = torch.nn.functional.one_hot(torch.tensor(1), V).float()
    pc[1] = torch.nn.functional.one_hot(torch.tensor(3), V).float()
    drafts[:, 0], drafts[:, 1] = 1, 3
    nd.fill_(2)
    out, num = speculative.rejection_sample(drafts, None, pc.expand(N, -1, -1), num_draft_tokens=nd, seed=7)
    assert (num == 2).all() and (out[:, 3] == -1).all()
    assert chi2_pvalue(torch.bincount(out[:, 2], minlength=V), pc[2]) > 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_rejection_sample_crafted(device):
    V = 6
    p = rand_dist(2, 3, V, device=device)
    q = rand_dist(2, 2, V, device=device)
    drafts = torch.tensor([[0, 1], [2, 3]], device=device)
    # p == q everywhere: every draft accepted, bonus from p_2
    pe = p.clone()
    pe[:, :2] = q
    out, num = speculative.rejection_sample(drafts, q, pe, seed=1)
    assert num.tolist() == [2, 2] and out[:, :2].tolist() == drafts.tolist()
    # p(x) = 0 < q(x) at position 0: always rejected, the residual excludes x
    pz = p.clone()
    pz[:, 0] = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0, 0.0], device=device)
    qz = q.clone()
    qz[:, 0] = torch.tensor([0.5, 0.1, 0.4, 0.0, 0.0, 0.0], device=device)
    for s in range(20):
        out, num = speculative.rejection_sample(drafts, qz, pz, seed=s)
        assert num.tolist() == [0, 0]
        # residual max(0, p - q) = [0, .4, 0, .5, 0, 0]
        assert set(out[:, 0].tolist()) <= {1, 3} and (out[:, 1:] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("greedy_draft", [False, True])
def test_rejection_sample_matches_reference_cases(device, greedy_draft):
    """Every acceptance made certain (p = q at the position, so p(x) >= q(x)) or impossible
    (p(x) = 0): the outcome up to the first rejection no longer depends on the random numbers,
    so it must equal the reference's (nemokernels/speculative/reference.py) token for token for every
    request, ragged counts included; the emitted token at the stop must lie where the
    reference's race can land (positive residual max(0, p_m - q_m), or p_n for the bonus)."""
    B, k, V = 12, 4, 40
    q = rand_dist(B, k, V, device=device)
    drafts = _draw(q)
    p = rand_dist(B, k + 1, V, device=device)
    certain = torch.rand(B, k, device=device) < 0.7
    if greedy_draft:
        # q one-hot at the draft: certain means p(x) = 1, impossible p(x) = 0
        onehot = torch.nn.functional.one_hot(drafts, V).float()
        zero_x = p[:, :k] * (1 - onehot)
        p[:, :k] = torch.where(certain[..., None], onehot, zero_x / zero_x.sum(-1, keepdim=True))
        qq = None
    else:
        zero_x = q * (1 - torch.nn.functional.one_hot(drafts, V).float())
        p[:, :k] = torch.where(certain[..., None], q, zero_x / zero_x.sum(-1, keepdim=True))
        qq = q
    nd = torch.randint(0, k + 1, (B,), device=device)
    for num_draft in (None, nd):
        out, num = speculative.rejection_sample(drafts, qq, p, num_draft_tokens=num_draft, seed=99)
        # any uniforms give the same decisions here; the race draws are irrelevant to them
        ref_out, ref_num = R.rejection_sample_ref(drafts.cpu(), None if qq is None else qq.cpu(), p.cpu(),
                                                  None if num_draft is None else num_draft.cpu(),
                                                  accept_u=torch.rand(B, k), race_e=None)
        assert torch.equal(num.cpu(), ref_num), (num, ref_num)
        check_padding(out, num, k + 1)
        for b in range(B):
            m = int(num[b])
            assert out[b, :m].tolist() == ref_out[b, :m].tolist() == drafts[b, :m].tolist()
            n = k if num_draft is None else int(num_draft[b])
            if m < n:
                qm = torch.nn.functional.one_hot(drafts[b, m], V).float() if qq is None else qq[b, m]
                support = (p[b, m] - qm) > 0
            else:
                support = p[b, m] > 0
            assert bool(support[out[b, m]]), (b, m, int(out[b, m]))
            assert bool(support[ref_out[b, m].to(device)])


@pytest.mark.parametrize("device", DEVICES)
def test_rejection_sample_reproducible(device):
    B, k, V = 16, 4, 3001
    p = rand_dist(B, k + 1, V, device=device, sharp=3)
    q = rand_dist(B, k, V, device=device, sharp=3)
    drafts = _draw(q)
    a = speculative.rejection_sample(drafts, q, p, seed=2024)
    b = speculative.rejection_sample(drafts, q, p, seed=2024)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    g1 = torch.Generator(device=device).manual_seed(5)
    g2 = torch.Generator(device=device).manual_seed(5)
    c = speculative.rejection_sample(drafts, q, p, generator=g1)
    d = speculative.rejection_sample(drafts, q, p, generator=g2)
    assert torch.equal(c[0], d[0])
    # a seed tensor and the same int seed key the same stream
    e = ops.rejection_sample(drafts, q, p, None, torch.tensor([2024], device=device), 0)
    assert torch.equal(e[0], a[0])
    outs = {tuple(speculative.rejection_sample(drafts, q, p, seed=s)[0].flatten().tolist()) for s in range(6)}
    assert len(outs) > 1, "different seeds must give different samples"


@pytest.mark.parametrize("device", DEVICES)
def test_emitted_never_exceeds_k_plus_1_property(device):
    """Random logits, drafts, counts and degenerate distributions: always a -1-padded prefix
    of num_accepted + 1 <= k + 1 tokens, for every verifier."""
    for trial in range(8):
        B = int(torch.randint(1, 20, ()))
        k = int(torch.randint(0, 6, ()))
        V = int(torch.randint(1, 300, ()))
        logits = torch.randn(B, k + 1, V, device=device) * 4
        if trial % 3 == 0:
            logits = logits.round()  # many ties
        p = torch.softmax(logits, -1)
        if trial % 4 == 1:
            p = torch.nn.functional.one_hot(p.argmax(-1), V).float()  # one-hot targets
        q = rand_dist(B, k, V, device=device)
        drafts = _draw(q) if k > 0 else torch.zeros(B, 0, dtype=torch.int64, device=device)
        nd = torch.randint(0, k + 1, (B,), device=device)
        for num_draft in (None, nd):
            check_padding(*speculative.verify_greedy(drafts, logits, num_draft), k + 1)
            check_padding(*speculative.rejection_sample(drafts, q, p, num_draft_tokens=num_draft), k + 1)
            check_padding(*speculative.rejection_sample(drafts, None, p, num_draft_tokens=num_draft), k + 1)


# ---------------------------------------------------------------- trees


def _chain_tree(depth, fan, B, V, device):
    """A random tree: each level has `fan` children of one node of the previous level."""
    parents = [-1]
    frontier = [0]
    for _ in range(depth):
        nxt = []
        for f in range(fan):
            parents.append(frontier[f % len(frontier)])
            nxt.append(len(parents) - 1)
        frontier = nxt
    n = len(parents)
    par = torch.tensor(parents, device=device).expand(B, n).contiguous()
    cand = torch.randint(0, V, (B, n), device=device)
    return cand, par


@pytest.mark.parametrize("device", DEVICES)
def test_verify_tree_greedy_known_answer(device):
    V = 8
    #        0
    #      / | \
    #     1  2  3        tokens 5, 6, 6
    #    /   |
    #   4    5           tokens 2, 7
    #        |
    #        6           token 1
    parents = torch.tensor([[-1, 0, 0, 0, 1, 2, 5]], device=device)
    cand = torch.tensor([[0, 5, 6, 6, 2, 7, 1]], device=device)
    logits = torch.zeros(1, 7, V, device=device)
    for node, best in {0: 6, 1: 2, 2: 7, 3: 0, 4: 0, 5: 1, 6: 4}.items():
        logits[0, node, best] = 1.0
    out, nodes, num = speculative.verify_tree_greedy(cand, parents, logits)
    # root argmax 6 -> children 2 and 3 carry it: the lower index 2; then 5 (7), then 6 (1), bonus 4
    assert num.tolist() == [3]
    assert out.tolist() == [[6, 7, 1, 4, -1, -1, -1]]
    assert nodes.tolist() == [[0, 2, 5, 6, -1, -1, -1]]
    out, nodes, num = speculative.verify_tree_greedy(cand, parents, logits, max_depth=2)
    assert out.tolist() == [[6, 7, 1]] and nodes.tolist() == [[0, 2, 5]] and num.tolist() == [2]
    logits[0, 0] = 0
    logits[0, 0, 3] = 1.0  # no child carries 3: nothing accepted, emit 3
    out, nodes, num = speculative.verify_tree_greedy(cand, parents, logits, max_depth=3)
    assert out.tolist() == [[3, -1, -1, -1]] and nodes.tolist() == [[0, -1, -1, -1]] and num.tolist() == [0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_tree_greedy_matches_reference(device, dtype):
    B, V = 6, 37
    cand, par = _chain_tree(4, 3, B, V, device)
    n = cand.shape[1]
    logits = torch.randn(B, n, V, device=device, dtype=dtype)
    am = logits.float().argmax(-1)
    # make many children match their parent's argmax
    hit = torch.rand(B, n, device=device) < 0.6
    cand = torch.where(hit, am.gather(1, par.clamp_min(0)), cand)
    out, nodes, num = speculative.verify_tree_greedy(cand, par, logits)
    r_out, r_nodes, r_num = R.verify_tree_greedy_ref(cand.cpu(), par.cpu(), logits.float().cpu())
    assert torch.equal(out.cpu(), r_out) and torch.equal(nodes.cpu(), r_nodes) and torch.equal(num.cpu(), r_num)
    check_padding(out, num, n)


@pytest.mark.parametrize("device", DEVICES)
def test_verify_tree_rejection_first_token_follows_target(device):
    """Root with 3 children drafted independently from q: the first emitted token follows p_root;
    along an accepted child the next token follows that child's target distribution."""
    N, V = 15000, 6
    parents = torch.tensor([-1, 0, 0, 0, 1], device=device)
    n = 5
    p1 = rand_dist(n, V, device=device)
    q1 = rand_dist(n, V, device=device)
    cand = torch.multinomial(q1[1:], N, replacement=True).T  # (N, 4), children of root from q
    cand = torch.cat([torch.zeros(N, 1, dtype=torch.int64, device=device), cand], 1)
    out, nodes, num = speculative.verify_tree_rejection(cand, parents.expand(N, n), q1.expand(N, n, V),
                                                 p1.expand(N, n, V), seed=int(torch.randint(2**40, ())))
    check_padding(out, num, n)
    assert chi2_pvalue(torch.bincount(out[:, 0], minlength=V), p1[0]) > 1e-5
    via1 = nodes[:, 1] == 1
    assert via1.sum() > 500
    assert chi2_pvalue(torch.bincount(out[via1, 1], minlength=V), p1[1]) > 1e-5
    # accepted nodes are children of the previous node and carry the emitted token
    for d in range(1, 3):
        sel = num >= d
        assert torch.equal(parents[nodes[sel, d]], nodes[sel, d - 1])
        assert torch.equal(cand[sel].gather(1, nodes[sel, d:d + 1])[:, 0], out[sel, d - 1])


@pytest.mark.parametrize("device", DEVICES)
def test_verify_tree_rejection_reference_in_distribution(device):
    """First-token histogram of the kernel and of the PyTorch reference agree (two-sample)."""
    N, V = 2000, 4
    parents = torch.tensor([-1, 0, 0], device=device)
    p1 = rand_dist(3, V, device=device)
    q1 = rand_dist(3, V, device=device)
    cand = torch.cat([torch.zeros(N, 1, dtype=torch.int64, device=device),
                      torch.multinomial(q1[1:], N, replacement=True).T], 1)
    args = (cand, parents.expand(N, 3), q1.expand(N, 3, V), p1.expand(N, 3, V))
    out, _, num = speculative.verify_tree_rejection(*args, seed=11)
    r_out, _, r_num = R.verify_tree_rejection_ref(*[a.cpu() for a in args])
    c1 = torch.bincount(out[:, 0].cpu(), minlength=V).double()
    c2 = torch.bincount(r_out[:, 0], minlength=V).double()
    pooled = (c1 + c2) / (2 * N)
    assert chi2_pvalue(c1, pooled) > 1e-5 and chi2_pvalue(c2, pooled) > 1e-5
    assert abs(float(num.double().mean()) - float(r_num.double().mean())) < 0.1


# ---------------------------------------------------------------- sampling transform


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_sampling_probs_matches_reference(device, dtype):
    B, T, V = 5, 3, 1003
    logits = (torch.randn(B, T, V, device=device) * 3).to(dtype)
    temp = torch.tensor([1.0, 0.7, 0.0, 1.3, 0.5], device=device)
    top_k = torch.tensor([0, 50, 3, 1, 1003], device=device)
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.8], device=device)
    min_p = torch.tensor([0.0, 0.0, 0.1, 0.05, 0.02], device=device)
    cases = [dict(), dict(temperature=0.8), dict(temperature=temp), dict(temperature=temp, top_k=top_k),
             dict(temperature=0.9, top_p=top_p), dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p),
             dict(top_k=17, top_p=0.95, min_p=0.01), dict(temperature=0.0)]
    for kw in cases:
        poison_allocator(device)
        out = speculative.sampling_probs(logits, **kw)
        ref = R.sampling_probs_ref(logits.float(), **kw)
        assert out.dtype == torch.float32 and out.shape == logits.shape
        assert rel_err(out, ref) < 1e-5, kw
        assert torch.equal(out > 0, ref > 0), f"kept sets differ for {kw}"
    out2 = speculative.sampling_probs(logits[:, 0], temperature=temp, top_k=top_k)
    assert rel_err(out2, R.sampling_probs_ref(logits[:, 0].float(), temperature=temp, top_k=top_k)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_probs_then_verify_pipeline(device):
    """Sampling transform feeding rejection sampling: tokens outside top-k are never emitted."""
    B, k, V = 4000, 2, 30
    tl = torch.randn(1, k + 1, V, device=device).expand(B, -1, -1)
    dl = torch.randn(1, k, V, device=device).expand(B, -1, -1)
    p = speculative.sampling_probs(tl, temperature=0.8, top_k=5)
    q = speculative.sampling_probs(dl, temperature=1.0)
    drafts = _draw(q.contiguous())
    out, num = speculative.rejection_sample(drafts, q, p, seed=3)
    allowed = p[0] > 0
    for j in range(k + 1):
        toks = out[num >= j, j]
        assert allowed[j][toks].all()
        assert chi2_pvalue(torch.bincount(toks, minlength=V), p[0, j]) > 1e-5


# ---------------------------------------------------------------- empty and bad input


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    out, num = speculative.verify_greedy(torch.zeros(0, 3, dtype=torch.int64, device=device), torch.randn(0, 4, 9, device=device))
    assert out.shape == (0, 4) and num.shape == (0,)
    out, num = speculative.rejection_sample(torch.zeros(0, 3, dtype=torch.int64, device=device), None,
                                     torch.rand(0, 4, 9, device=device), seed=0)
    assert out.shape == (0, 4)
    assert speculative.sampling_probs(torch.randn(0, 9, device=device)).shape == (0, 9)
    o, nodes, n = speculative.verify_tree_greedy(torch.zeros(0, 3, dtype=torch.int64, device=device),
                                          torch.zeros(0, 3, dtype=torch.int64, device=device), torch.randn(0, 3, 9, device=device))
    assert o.shape == (0, 3) and nodes.shape == (0, 3) and n.shape == (0,)


def _public_args(device):
    return SimpleNamespace(d=torch.zeros(2, 3, dtype=torch.int64, device=device),
                           lg=torch.randn(2, 4, 10, device=device), p=rand_dist(2, 4, 10, device=device),
                           q=rand_dist(2, 3, 10, device=device),
                           par=torch.tensor([[-1, 0, 1], [-1, 0, 0]], device=device))


PUBLIC_CASES = [
    ("greedy_rows", "any", lambda t: speculative.verify_greedy(t.d, t.lg[:, :3]), r"target_logits.shape\[1\] must be 4"),
    ("greedy_batch", "any", lambda t: speculative.verify_greedy(t.d, t.lg[:1]), r"target_logits.shape\[0\] must be 2"),
    ("greedy_draft_rank", "any", lambda t: speculative.verify_greedy(t.d[0], t.lg),
     "draft_token_ids must have 2 dimensions"),
    ("greedy_logits_dtype", "any", lambda t: speculative.verify_greedy(t.d, t.lg.long()), "target_logits must be one of"),
    ("greedy_num_draft_size", "any", lambda t: speculative.verify_greedy(t.d, t.lg, torch.zeros(3, device=t.d.device)),
     r"num_draft_tokens.shape\[0\] must be 2"),
    ("rejection_vocab", "any", lambda t: speculative.rejection_sample(t.d, t.q[..., :9], t.p, seed=0),
     r"draft_probs.shape\[2\] must be 10"),
    ("rejection_rows", "any", lambda t: speculative.rejection_sample(t.d, t.q, t.p[:, :3], seed=0),
     r"target_probs.shape\[1\] must be 4"),
    ("rejection_seed_numel", "any",
     lambda t: ops.rejection_sample(t.d, t.q, t.p, None, torch.zeros(2, dtype=torch.int64, device=t.d.device), 0),
     "seed_tensor must hold exactly one element"),
    ("rejection_seed_and_generator", "any",
     lambda t: speculative.rejection_sample(t.d, t.q, t.p, seed=1, generator=torch.Generator(device=t.d.device)),
     "either seed or generator", ValueError),
    ("tree_greedy_parents", "any", lambda t: speculative.verify_tree_greedy(t.d, t.par[:, :2], t.lg[:, :3]),
     r"parents.shape\[1\] must be 3"),
    ("tree_greedy_max_depth", "any", lambda t: speculative.verify_tree_greedy(t.d, t.par, t.lg[:, :3], max_depth=3),
     "max_depth must be in"),
    ("tree_rejection_nodes", "any",
     lambda t: speculative.verify_tree_rejection(t.d, t.par, t.q[:, :2], t.p[:, :3], seed=0),
     r"draft_probs.shape\[1\] must be 3"),
    ("sampling_logits_rank", "any", lambda t: speculative.sampling_probs(t.lg[0, 0]), "logits must be"),
    ("sampling_top_p", "any", lambda t: speculative.sampling_probs(t.lg, top_p=1.5), "top_p must be in"),
    ("sampling_temperature", "any", lambda t: speculative.sampling_probs(t.lg, temperature=-1.0),
     "temperature must be finite"),
    ("sampling_min_p", "any", lambda t: speculative.sampling_probs(t.lg, min_p=2.0), "min_p must be in"),
    ("sampling_top_k_size", "any",
     lambda t: speculative.sampling_probs(t.lg, top_k=torch.zeros(3, device=t.d.device)), r"top_k.shape\[0\] must be 2"),
]


def _values_args(device):
    """Good shapes with bad values: the checks that read them run on the CPU only."""
    t = SimpleNamespace(d=torch.tensor([[1, 2, 3], [0, 9, 4]], device=device), lg=torch.randn(2, 4, 10, device=device),
                        p=rand_dist(2, 4, 10, device=device), q=rand_dist(2, 3, 10, device=device),
                        tree=torch.tensor([[-1, 0, 1], [-1, 0, 0]], device=device))
    t.bad_id, t.neg, t.nan, t.notone = t.d.clone(), t.p.clone(), t.q.clone(), t.p.clone()
    t.bad_id[1, 2] = 10
    t.neg[0, 1, 0] = -0.1
    t.nan[1, 0, 3] = float("nan")
    t.notone[1, 3] *= 1.01
    return t


VALUE_CASES = [
    ("greedy_id_past_vocab", "cpu", lambda t: speculative.verify_greedy(t.bad_id, t.lg),
     r"draft_token_ids\[1, 2\] = 10 is outside the vocabulary"),
    ("greedy_id_negative", "cpu", lambda t: speculative.verify_greedy(t.d - 3, t.lg), "outside the vocabulary"),
    ("greedy_num_draft", "cpu", lambda t: speculative.verify_greedy(t.d, t.lg, torch.tensor([1, 4])),
     r"num_draft_tokens\[1\] must be in \[0, k=3\]"),
    ("rejection_id", "cpu", lambda t: speculative.rejection_sample(t.bad_id, t.q, t.p, seed=0), "outside the vocabulary"),
    ("rejection_target_negative", "cpu", lambda t: speculative.rejection_sample(t.d, t.q, t.neg, seed=0),
     r"target_probs\[0, 1\] is not a probability distribution"),
    ("rejection_draft_nan", "cpu", lambda t: speculative.rejection_sample(t.d, t.nan, t.p, seed=0),
     r"draft_probs\[1, 0\] is not a probability distribution"),
    ("rejection_target_sum", "cpu", lambda t: speculative.rejection_sample(t.d, t.q, t.notone, seed=0), "sums to"),
    ("tree_greedy_parent_after_child", "cpu",
     lambda t: speculative.verify_tree_greedy(t.d, torch.tensor([[-1, 0, 2], [-1, 0, 0]]), t.lg[:, :3]),
     r"parents\[0, 2\] = 2 must be in \[0, 2\)"),
    ("tree_greedy_root", "cpu",
     lambda t: speculative.verify_tree_greedy(t.d, torch.tensor([[0, 0, 1], [-1, 0, 0]]), t.lg[:, :3]), "must be -1"),
    ("tree_greedy_candidate_id", "cpu", lambda t: speculative.verify_tree_greedy(t.bad_id, t.tree, t.lg[:, :3]),
     "candidate_ids.*outside the vocabulary"),
    ("tree_rejection_draft_negative", "cpu",
     lambda t: speculative.verify_tree_rejection(t.d, t.tree, t.neg[:, :3], t.p[:, :3], seed=0),
     "draft_probs.*not a probability distribution"),
    ("sampling_temperature_value", "cpu",
     lambda t: speculative.sampling_probs(t.lg[:, 0], temperature=torch.tensor([1.0, -2.0])), r"temperature\[1\]"),
    ("sampling_top_p_value", "cpu", lambda t: speculative.sampling_probs(t.lg[:, 0], top_p=torch.tensor([0.0, 0.5])),
     r"top_p\[0\]"),
]


def test_padded_draft_ids_are_ignored_on_cpu():
    """Draft ids beyond num_draft_tokens are padding: not checked against the vocabulary."""
    t = _values_args("cpu")
    pad = t.d.clone()
    pad[0, 2] = -1
    speculative.rejection_sample(pad, t.q, t.p, num_draft_tokens=torch.tensor([2, 3]), seed=0)
    speculative.verify_greedy(pad, t.lg, torch.tensor([2, 3]))


@pytest.mark.gpu
def test_cuda_is_memory_safe_for_bad_values():
    """No value checks on CUDA (they would sync): out-of-range ids and counts are clamped before
    any indexing, a bad tree is walked only forward (children after their parent). Every
    output is still a -1-padded prefix of at most k + 1 in-vocabulary tokens; tree outputs
    name real nodes; the requests with good values equal the CPU result."""
    V = 10
    d = torch.tensor([[1, 200, -5], [0, 9, 4]], device="cuda")
    p = rand_dist(2, 4, V, device="cuda")
    q = rand_dist(2, 3, V, device="cuda")
    lg = torch.randn(2, 4, V, device="cuda")
    nd = torch.tensor([7, -2], device="cuda")
    for out, num in (speculative.verify_greedy(d, lg, nd), speculative.rejection_sample(d, q, p, num_draft_tokens=nd, seed=0),
                     speculative.rejection_sample(d, None, p * -1, seed=0), speculative.rejection_sample(d, q * float("nan"), p, seed=0)):
        torch.cuda.synchronize()
        check_padding(out, num, 4)
        assert ((out >= -1) & (out < V)).all() and (num <= 3).all()
    # request 1 has good values (its count -2 clamps to 0): it must match the CPU on its own
    out, num = speculative.verify_greedy(d, lg, nd)
    ref_out, ref_num = speculative.verify_greedy(d[1:].cpu(), lg[1:].cpu(), torch.tensor([0]))
    assert torch.equal(out[1:].cpu(), ref_out) and torch.equal(num[1:].cpu(), ref_num)
    cand = torch.tensor([[3, 1 << 40, -7], [2, 5, 6]], device="cuda")
    par = torch.tensor([[5, 9, -3], [-1, 0, 0]], device="cuda")
    for out, nodes, num in (speculative.verify_tree_greedy(cand, par, lg[:, :3]),
                            speculative.verify_tree_rejection(cand, par, q, p[:, :3], seed=0),
                            speculative.verify_tree_rejection(cand, par, q * -1, p[:, :3] * float("inf"), seed=0)):
        torch.cuda.synchronize()
        check_padding(out, num, 3)
        assert ((out >= -1) & (out < V)).all(), "accepted candidates are emitted as tested (clamped)"
        assert torch.equal(nodes >= 0, out >= 0) and ((nodes >= -1) & (nodes < 3)).all()
        assert (nodes[:, 0] == 0).all(), "the walk starts at the root"
        # a bad tree never lets a node be its own ancestor: node indices strictly increase
        for row in nodes.cpu().tolist():
            path = [x for x in row if x >= 0]
            assert path == sorted(set(path))
    # the good request of the greedy tree equals the CPU
    out, nodes, num = speculative.verify_tree_greedy(cand, par, lg[:, :3])
    ref = speculative.verify_tree_greedy(cand[1:].cpu(), par[1:].cpu(), lg[1:, :3].cpu())
    assert torch.equal(out[1:].cpu(), ref[0]) and torch.equal(nodes[1:].cpu(), ref[1])
    # sampling parameters out of range per request (CPU-only checks): no fault, the shape holds
    probs = speculative.sampling_probs(lg[:, 0], temperature=torch.tensor([-1.0, float("nan")], device="cuda"),
                                top_k=torch.tensor([-5, 1 << 40], device="cuda"),
                                top_p=torch.tensor([0.0, 7.0], device="cuda"),
                                min_p=torch.tensor([-1.0, 3.0], device="cuda"))
    torch.cuda.synchronize()
    assert probs.shape == (2, V)


# ---------------------------------------------------------------- GPU agrees with CPU


@pytest.mark.gpu
@pytest.mark.racecheck
def test_cuda_matches_cpu_exactly():
    """Same inputs and seed: identical tokens on CPU and CUDA (same Philox counters, race keys,
    and for the tree rejection the same summation order)."""
    B, k, V = 64, 4, 131072 // 8 + 5
    p = rand_dist(B, k + 1, V, device="cuda", sharp=4)
    q = rand_dist(B, k, V, device="cuda", sharp=4)
    drafts = _draw(q)
    nd = torch.randint(0, k + 1, (B,), device="cuda")
    lg = torch.randn(B, k + 1, V, device="cuda", dtype=torch.bfloat16)
    for args in ((drafts, lg), (drafts, lg, nd)):
        g = speculative.verify_greedy(*args)
        c = speculative.verify_greedy(*[a.cpu() for a in args])
        assert torch.equal(g[0].cpu(), c[0]) and torch.equal(g[1].cpu(), c[1])
    for qq in (q, None):
        g = speculative.rejection_sample(drafts, qq, p, num_draft_tokens=nd, seed=77)
        c = speculative.rejection_sample(drafts.cpu(), None if qq is None else qq.cpu(), p.cpu(), num_draft_tokens=nd.cpu(), seed=77)
        assert torch.equal(g[0].cpu(), c[0]) and torch.equal(g[1].cpu(), c[1])
    cand, par = _chain_tree(3, 3, 8, V, "cuda")
    n = cand.shape[1]
    tp = rand_dist(8, n, V, device="cuda", sharp=4)
    tq = rand_dist(8, n, V, device="cuda", sharp=4)
    cand = torch.cat([cand[:, :1], torch.multinomial(tq[:, 1:].reshape(-1, V), 1).reshape(8, n - 1)], 1)
    g = speculative.verify_tree_rejection(cand, par, tq, tp, seed=5)
    c = speculative.verify_tree_rejection(cand.cpu(), par.cpu(), tq.cpu(), tp.cpu(), seed=5)
    assert all(torch.equal(x.cpu(), y) for x, y in zip(g, c))
    tl = torch.randn(8, n, V, device="cuda")
    g = speculative.verify_tree_greedy(cand, par, tl)
    c = speculative.verify_tree_greedy(cand.cpu(), par.cpu(), tl.cpu())
    assert all(torch.equal(x.cpu(), y) for x, y in zip(g, c))
    lg2 = torch.randn(6, 2, V, device="cuda") * 3
    for kw in (dict(temperature=0.7, top_k=100, top_p=0.9, min_p=0.01), dict(temperature=0.0)):
        assert rel_err(speculative.sampling_probs(lg2, **kw), speculative.sampling_probs(lg2.cpu(), **kw)) < 1e-5


@pytest.mark.gpu
def test_cuda_large_vocab_distribution():
    """V = 131072 on the GPU path (split vocab chunks): chi-square of bonus tokens over a
    sparse target, and verify_greedy against torch.argmax at batch 64, k 4."""
    V, N = 131072, 4096
    p1 = torch.zeros(V, device="cuda")
    support = torch.randperm(V, device="cuda")[:8]
    p1[support] = rand_dist(8, device="cuda")
    p = p1.expand(N, 1, V)
    out, num = speculative.rejection_sample(torch.zeros(N, 0, dtype=torch.int64, device="cuda"), None, p, seed=9)
    counts = torch.bincount(out[:, 0], minlength=V)
    assert chi2_pvalue(counts[support], p1[support]) > 1e-5 and counts.sum() == counts[support].sum()
    lg = torch.randn(64, 5, V, device="cuda", dtype=torch.bfloat16)
    am = lg.argmax(-1)
    o, n = speculative.verify_greedy(am[:, :4], lg)
    assert (n == 4).all() and torch.equal(o, am)


# ---------------------------------------------------------------- opcheck, compile, graphs


def _opcheck_args(op, device):
    B, k, V = 3, 2, 17
    d = torch.randint(0, V, (B, k), device=device)
    lg = torch.randn(B, k + 1, V, device=device)
    p = rand_dist(B, k + 1, V, device=device)
    q = rand_dist(B, k, V, device=device)
    nd = torch.tensor([2, 0, 1], device=device)
    seed_t = torch.tensor([42], device=device)
    par = torch.tensor([[-1, 0, 0]] * B, device=device)
    cand = d.new_zeros(B, 3) + d[:, :1]
    return {
        "verify_greedy": [(d, lg, nd), (d, lg, None)],
        "rejection_sample": [(d, q, p, nd, seed_t, 0), (d, None, p, None, None, 7)],
        "verify_tree_greedy": [(cand, par, lg, 2)],
        "verify_tree_rejection": [(cand, par, rand_dist(B, 3, V, device=device), p, 1, seed_t, 0)],
        "sampling_probs": [(lg, None, 0.8, torch.tensor([0, 3, 5], device=device), 0, None, 0.9, None, 0.0)],
    }[op]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["verify_greedy", "rejection_sample", "verify_tree_greedy", "verify_tree_rejection",
                                "sampling_probs"])
def test_opcheck(device, op):
    for args in _opcheck_args(op, device):
        opcheck(getattr(ops, op), args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    B, k, V = 4, 3, 50
    lg = torch.randn(B, k + 1, V, device=device)
    d = lg.argmax(-1)[:, :k].contiguous()
    par = torch.tensor([[-1, 0, 0, 1]] * B, device=device)

    def f(d, lg, par):
        p = speculative.sampling_probs(lg, temperature=0.9, top_k=10, top_p=0.95)
        a = speculative.verify_greedy(d, lg)
        b = speculative.rejection_sample(d, None, p, seed=3)
        c = speculative.verify_tree_greedy(d[:, :1].expand(B, 4).contiguous(), par, lg)
        e = speculative.verify_tree_rejection(d[:, :1].expand(B, 4).contiguous(), par, p, p, seed=3)
        return p, a, b, c, e

    eager = f(d, lg, par)
    compiled = torch.compile(f, fullgraph=True, backend=backend)(d, lg, par)
    flat_e = [eager[0], *eager[1], *eager[2], *eager[3], *eager[4]]
    flat_c = [compiled[0], *compiled[1], *compiled[2], *compiled[3], *compiled[4]]
    assert rel_err(flat_c[0], flat_e[0]) < TOL[torch.float32]
    for x, y in zip(flat_e[1:], flat_c[1:]):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_inputs():
    """Capture with a generator-drawn seed tensor, change inputs in place, replay: results
    follow the new inputs, and the seed advances with the generator at each replay."""
    B, k, V = 8, 4, 5000
    lg = torch.randn(B, k + 1, V, device="cuda")
    d = torch.randint(0, V, (B, k), device="cuda")
    p = rand_dist(B, k + 1, V, device="cuda")
    q = rand_dist(B, k, V, device="cuda")
    seed_t = torch.tensor([1234], device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        speculative.verify_greedy(d, lg)
        ops.rejection_sample(d, q, p, None, seed_t, 0)
        speculative.sampling_probs(lg, temperature=0.7, top_k=20)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        go, gn = speculative.verify_greedy(d, lg)
        ro, rn = ops.rejection_sample(d, q, p, None, seed_t, 0)
        sp = speculative.sampling_probs(lg, temperature=0.7, top_k=20)
    lg.copy_(torch.randn_like(lg))
    d.copy_(lg.argmax(-1)[:, :k])
    p.copy_(rand_dist(B, k + 1, V, device="cuda"))
    seed_t.fill_(99)
    g.replay()
    eo, en = speculative.verify_greedy(d, lg)
    assert torch.equal(go, eo) and torch.equal(gn, en) and (gn == k).all()
    xo, xn = ops.rejection_sample(d, q, p, None, seed_t, 0)
    assert torch.equal(ro, xo) and torch.equal(rn, xn)
    assert torch.equal(sp, speculative.sampling_probs(lg, temperature=0.7, top_k=20))


# ---------------------------------------------------------------- bad input, table-driven
# Rows (id, mutation of a valid call's arguments, regex, where) as in helpers.mutation_table;
# where: "any" (shape, dtype, scalar checks: every device), "cpu" (value checks: ids inside the vocabulary, counts in [0, k],
# probabilities forming distributions, parents forming a tree, per-request sampling parameters;
# they read the data, a host sync on CUDA, so there the kernels clamp every id and count before
# indexing instead: test_cuda_is_memory_safe_for_bad_values), "cuda" (device mix, grid limits).
# NaN / Inf: target logits follow torch.argmax (test_verify_greedy_nan_and_inf_like_torch_argmax);
# probabilities must be finite (CPU check); a NaN sampling parameter is refused. The public
# functions' refusals are rows (id, where, call, regex[, exc]): PUBLIC_CASES, VALUE_CASES.


def _set(a, key, idx, value):
    a[key] = a[key].clone()
    a[key][idx] = value


def _greedy_args(device):
    return dict(d=torch.tensor([[1, 2, 3], [0, 9, 4]], device=device), lg=torch.randn(2, 4, 10, device=device),
                nd=torch.tensor([3, 1], device=device))


def _greedy_call(a):
    return ops.verify_greedy(a["d"], a["lg"], a["nd"])


VG = "verify_greedy"
GREEDY_CASES = [
    ("draft_dtype", lambda a: a.update(d=a["d"].int()), VG + r": draft_token_ids must be one of \{int64\}, got int32",
     "any"),
    ("draft_rank", lambda a: a.update(d=a["d"][0]), VG + r": draft_token_ids must have 2 dimensions, got shape \(3,\)",
     "any"),
    ("logits_rank", lambda a: a.update(lg=a["lg"][:, 0]), VG + r": target_logits must have 3 dimensions, got shape "
     r"\(2, 10\)", "any"),
    ("logits_batch", lambda a: a.update(lg=a["lg"][:1]), VG + r": target_logits.shape\[0\] must be 2, got shape "
     r"\(1, 4, 10\)", "any"),
    ("logits_positions", lambda a: a.update(lg=a["lg"][:, :3]),
     VG + r": target_logits.shape\[1\] must be 4, got shape \(2, 3, 10\)", "any"),
    ("logits_dtype", lambda a: a.update(lg=a["lg"].double()),
     VG + r": target_logits must be one of \{float32, float16, bfloat16\}, got float64", "any"),
    ("empty_vocab", lambda a: a.update(lg=a["lg"][..., :0]),
     VG + r": target_logits.shape\[2\] must be at least 1 \(the vocabulary size\), got shape \(2, 4, 0\)", "any"),
    ("num_draft_dtype", lambda a: a.update(nd=a["nd"].int()), VG + r": num_draft_tokens must be one of \{int64\}, got "
     "int32", "any"),
    ("num_draft_rank", lambda a: a.update(nd=a["nd"][None]), VG + r": num_draft_tokens must have 1 dimensions", "any"),
    ("num_draft_size", lambda a: a.update(nd=a["nd"][:1]),
     VG + r": num_draft_tokens.shape\[0\] must be 2, got shape \(1,\)", "any"),
    ("num_draft_above_k", lambda a: _set(a, "nd", 1, 4), VG + r": num_draft_tokens\[1\] must be in \[0, k=3\], got 4",
     "cpu"),
    ("num_draft_negative", lambda a: _set(a, "nd", 0, -1), VG + r": num_draft_tokens\[0\] must be in \[0, k=3\], got -1",
     "cpu"),
    ("draft_past_vocab", lambda a: _set(a, "d", (0, 2), 10),
     VG + r": draft_token_ids\[0, 2\] = 10 is outside the vocabulary \[0, 10\)", "cpu"),
    ("draft_negative", lambda a: _set(a, "d", (1, 0), -1),
     VG + r": draft_token_ids\[1, 0\] = -1 is outside the vocabulary \[0, 10\)", "cpu"),
    ("logits_device", lambda a: a.update(lg=a["lg"].cpu()),
     VG + r": target_logits is on cpu but draft_token_ids is on cuda:\d+; all tensors must be on one device", "cuda"),
    ("num_draft_device", lambda a: a.update(nd=a["nd"].cpu()),
     VG + r": num_draft_tokens is on cpu but draft_token_ids is on cuda:\d+", "cuda"),
    ("rows_past_grid", lambda a: a.update(d=torch.zeros(2**31, 0, dtype=torch.int64, device="cuda"),
                                          lg=torch.zeros(1, 1, 1, device="cuda").expand(2**31, 1, 1), nd=None),
     VG + r": batch \* \(k \+ 1\) \(rows of target_logits\) = 2147483648 exceeds 2147483647, the most the CUDA "
     r"kernels take \(one block each, grid dimension x\); verify the batch in several calls", "cuda"),
]


def _rej_args(device):
    return dict(d=torch.tensor([[1, 2, 3], [0, 9, 4]], device=device), q=rand_dist(2, 3, 10, device=device),
                p=rand_dist(2, 4, 10, device=device), nd=torch.tensor([3, 2], device=device),
                seed_t=torch.tensor([5], device=device))


def _rej_call(a):
    return ops.rejection_sample(a["d"], a["q"], a["p"], a["nd"], a["seed_t"], 0)


RS = "rejection_sample"
REJ_CASES = [
    ("draft_dtype", lambda a: a.update(d=a["d"].float()), RS + r": draft_token_ids must be one of \{int64\}, got float32",
     "any"),
    ("draft_rank", lambda a: a.update(d=a["d"][None]), RS + r": draft_token_ids must have 2 dimensions", "any"),
    ("target_rank", lambda a: a.update(p=a["p"][0]), RS + r": target_probs must have 3 dimensions, got shape \(4, 10\)",
     "any"),
    ("target_batch", lambda a: a.update(p=a["p"][:1]), RS + r": target_probs.shape\[0\] must be 2", "any"),
    ("target_positions", lambda a: a.update(p=a["p"][:, :3]), RS + r": target_probs.shape\[1\] must be 4, got shape "
     r"\(2, 3, 10\)", "any"),
    ("target_dtype", lambda a: a.update(p=a["p"].half()), RS + r": target_probs must be one of \{float32\}, got float16",
     "any"),
    ("empty_vocab", lambda a: a.update(p=a["p"][..., :0], q=a["q"][..., :0]),
     RS + r": target_probs.shape\[2\] must be at least 1 \(the vocabulary size\), got shape \(2, 4, 0\)", "any"),
    ("draft_vocab", lambda a: a.update(q=a["q"][..., :9]), RS + r": draft_probs.shape\[2\] must be 10, got shape "
     r"\(2, 3, 9\)", "any"),
    ("draft_positions", lambda a: a.update(q=a["q"][:, :2]), RS + r": draft_probs.shape\[1\] must be 3", "any"),
    ("draft_probs_dtype", lambda a: a.update(q=a["q"].double()), RS + r": draft_probs must be one of \{float32\}, got "
     "float64", "any"),
    ("num_draft_size", lambda a: a.update(nd=torch.zeros(3, dtype=torch.int64, device=a["d"].device)),
     RS + r": num_draft_tokens.shape\[0\] must be 2, got shape \(3,\)", "any"),
    ("seed_numel", lambda a: a.update(seed_t=torch.zeros(2, dtype=torch.int64, device=a["d"].device)),
     RS + r": seed_tensor must hold exactly one element, got shape \(2,\)", "any"),
    ("seed_dtype", lambda a: a.update(seed_t=a["seed_t"].int()), RS + r": seed_tensor must be one of \{int64\}, got int32",
     "any"),
    ("draft_past_vocab", lambda a: _set(a, "d", (1, 1), 10),
     RS + r": draft_token_ids\[1, 1\] = 10 is outside the vocabulary \[0, 10\)", "cpu"),
    ("num_draft_above_k", lambda a: _set(a, "nd", 0, 5), RS + r": num_draft_tokens\[0\] must be in \[0, k=3\], got 5",
     "cpu"),
    ("target_negative", lambda a: _set(a, "p", (0, 1, 4), -0.25),
     RS + r": target_probs\[0, 1\] is not a probability distribution: entry 4 is -0.25\d* \(must be finite and >= 0\)",
     "cpu"),
    ("target_inf", lambda a: _set(a, "p", (1, 2, 0), float("inf")),
     RS + r": target_probs\[1, 2\] is not a probability distribution: entry 0 is inf", "cpu"),
    ("draft_nan", lambda a: _set(a, "q", (1, 0, 3), float("nan")),
     RS + r": draft_probs\[1, 0\] is not a probability distribution: entry 3 is nan", "cpu"),
    ("target_sum", lambda a: a.update(p=a["p"] * 1.01),
     RS + r": target_probs\[0, 0\] is not a probability distribution: it sums to 1.01\d* \(must be 1 within 1e-3\)",
     "cpu"),
    ("target_device", lambda a: a.update(p=a["p"].cpu()),
     RS + r": target_probs is on cpu but draft_token_ids is on cuda:\d+; all tensors must be on one device", "cuda"),
    ("seed_device", lambda a: a.update(seed_t=a["seed_t"].cpu()),
     RS + r": seed_tensor is on cpu but target_probs is on cuda:\d+", "cuda"),
]


def _tree_args(device):
    # node 0 the root; 1 and 2 its children, 3 a child of 1
    return dict(cand=torch.tensor([[0, 4, 5, 6], [0, 1, 2, 3]], device=device),
                par=torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2]], device=device),
                lg=torch.randn(2, 4, 10, device=device), q=rand_dist(2, 4, 10, device=device),
                p=rand_dist(2, 4, 10, device=device), depth=3, seed_t=torch.tensor([1], device=device))


def _tree_greedy_call(a):
    return ops.verify_tree_greedy(a["cand"], a["par"], a["lg"], a["depth"])


TG = "verify_tree_greedy"
TREE_GREEDY_CASES = [
    ("cand_dtype", lambda a: a.update(cand=a["cand"].int()), TG + r": candidate_ids must be one of \{int64\}, got int32",
     "any"),
    ("cand_rank", lambda a: a.update(cand=a["cand"][0]), TG + r": candidate_ids must have 2 dimensions", "any"),
    ("no_nodes", lambda a: a.update(cand=a["cand"][:, :0]),
     TG + r": candidate_ids.shape\[1\] must be at least 1 \(the root node\), got shape \(2, 0\)", "any"),
    ("parents_dtype", lambda a: a.update(par=a["par"].int()), TG + r": parents must be one of \{int64\}, got int32",
     "any"),
    ("parents_nodes", lambda a: a.update(par=a["par"][:, :3]), TG + r": parents.shape\[1\] must be 4, got shape \(2, 3\)",
     "any"),
    ("parents_batch", lambda a: a.update(par=a["par"][:1]), TG + r": parents.shape\[0\] must be 2", "any"),
    ("logits_nodes", lambda a: a.update(lg=a["lg"][:, :3]), TG + r": target_logits.shape\[1\] must be 4", "any"),
    ("logits_dtype", lambda a: a.update(lg=a["lg"].long()), TG + r": target_logits must be one of \{float32, float16, "
     r"bfloat16\}, got int64", "any"),
    ("max_depth_too_deep", lambda a: a.update(depth=4), TG + r": max_depth must be in \[0, n_nodes - 1 = 3\], got 4",
     "any"),
    ("max_depth_negative", lambda a: a.update(depth=-1), TG + r": max_depth must be in \[0, n_nodes - 1 = 3\], got -1",
     "any"),
    ("root_has_parent", lambda a: _set(a, "par", (1, 0), 0),
     TG + r": parents\[1, 0\] must be -1 \(node 0 is the root\), got 0", "cpu"),
    ("parent_after_child", lambda a: _set(a, "par", (0, 2), 3),
     TG + r": parents\[0, 2\] = 3 must be in \[0, 2\) \(parents precede their children\)", "cpu"),
    ("parent_negative", lambda a: _set(a, "par", (0, 3), -1), TG + r": parents\[0, 3\] = -1 must be in \[0, 3\)", "cpu"),
    ("cand_past_vocab", lambda a: _set(a, "cand", (1, 3), 10),
     TG + r": candidate_ids\[1, 3\] = 10 is outside the vocabulary \[0, 10\)", "cpu"),
    ("parents_device", lambda a: a.update(par=a["par"].cpu()),
     TG + r": parents is on cpu but candidate_ids is on cuda:\d+; all tensors must be on one device", "cuda"),
]


def _tree_rej_call(a):
    return ops.verify_tree_rejection(a["cand"], a["par"], a["q"], a["p"], a["depth"], a["seed_t"], 0)


TR = "verify_tree_rejection"
TREE_REJ_CASES = [
    ("too_many_nodes", lambda a: a.update(cand=torch.zeros(2, 1025, dtype=torch.int64, device=a["cand"].device)),
     TR + r": candidate_ids must have 1 to 1024 nodes \(root included\), got shape \(2, 1025\)", "any"),
    ("no_nodes", lambda a: a.update(cand=a["cand"][:, :0]), TR + r": candidate_ids must have 1 to 1024 nodes", "any"),
    ("parents_rank", lambda a: a.update(par=a["par"].flatten()), TR + r": parents must have 2 dimensions", "any"),
    ("target_nodes", lambda a: a.update(p=a["p"][:, :3]), TR + r": target_probs.shape\[1\] must be 4", "any"),
    ("target_dtype", lambda a: a.update(p=a["p"].bfloat16()), TR + r": target_probs must be one of \{float32\}, got "
     "bfloat16", "any"),
    ("empty_vocab", lambda a: a.update(p=a["p"][..., :0], q=a["q"][..., :0]),
     TR + r": target_probs.shape\[2\] must be at least 1 \(the vocabulary size\)", "any"),
    ("draft_vocab", lambda a: a.update(q=a["q"][..., :9]), TR + r": draft_probs.shape\[2\] must be 10", "any"),
    ("draft_dtype", lambda a: a.update(q=a["q"].half()), TR + r": draft_probs must be one of \{float32\}, got float16",
     "any"),
    ("max_depth_too_deep", lambda a: a.update(depth=7), TR + r": max_depth must be in \[0, n_nodes - 1 = 3\], got 7",
     "any"),
    ("seed_numel", lambda a: a.update(seed_t=a["seed_t"][:0]), TR + r": seed_tensor must hold exactly one element",
     "any"),
    ("parent_after_child", lambda a: _set(a, "par", (1, 1), 1), TR + r": parents\[1, 1\] = 1 must be in \[0, 1\)", "cpu"),
    ("cand_negative", lambda a: _set(a, "cand", (0, 2), -4),
     TR + r": candidate_ids\[0, 2\] = -4 is outside the vocabulary \[0, 10\)", "cpu"),
    ("draft_not_distribution", lambda a: a.update(q=a["q"] * 0.5),
     TR + r": draft_probs\[0, 1\] is not a probability distribution: it sums to 0.5", "cpu"),
    ("target_nan", lambda a: _set(a, "p", (1, 0, 9), float("nan")),
     TR + r": target_probs\[1, 0\] is not a probability distribution: entry 9 is nan", "cpu"),
    ("draft_device", lambda a: a.update(q=a["q"].cpu()),
     TR + r": draft_probs is on cpu but candidate_ids is on cuda:\d+; all tensors must be on one device", "cuda"),
]


def _samp_args(device):
    return dict(lg=torch.randn(3, 2, 12, device=device), t=torch.tensor([0.5, 1.0, 0.0], device=device), tv=1.0,
                k=torch.tensor([0, 3, 20], device=device), kv=0, p=torch.tensor([1.0, 0.9, 0.5], device=device), pv=1.0,
                m=torch.tensor([0.0, 0.1, 0.9], device=device), mv=0.0)


def _samp_call(a):
    return ops.sampling_probs(a["lg"], a["t"], a["tv"], a["k"], a["kv"], a["p"], a["pv"], a["m"], a["mv"])


SP = "sampling_probs"
SAMPLING_CASES = [
    ("logits_rank1", lambda a: a.update(lg=a["lg"][0, 0]),
     SP + r": logits must be \(batch, vocab\) or \(batch, tokens, vocab\), got shape \(12,\)", "any"),
    ("logits_rank4", lambda a: a.update(lg=a["lg"][None]), SP + r": logits must be \(batch, vocab\) or \(batch, tokens, "
     r"vocab\), got shape \(1, 3, 2, 12\)", "any"),
    ("logits_dtype", lambda a: a.update(lg=a["lg"].double()), SP + r": logits must be one of \{float32, float16, "
     r"bfloat16\}, got float64", "any"),
    ("empty_vocab", lambda a: a.update(lg=a["lg"][..., :0]),
     SP + r": logits.shape\[2\] must be at least 1 \(the vocabulary size\), got shape \(3, 2, 0\)", "any"),
    ("temperature_negative", lambda a: a.update(tv=-0.5), SP + r": temperature must be finite and >= 0 \(0 = greedy\), "
     r"got -0.5", "any"),
    ("temperature_nan", lambda a: a.update(tv=float("nan")), SP + r": temperature must be finite and >= 0 .*got nan",
     "any"),
    ("temperature_inf", lambda a: a.update(tv=float("inf")), SP + r": temperature must be finite and >= 0 .*got inf",
     "any"),
    ("top_k_negative", lambda a: a.update(kv=-1), SP + r": top_k must be >= 0 \(0 = no top-k\), got -1", "any"),
    ("top_p_zero", lambda a: a.update(pv=0.0), SP + r": top_p must be in \(0, 1\], got 0", "any"),
    ("top_p_above_one", lambda a: a.update(pv=1.5), SP + r": top_p must be in \(0, 1\], got 1.5", "any"),
    ("top_p_nan", lambda a: a.update(pv=float("nan")), SP + r": top_p must be in \(0, 1\], got nan", "any"),
    ("min_p_above_one", lambda a: a.update(mv=2.0), SP + r": min_p must be in \[0, 1\], got 2", "any"),
    ("min_p_negative", lambda a: a.update(mv=-0.1), SP + r": min_p must be in \[0, 1\], got -0.1", "any"),
    ("temperature_size", lambda a: a.update(t=a["t"][:2]), SP + r": temperature.shape\[0\] must be 3, got shape \(2,\)",
     "any"),
    ("temperature_dtype", lambda a: a.update(t=a["t"].double()), SP + r": temperature must be one of \{float32\}, got "
     "float64", "any"),
    ("top_k_dtype", lambda a: a.update(k=a["k"].float()), SP + r": top_k must be one of \{int64\}, got float32", "any"),
    ("min_p_rank", lambda a: a.update(m=a["m"][None]), SP + r": min_p must have 1 dimensions, got shape \(1, 3\)",
     "any"),
    ("temperature_value_negative", lambda a: _set(a, "t", 1, -2.0),
     SP + r": temperature\[1\] must be finite and >= 0, got -2", "cpu"),
    ("temperature_value_nan", lambda a: _set(a, "t", 0, float("nan")),
     SP + r": temperature\[0\] must be finite and >= 0, got nan", "cpu"),
    ("top_k_value_negative", lambda a: _set(a, "k", 2, -3), SP + r": top_k\[2\] must be >= 0, got -3", "cpu"),
    ("top_p_value_zero", lambda a: _set(a, "p", 0, 0.0), SP + r": top_p\[0\] must be in \(0, 1\], got 0", "cpu"),
    ("min_p_value_above_one", lambda a: _set(a, "m", 1, 1.5), SP + r": min_p\[1\] must be in \[0, 1\], got 1.5", "cpu"),
    ("temperature_device", lambda a: a.update(t=a["t"].cpu()),
     SP + r": temperature is on cpu but logits is on cuda:\d+; all tensors must be on one device", "cuda"),
]

test_bad_input = bad_input_test(
    verify_greedy=mutation_table(_greedy_args, _greedy_call, GREEDY_CASES),
    rejection_sample=mutation_table(_rej_args, _rej_call, REJ_CASES),
    verify_tree_greedy=mutation_table(_tree_args, _tree_greedy_call, TREE_GREEDY_CASES),
    verify_tree_rejection=mutation_table(_tree_args, _tree_rej_call, TREE_REJ_CASES),
    sampling_probs=mutation_table(_samp_args, _samp_call, SAMPLING_CASES),
    public=(_public_args, PUBLIC_CASES), public_values=(_values_args, VALUE_CASES))
