"""Serving for NemotronHForCausalLM: packed prefill of several requests in one row, each from its
own cache (Mamba blocks through the packed conv and scan, attention per request), then greedy
decode per request from its cache, token by token or verifying draft trees (docs/models.md)."""
from typing import List, Optional, Sequence

import torch

from .. import speculative
from .layers import AttentionCache, MambaCache

__all__ = ["prefill_packed", "decode_greedy", "decode_tree_greedy"]


def _check_caches(model, caches: Sequence[Optional[list]]) -> List[list]:
    """A per-layer cache list for every request (fresh where None), each holding batch-1 states."""
    blocks = model.model.layers
    out = []
    for r, c in enumerate(caches):
        if c is None:
            out.append([b.new_cache() for b in blocks])
            continue
        if len(c) != len(blocks):
            raise ValueError(f"prefill_packed: caches[{r}] has {len(c)} layer caches, the model has {len(blocks)} "
                             "layers")
        for i, (b, lc) in enumerate(zip(blocks, c)):
            want = {"mamba": MambaCache, "attention": AttentionCache}.get(b.kind)
            if (want is None) != (lc is None) or (want is not None and not isinstance(lc, want)):
                raise ValueError(f"prefill_packed: caches[{r}][{i}] is {type(lc).__name__}, layer {i} "
                                 f"({b.kind}) needs {'None' if want is None else want.__name__}")
            st = lc.conv_state if isinstance(lc, MambaCache) else getattr(lc, "k", None)
            if st is not None and st.shape[0] != 1:
                raise ValueError(f"prefill_packed: caches[{r}][{i}] holds batch {st.shape[0]}, requests need batch 1")
        out.append(list(c))
    return out


@torch.no_grad()
def prefill_packed(model, prompts: Sequence[torch.Tensor], caches: Optional[Sequence[Optional[list]]] = None):
    """Prefills S requests in one forward: ``prompts`` S 1-D LongTensors (each at least one
    token), ``caches`` one per request: a per-layer cache list as ``generate`` uses (``[blk.new_cache()
    for blk in model.model.layers]``, batch 1) holding the request's earlier tokens, or None for
    a fresh request (default: all fresh). The prompts are embedded as one row; Mamba blocks run
    MambaMixer.forward_packed from the requests' stacked states, attention blocks run per request
    on its slice with its own KV cache, MLP / MoE blocks on the whole row. Returns the logits
    after each request's last token (S, vocab) float32 and the caches (the given ones updated in
    place, new ones for None), ready for decode_greedy or model(tokens, caches=caches[s])."""
    if caches is None:
        caches = [None] * len(prompts)
    if len(prompts) != len(caches):
        raise ValueError(f"prefill_packed: got {len(prompts)} prompts but {len(caches)} caches (one cache list, or "
                         "None, per prompt)")
    if len(prompts) == 0:
        raise ValueError("prefill_packed: no prompts")
    for r, p in enumerate(prompts):
        if p.dim() != 1 or p.numel() == 0:
            raise ValueError(f"prefill_packed: prompts[{r}] must be a non-empty 1-D tensor, got shape "
                             f"{tuple(p.shape)}")
    caches = _check_caches(model, caches)
    dev = model.lm_head.weight.device
    lens = torch.tensor([p.numel() for p in prompts], dtype=torch.int64)
    cu_list = [0] + torch.cumsum(lens, 0).tolist()
    cu = torch.tensor(cu_list, dtype=torch.int32, device=dev)
    ids = torch.cat([p.to(dev) for p in prompts])[None]                        # (1, T)

    backbone = model.model
    x = backbone.embeddings(ids)
    for i, blk in enumerate(backbone.layers):
        if blk.kind == "mamba":
            mc = [c[i] for c in caches]
            conv = ssm = None
            if any(c.conv_state is not None for c in mc):
                m = blk.mixer
                conv = torch.stack([c.conv_state[0] if c.conv_state is not None else
                                    x.new_zeros(m.conv_dim, m.conv_kernel_size - 1) for c in mc])
                ssm = torch.stack([c.ssm_state[0] if c.ssm_state is not None else
                                   torch.zeros(m.num_heads, m.head_dim, m.ssm_state_size, device=dev) for c in mc])
            h, conv_final, ssm_final = blk.mixer.forward_packed(blk.norm(x), cu, conv, ssm)
            for s, c in enumerate(mc):
                c.conv_state = conv_final[s:s + 1].clone()
                c.ssm_state = ssm_final[s:s + 1].clone()
                c.pending = None
            x = x + h
        elif blk.kind == "attention":
            h = blk.norm(x)
            h = torch.cat([blk.mixer(h[:, cu_list[s]:cu_list[s + 1]], cache=c[i]) for s, c in enumerate(caches)], 1)
            x = x + h
        else:
            x = blk(x)
    h = backbone.norm_f(x)
    last = torch.tensor(cu_list[1:], device=dev) - 1
    logits = model.lm_head(h[0, last]).float()
    return logits, caches


