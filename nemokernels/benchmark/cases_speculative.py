"""Speculative-verification cases (nemokernels.speculative) at the issue-6 points: batch 1..256,
k 1..8 drafts, vocab 131072 (Nemotron-H). Baselines: vectorised PyTorch (eager and compiled)
and flashinfer's chain speculative sampling when importable.

Bytes are the data each op must read: verify_greedy reads every logit of the k+1 positions;
rejection_sample reads, per request, the target and draft rows of the one position it samples
at (2 * V float32; the acceptance tests read k scalars of each); sampling_probs reads the
logits and writes float32 probabilities once (its extra passes run from L2 and are not counted).
"""
import torch

from nemokernels import speculative

from .harness import Case, lazy_compile

VOCAB = 131072
LOGIT_DTYPE = torch.bfloat16


def greedy_torch(drafts, logits):
    """Greedy verification in plain PyTorch: argmax, matched prefix length, padded output."""
    am = logits.argmax(-1)
    k = drafts.shape[1]
    num = (drafts == am[:, :k]).int().cumprod(1).sum(1)
    pos = torch.arange(k + 1, device=logits.device)
    return torch.where(pos <= num[:, None], am, -1), num


def rejection_torch(drafts, q, p):
    """Rejection sampling in plain PyTorch (Gumbel-max residual sampling, no host sync)."""
    b, k, v = q.shape
    px = p[:, :k].gather(2, drafts[..., None])[..., 0]
    qx = q.gather(2, drafts[..., None])[..., 0]
    u = torch.rand(b, k, device=p.device)
    acc = (u * qx < px) | (px >= qx)
    num = acc.int().cumprod(1).sum(1)
    rows = torch.arange(b, device=p.device)
    pm = p[rows, num]
    qm = q[rows, num.clamp_max(k - 1)] * (num < k)[:, None]
    w = (pm - qm).clamp_min(0)
    tok = (w / torch.empty_like(w).exponential_()).argmax(-1)
    pos = torch.arange(k + 1, device=p.device)
    padded = torch.cat([drafts, drafts[:, :1]], 1)
    out = torch.where(pos < num[:, None], padded, torch.where(pos == num[:, None], tok[:, None], -1))
    return out, num


def sampling_torch(logits, temperature, top_k, top_p):
    """softmax(logits / T) with top-k then top-p by a full sort (the usual PyTorch recipe)."""
    probs = torch.softmax(logits.float() / temperature, -1)
    vals, idx = probs.sort(-1, descending=True)
    cum = vals.cumsum(-1)
    keep = (torch.arange(probs.shape[-1], device=logits.device) < top_k) & ((cum - vals) < top_p * cum[..., top_k - 1: top_k])
    vals = torch.where(keep, vals, 0)
    out = torch.zeros_like(probs).scatter_(-1, idx, vals)
    return out / out.sum(-1, keepdim=True)


def _flashinfer_chain():
    try:
        import flashinfer  # noqa: PLC0415

        fn = flashinfer.sampling.chain_speculative_sampling
    except Exception:  # noqa: BLE001
        return None

    def run(drafts, q, p):
        return fn(q, drafts.int(), p)
    return run


def _dist(*shape, device):
    x = torch.rand(*shape, device=device)
    return x / x.sum(-1, keepdim=True)


def _greedy_maker(b, k, device):
    def make():
        logits = torch.randn(b, k + 1, VOCAB, device=device, dtype=LOGIT_DTYPE)
        drafts = logits[:, :k].argmax(-1)  # all accepted: the whole batch walks every position
        return drafts, logits
    return make


def _rejection_maker(b, k, device):
    def make():
        q = _dist(b, k, VOCAB, device=device)
        p = _dist(b, k + 1, VOCAB, device=device)
        drafts = torch.randint(0, VOCAB, (b, k), device=device)
        return drafts, q, p
    return make


def _sampling_maker(b, device):
    def make():
        return (torch.randn(b, VOCAB, device=device, dtype=LOGIT_DTYPE) * 3,)
    return make


def cases(quick: bool, device) -> list:
    greedy_pts = [(64, 4), (1, 4)] if quick else [(b, k) for b in (1, 8, 64, 256) for k in (1, 4, 8)]
    reject_pts = [(64, 4), (256, 4)] if quick else [(b, k) for b in (1, 8, 64, 256) for k in (1, 4, 8)]
    sample_pts = [64] if quick else [1, 8, 64, 256]
    if quick and torch.device(device).type != "cuda":  # CPU-sized: batch 8
        greedy_pts, reject_pts, sample_pts = [(8, 4)], [(8, 4)], [8]
    esize = torch.empty((), dtype=LOGIT_DTYPE).element_size()
    fi = _flashinfer_chain()
    out = []
    for b, k in greedy_pts:
        out.append(Case(
            op="speculative.verify_greedy", name=f"b{b} k{k} V{VOCAB}", make_inputs=_greedy_maker(b, k, device),
            fn=speculative.verify_greedy, bytes=b * (k + 1) * VOCAB * esize, flops=b * (k + 1) * VOCAB,
            baselines={"torch_eager": greedy_torch, "torch_compile": lazy_compile(greedy_torch)}))
    for b, k in reject_pts:
        base = {"torch_eager": rejection_torch, "torch_compile": lazy_compile(rejection_torch)}
        if fi is not None:
            base["flashinfer"] = fi
        out.append(Case(
            op="speculative.rejection_sample", name=f"b{b} k{k} V{VOCAB}", make_inputs=_rejection_maker(b, k, device),
            fn=lambda d, q, p: speculative.rejection_sample(d, q, p, seed=0), bytes=b * 2 * VOCAB * 4,
            flops=b * 2 * VOCAB, baselines=base))
    for b in sample_pts:
        def ours(logits):
            return speculative.sampling_probs(logits, temperature=0.7, top_k=50, top_p=0.9)

        def ref(logits):
            return sampling_torch(logits, 0.7, 50, 0.9)
        out.append(Case(
            op="speculative.sampling_probs", name=f"b{b} V{VOCAB} T0.7 k50 p0.9", make_inputs=_sampling_maker(b, device),
            fn=ours, bytes=b * VOCAB * (esize + 4), flops=5 * b * VOCAB,
            baselines={"torch_eager": ref, "torch_compile": lazy_compile(ref)}))
    return out
