"""Pure-PyTorch references of the verification ops (float64-capable, loops over requests):
the oracles of tests/speculative/test_speculative_verify.py and the `torch_eager` baselines of the benchmarks.

The sampling references take the random numbers as arguments (`accept_u`, `race_e`), so a
test can feed them the exact uniforms the kernels draw and compare token for token; without
them they draw from torch's generator and are only equal in distribution.
"""
from typing import Optional

import torch


def verify_greedy_ref(draft_token_ids, target_logits, num_draft_tokens=None):
    """(output_token_ids (B, k+1) padded with -1, num_accepted (B,)) by the docs/design.md section 4.4 rule."""
    b, k = draft_token_ids.shape
    argmax = target_logits.argmax(-1)  # (B, k+1), lowest index on ties
    out = torch.full((b, k + 1), -1, dtype=torch.int64, device=draft_token_ids.device)
    num = torch.zeros(b, dtype=torch.int64, device=draft_token_ids.device)
    for r in range(b):
        n = k if num_draft_tokens is None else int(num_draft_tokens[r])
        m = 0
        while m < n and int(draft_token_ids[r, m]) == int(argmax[r, m]):
            m += 1
        out[r, :m] = draft_token_ids[r, :m]
        out[r, m] = argmax[r, m]
        num[r] = m
    return out, num


def _race(w: torch.Tensor, e: Optional[torch.Tensor]) -> int:
    """A sample of w / sum(w): the exponential race argmin e_i / w_i (e ~ Exp(1)), or
    torch.multinomial when no exponentials are given. -1 when w is all zero."""
    if not (w > 0).any():
        return -1
    if e is None:  # negative entries (a residual p - q) weigh nothing, as in the race below
        return int(torch.multinomial(w.clamp_min(0).double(), 1))
    keys = torch.where(w > 0, e / w, torch.full_like(w, float("inf")))
    return int(keys.argmin())


def rejection_sample_ref(draft_token_ids, draft_probs, target_probs, num_draft_tokens=None,
                         accept_u=None, race_e=None):
    """Speculative rejection sampling (Leviathan et al. / Chen et al.) per request.

    draft_probs None means a greedy draft (q one-hot at the drafted token). accept_u (B, k) and
    race_e (B, k+1, V) are optional uniforms / Exp(1) draws; the race at the first rejected
    position m (or at n for the bonus token) uses race_e[b, m].
    """
    b, k = draft_token_ids.shape
    out = torch.full((b, k + 1), -1, dtype=torch.int64, device=draft_token_ids.device)
    num = torch.zeros(b, dtype=torch.int64, device=draft_token_ids.device)
    for r in range(b):
        n = k if num_draft_tokens is None else int(num_draft_tokens[r])
        m = n
        for j in range(n):
            x = int(draft_token_ids[r, j])
            p = float(target_probs[r, j, x])
            q = 1.0 if draft_probs is None else float(draft_probs[r, j, x])
            u = float(accept_u[r, j]) if accept_u is not None else float(torch.rand(()))
            if not (p >= q or u * q < p):
                m = j
                break
        e = None if race_e is None else race_e[r, m]
        p = target_probs[r, m]
        if m < n:
            if draft_probs is None:
                q = torch.zeros_like(p)
                q[int(draft_token_ids[r, m])] = 1
            else:
                q = draft_probs[r, m]
            tok = _race(p - q, e)
            if tok < 0:
                tok = _race(p, e)
        else:
            tok = _race(p, e)
        out[r, :m] = draft_token_ids[r, :m]
        out[r, m] = max(tok, 0)
        num[r] = m
    return out, num


def _tree_walk_outputs(candidate_ids, max_depth):
    """(b, n, max_depth, output_token_ids, accepted_node_indices, num_accepted) of a tree walk:
    max_depth defaults to n - 1; the outputs start as -1 padding and zero counts."""
    b, n = candidate_ids.shape
    max_depth = n - 1 if max_depth is None else max_depth
    out = torch.full((b, max_depth + 1), -1, dtype=torch.int64)
    nodes = torch.full((b, max_depth + 1), -1, dtype=torch.int64)
    return b, n, max_depth, out, nodes, torch.zeros(b, dtype=torch.int64)