@torch.no_grad()
def decode_greedy(model, caches: Sequence[list], first_tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation of S prefilled requests, each from its own cache (batch 1 each):
    ``first_tokens`` (S,) the token after each prompt (e.g. prefill_packed's logits.argmax(-1)).
    Returns (S, n): first_tokens, then n - 1 tokens decoded one forward at a time, the
    sequence generate(prompt, max_new_tokens=n) produces; the caches advance past all but the
    last token, as in generate."""
    if len(caches) != first_tokens.numel():
        raise ValueError(f"decode_greedy: {len(caches)} caches but {first_tokens.numel()} first tokens")
    if n < 1:
        raise ValueError(f"decode_greedy: n must be >= 1, got {n}")
    out = []
    for c, tok in zip(caches, first_tokens.reshape(-1)):
        toks = [tok.reshape(1, 1)]
        for _ in range(n - 1):
            toks.append(model(toks[-1], caches=c).logits[:, -1].argmax(-1, keepdim=True))
        out.append(torch.cat(toks, 1))
    return torch.cat(out, 0)


@torch.no_grad()
def decode_tree_greedy(model, caches: Sequence[list], first_tokens: torch.Tensor, n: int, draft_tree_fn,
                       stats: Optional[dict] = None) -> torch.Tensor:
    """decode_greedy with draft trees: the same (S, n) tokens, fewer target forwards when drafts
    are accepted. Per request and round, ``draft_tree_fn(s, tokens (m,)) -> (candidates (T,),
    parents (T,))`` proposes a tree whose node 0 is the root (its token is replaced by the last
    emitted one; parents -1 there, parents precede children). One target forward verifies every
    node (Mamba blocks follow the tree through selective_state_update_multi and
    causal_conv1d_update with parents, attention sees each node's own path),
    verify_tree_greedy picks the longest matching path, and every cache commits to its last node
    (commit_state / commit_conv_state with accepted_node, the path's KV entries). ``stats``, if
    given, receives forwards and accepted (draft tokens kept), summed over requests."""
    if len(caches) != first_tokens.numel():
        raise ValueError(f"decode_tree_greedy: {len(caches)} caches but {first_tokens.numel()} first tokens")
    if n < 1:
        raise ValueError(f"decode_tree_greedy: n must be >= 1, got {n}")
    forwards = accepted = 0
    out = []
    for r, (c, tok) in enumerate(zip(caches, first_tokens.reshape(-1))):
        toks = [tok.reshape(1)]
        while sum(t.numel() for t in toks) < n:
            emitted = torch.cat(toks)
            cand, parents = draft_tree_fn(r, emitted)
            cand = cand.reshape(1, -1).clone()
            parents = parents.reshape(1, -1).to(cand.device)
            if parents[0, 0] != -1 or bool((parents[0, 1:] < 0).any()):
                raise ValueError("decode_tree_greedy: the draft tree needs node 0 as its only root")
            cand[0, 0] = emitted[-1]
            logits = model(cand, caches=c, parents=parents).logits
            forwards += 1
            out_tok, nodes, n_acc = speculative.verify_tree_greedy(cand, parents, logits)
            m = min(int(n_acc[0]), n - emitted.numel() - 1)   # keep within the budget
            for lc in c:
                if isinstance(lc, MambaCache):
                    lc.commit_tree(nodes[:, m])
                elif isinstance(lc, AttentionCache):
                    lc.commit_tree(nodes[:, : m + 1])
            accepted += m
            toks.append(out_tok[0, : m + 1])
        out.append(torch.cat(toks)[:n])
    if stats is not None:
        stats.update(forwards=forwards, accepted=accepted)
    return torch.stack(out, 0)
