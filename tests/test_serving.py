"""nemokernels.models.serving: MambaMixer.forward_packed against forward per sequence, packed
prefill + greedy decode against each request alone, draft-tree verification through the model
against chain runs along each path, tree decode against greedy decode, input errors."""
import copy

import pytest
import torch

from nemokernels.models import NemotronHForCausalLM, decode_greedy, decode_tree_greedy, prefill_packed
from nemokernels.models.layers import AttentionCache, MambaCache

from helpers import tree_path
from test_models import V, assert_same_greedy, one_thread, perturb_, tiny  # noqa: F401 (one_thread: autouse)

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(4321)
    return perturb_(NemotronHForCausalLM(tiny("M*EM-", latent=16, initializer_range=0.2))).eval()


def _cache_after(mixer, prefix_len: int, D: int):
    """A MambaCache holding the states after a random prefix (None for prefix_len 0: a fresh one)."""
    c = MambaCache()
    if prefix_len:
        mixer(torch.randn(1, prefix_len, D), cache=c)
    return c


def _copy(c: MambaCache) -> MambaCache:
    d = MambaCache()
    if c.conv_state is not None:
        d.conv_state, d.ssm_state = c.conv_state.clone(), c.ssm_state.clone()
    return d


@torch.no_grad()
def test_forward_packed_equals_forward_per_sequence(model):
    """Lengths cross chunk (8) and conv (4) boundaries; a fresh request (zero states), a 1-token
    prompt with and without a cached prefix (the per-sequence forward then takes the decode step)."""
    mixer = model.model.layers[0].mixer
    D = model.config.hidden_size
    lens = [5, 1, 19, 1, 8]
    prefixes = [0, 0, 11, 6, 3]
    caches = [_cache_after(mixer, p, D) for p in prefixes]
    hidden = [torch.randn(1, n, D) for n in lens]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    conv = torch.stack([c.conv_state[0] if c.conv_state is not None else torch.zeros(mixer.conv_dim, 3)
                        for c in caches])
    ssm = torch.stack([c.ssm_state[0] if c.ssm_state is not None else torch.zeros(4, 8, 8) for c in caches])
    out, conv_f, ssm_f = mixer.forward_packed(torch.cat(hidden, 1), cu, conv, ssm)
    assert out.shape == (1, sum(lens), D) and conv_f.shape == conv.shape and ssm_f.shape == ssm.shape
    for s, (h, c) in enumerate(zip(hidden, caches)):
        ref = _copy(c)
        want = mixer(h, cache=ref)
        torch.testing.assert_close(out[:, cu[s]:cu[s + 1]], want, **TOL, msg=f"output of sequence {s}")
        torch.testing.assert_close(conv_f[s:s + 1], ref.conv_state, **TOL, msg=f"conv state of sequence {s}")
        torch.testing.assert_close(ssm_f[s:s + 1], ref.ssm_state, **TOL, msg=f"ssm state of sequence {s}")
    # no states given: every sequence from zero, as forward without a prefix
    out0, _, ssm0 = mixer.forward_packed(torch.cat(hidden, 1), cu)
    for s, h in enumerate(hidden):
        ref = MambaCache()
        torch.testing.assert_close(out0[:, cu[s]:cu[s + 1]], mixer(h, cache=ref), **TOL)
        torch.testing.assert_close(ssm0[s:s + 1], ref.ssm_state, **TOL)


@torch.no_grad()
def test_prefill_packed_then_decode_equals_each_alone(model):
    """Pattern M*EM-: Mamba, attention, MoE and MLP blocks. Requests: two with a cached prefix
    (one continued by a single token), one fresh; each continues greedily from its own cache."""
    prefixes = [torch.randint(0, V, (n,)) for n in (9, 0, 4)]
    conts = [torch.randint(0, V, (n,)) for n in (6, 13, 1)]
    caches = []
    for p in prefixes:
        if p.numel() == 0:
            caches.append(None)
            continue
        c = [b.new_cache() for b in model.model.layers]
        model(p[None], caches=c)
        caches.append(c)
    logits, caches = prefill_packed(model, conts, caches)
    assert logits.shape == (3, V) and len(caches) == 3
    for s, (p, q) in enumerate(zip(prefixes, conts)):
        full = torch.cat([p, q])[None]
        torch.testing.assert_close(logits[s], model(full).logits[0, -1], **TOL, msg=f"prefill logits of request {s}")
    n = 8
    got = decode_greedy(model, caches, logits.argmax(-1), n)
    for s, (p, q) in enumerate(zip(prefixes, conts)):
        full = torch.cat([p, q])[None]
        want = model.generate(full, n).sequences
        assert_same_greedy(model, torch.cat([full, got[s:s + 1]], 1), want)
    # the caches are the requests' own: one more step from request 1 matches a full recompute
    nxt = model(got[1:2, -1:], caches=caches[1]).logits[0, -1]
    full = torch.cat([prefixes[1], conts[1], got[1]])[None]
    torch.testing.assert_close(nxt, model(full).logits[0, -1], **TOL)


