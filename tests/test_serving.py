"""nemokernels.models.serving: MambaMixer.forward_packed against forward per sequence, packed
prefill + greedy decode against each request alone, input errors."""
import pytest
import torch

from nemokernels.models import NemotronHForCausalLM, decode_greedy, prefill_packed
from nemokernels.models.layers import MambaCache
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