def verify_tree_greedy_ref(candidate_ids, parents, target_logits, max_depth=None):
    """Greedy walk of a candidate tree: (output_token_ids, accepted_node_indices, num_accepted)."""
    b, n, max_depth, out, nodes, num = _tree_walk_outputs(candidate_ids, max_depth)
    argmax = target_logits.argmax(-1)
    for r in range(b):
        cur, depth = 0, 0
        while True:
            a = int(argmax[r, cur])
            out[r, depth], nodes[r, depth] = a, cur
            if depth == max_depth:
                break
            kids = [c for c in range(cur + 1, n) if int(parents[r, c]) == cur and int(candidate_ids[r, c]) == a]
            if not kids:
                break
            cur, depth = kids[0], depth + 1
        num[r] = depth
    return out, nodes, num


def verify_tree_rejection_ref(candidate_ids, parents, draft_probs, target_probs, max_depth=None):
    """Multi-draft recursive rejection sampling over a tree (SpecInfer): at each node try the
    children in index order, accept child token x with probability min(1, p(x) / q(x)), on
    rejection p <- normalise(max(0, p - q)); sample the final residual when all are rejected
    (or at a leaf / at max_depth). Random numbers from torch's generator (equal in distribution)."""
    b, n, max_depth, out, nodes, num = _tree_walk_outputs(candidate_ids, max_depth)
    for r in range(b):
        cur, depth = 0, 0
        while True:
            nodes[r, depth] = cur
            p = target_probs[r, cur].double()
            accepted = -1
            if depth < max_depth:
                for c in range(cur + 1, n):
                    if int(parents[r, c]) != cur:
                        continue
                    x = int(candidate_ids[r, c])
                    q = draft_probs[r, c].double()
                    if float(torch.rand(())) * float(q[x]) < float(p[x]) or p[x] >= q[x]:
                        accepted = c
                        break
                    resid = (p - q).clamp_min(0)
                    if resid.sum() <= 0:
                        break
                    p = resid / resid.sum()
            if accepted >= 0:
                out[r, depth] = candidate_ids[r, accepted]
                cur, depth = accepted, depth + 1
                continue
            out[r, depth] = int(torch.multinomial(p, 1))
            break
        num[r] = depth
    return out, nodes, num


def sampling_probs_ref(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """softmax(logits / T) restricted to top-k, then top-p (of the top-k mass), then min-p
    (relative to the largest probability), renormalised; T == 0 gives the one-hot argmax.
    Per-request parameters are (B,) tensors or scalars; ties at a threshold are all kept."""
    squeeze = logits.dim() == 2
    x = logits.unsqueeze(1) if squeeze else logits
    bsz, t, v = x.shape
    out = torch.zeros(bsz, t, v, dtype=torch.float64, device=logits.device)

    def per(val, r, default):
        if val is None:
            return default
        return float(val[r]) if torch.is_tensor(val) else float(val)

    for r in range(bsz):
        temp = per(temperature, r, 1.0)
        k = int(per(top_k, r, 0))
        pp = per(top_p, r, 1.0)
        mp = per(min_p, r, 0.0)
        for j in range(t):
            row = x[r, j].double()
            if temp <= 0:
                out[r, j, int(row.argmax())] = 1.0
                continue
            e = torch.exp((row - row.max()) / temp)
            keep = torch.ones(v, dtype=torch.bool, device=logits.device)
            if 0 < k < v:
                keep &= e >= torch.topk(e, k).values[-1]
            if pp < 1.0:
                ek = torch.where(keep, e, torch.zeros_like(e))
                s, _ = torch.sort(ek, descending=True)
                cum = torch.cumsum(s, 0)
                # smallest prefix whose mass reaches top_p of the kept mass; ties kept
                idx = int(torch.searchsorted(cum, pp * cum[-1]))
                idx = min(idx, v - 1)
                keep &= e >= s[idx]
            if mp > 0:
                keep &= e >= mp
            w = torch.where(keep, e, torch.zeros_like(e))
            out[r, j] = w / w.sum()
    return out.squeeze(1) if squeeze else out