def test_prefill_packed_errors(model):
    p = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    with pytest.raises(ValueError, match=r"got 2 prompts but 1 caches"):
        prefill_packed(model, p, [None])
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty 1-D tensor"):
        prefill_packed(model, [p[0], torch.tensor([], dtype=torch.long)], [None, None])
    with pytest.raises(ValueError, match=r"caches\[0\] has 2 layer caches, the model has 5"):
        prefill_packed(model, p, [[None, None], None])


def test_serve_packed_example_runs():
    """examples/serve_packed.py on the CPU: its own check (packed == alone) passes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, str(root / "examples" / "serve_packed.py"), "--new-tokens", "4"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert sum(l.endswith(" same") for l in res.stdout.splitlines()) == 3 and "ok: every request" in res.stdout


# root 0; 1, 2 under it; 3, 4 under 1; 5 under 2; 6 under 3; 7 under 5
TREE = [-1, 0, 0, 1, 1, 2, 3, 5]


def _prefilled(model, n):
    c = [b.new_cache() for b in model.model.layers]
    model(torch.randint(0, V, (1, n)), caches=c)
    return c


@torch.no_grad()
def test_tree_verify_equals_chain_along_every_path(model):
    """One verify pass over a draft tree (pattern M*EM-): node t's logits equal a chain forward of
    its root-to-t path from the same caches, and committing to node t leaves every cache (conv,
    SSM, KV) as that chain run does."""
    caches = _prefilled(model, 11)
    cand = torch.randint(0, V, (1, len(TREE)))
    parents = torch.tensor([TREE])
    tree_caches = copy.deepcopy(caches)
    logits = model(cand, caches=tree_caches, parents=parents).logits
    assert logits.shape == (1, len(TREE), V)
    for t in range(len(TREE)):
        path = tree_path(TREE, t)
        chain = copy.deepcopy(caches)
        want = model(cand[:, path], caches=chain).logits[0, -1]
        torch.testing.assert_close(logits[0, t], want, **TOL, msg=f"logits of node {t} (path {path})")
        committed = copy.deepcopy(tree_caches)
        for lc in committed:
            if isinstance(lc, MambaCache):
                lc.commit_tree(torch.tensor([t]))
            elif isinstance(lc, AttentionCache):
                lc.commit_tree(torch.tensor([path]))
        for i, (a, b) in enumerate(zip(committed, chain)):
            if isinstance(a, MambaCache):
                torch.testing.assert_close(a.conv_state, b.conv_state, **TOL, msg=f"layer {i} conv, node {t}")
                torch.testing.assert_close(a.ssm_state, b.ssm_state, **TOL, msg=f"layer {i} ssm, node {t}")
            elif isinstance(a, AttentionCache):
                torch.testing.assert_close(a.k, b.k, **TOL, msg=f"layer {i} k, node {t}")
                torch.testing.assert_close(a.v, b.v, **TOL, msg=f"layer {i} v, node {t}")


def oracle_drafter(truth, seed=0):
    """Trees of shape TREE whose nodes are random tokens, except that a random root-to-leaf path
    carries the true continuation to a random depth (0-3): acceptance and rejection both happen."""
    g = torch.Generator().manual_seed(seed)

    def draft(r, emitted):
        cand = torch.randint(0, V, (len(TREE),), generator=g)
        leaf = [4, 6, 7][int(torch.randint(0, 3, (1,), generator=g))]
        depth = int(torch.randint(0, 4, (1,), generator=g))
        nxt = truth[r][emitted.numel():]
        for d, node in enumerate(tree_path(TREE, leaf)[1:depth + 1]):
            if d < nxt.numel():
                cand[node] = nxt[d]
        return cand, torch.tensor(TREE)
    return draft


@torch.no_grad()
def test_packed_prefill_then_tree_decode_equals_greedy(model):
    """Issue 20's end to end: three requests (two continuing cached states) prefilled packed, then
    decoded with draft trees; the tokens equal greedy decoding from the same caches (itself equal
    to each request alone, test above) with fewer target forwards."""
    prefixes = [7, 0, 3]
    conts = [torch.randint(0, V, (n,)) for n in (5, 12, 1)]
    caches = [(_prefilled(model, p) if p else None) for p in prefixes]
    logits, caches = prefill_packed(model, conts, caches)
    n = 12
    truth = decode_greedy(model, copy.deepcopy(caches), logits.argmax(-1), n)
    stats = {}
    got = decode_tree_greedy(model, caches, logits.argmax(-1), n, oracle_drafter(truth), stats=stats)
    assert torch.equal(got, truth)
    assert stats["accepted"] > 0, stats
    assert stats["forwards"] == 3 * (n - 1) - stats["accepted"], stats  # each forward emits 1 + its kept drafts


def test_tree_decode_errors(model):
    caches = [_prefilled(model, 3)]
    bad_root = lambda r, e: (torch.zeros(3, dtype=torch.long), torch.tensor([-1, -1, 0]))  # noqa: E731
    with pytest.raises(ValueError, match="node 0 as its only root"):
        decode_tree_greedy(model, caches, torch.tensor([1]), 4, bad_root)
    with pytest.raises(ValueError, match="needs caches"):
        model(torch.tensor([[1, 2]]), parents=torch.tensor([[-1, 0]]))
