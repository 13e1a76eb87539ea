"""Generation for NemotronHForCausalLM: plain (prefill, then one token per forward) and
speculative with the MTP head (docs/design.md section 4.4, 5).

Details: docs/models.md, section `nemokernels/models/generate.py`."""
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .. import speculative
from .layers import AttentionCache, MambaCache

__all__ = ["generate", "GenerateOutput"]


@dataclass
class GenerateOutput:
    sequences: torch.Tensor                       # (B, L + new) prompt then generated tokens
    stats: Dict[str, float] = field(default_factory=dict)
    step_logits: Optional[List[torch.Tensor]] = None  # plain decoding with return_logits: (B, V) per token


def _pick(logits: torch.Tensor, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): argmax at temperature 0, else a sample of the
    fused sampling transform."""
    if not temperature:
        return logits.argmax(-1)
    probs = speculative.sampling_probs(logits.float(), temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _commit(caches, num_kept: torch.Tensor, m_plus_1: int) -> None:
    for c in caches:
        if isinstance(c, MambaCache):
            c.commit(num_kept)
        elif isinstance(c, AttentionCache):
            c.commit(m_plus_1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, num_speculative_tokens: int = 0,
             eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             return_logits: bool = False, draft_fn=None, ssm_commit: str = "snapshots") -> GenerateOutput:
    """Generates ``max_new_tokens`` tokens after ``input_ids`` (B, L) (every row the same length).

    temperature 0: greedy; otherwise samples softmax(logits / temperature) restricted by top_k /
    top_p. ``num_speculative_tokens`` k > 0 drafts k tokens per round with the MTP head (the
    model needs MTP layers of attention / MoE / MLP kinds) and verifies them in one target
    forward. ``eos_token_id``: stop once every row has produced it. Returns the sequences and
    ``stats``: new_tokens, seconds, tokens_per_s (all rows), target_forwards, and with
    speculation drafted, accepted (by the verifier), kept (drafts committed: the batch keeps the
    shortest accepted prefix of each round), acceptance_rate (accepted / drafted),
    mean_accepted_per_round.
    ``draft_fn(tokens (B, n), k) -> (B, k)`` replaces the MTP drafter (greedy only; tests use
    it to force long accepted prefixes through the cache rollback).
    ``ssm_commit``: how a verify pass rolls the Mamba states forward: "snapshots" (the state
    after every draft position is written, the kept one copied: commit_state) or "replay" (no
    snapshots; the kept tokens are re-run from the old state: commit_state_replay). Both give
    the same states bit for bit; replay moves 3 state volumes per round instead of k + 4.
    """
    if ssm_commit not in ("snapshots", "replay"):
        raise ValueError(f"generate: ssm_commit must be 'snapshots' or 'replay', got {ssm_commit!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be (batch, seqlen) with seqlen >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    k = int(num_speculative_tokens)
    if k < 0:
        raise ValueError(f"generate: num_speculative_tokens must be >= 0, got {k}")
    if k > 0:
        if draft_fn is not None and temperature:
            raise ValueError("generate: draft_fn supports greedy decoding (temperature 0) only")
        if model.mtp is None and draft_fn is None:
            raise ValueError("generate: num_speculative_tokens > 0 needs MTP layers (config.num_nextn_predict_layers "
                             "= 0 for this model)")
        if model.mtp is not None and "mamba" in model.config.mtp_layers_block_type:
            raise ValueError("generate: speculative decoding supports MTP steps of attention / MoE / MLP blocks, "
                             f"got mtp pattern {model.config.mtp_hybrid_override_pattern!r}")
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        if k == 0:
            seq, stats, logits = _plain(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                        generator, return_logits)
        else:
            seq, stats = _speculative(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                      generator, k, draft_fn, ssm_commit == "replay")
            logits = None
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        dt = time.perf_counter() - t0
    finally:
        model.train(was_training)
    new = seq.shape[1] - input_ids.shape[1]
    stats.update(new_tokens=new, seconds=dt, tokens_per_s=seq.shape[0] * new / dt if dt > 0 else float("inf"))
    return GenerateOutput(sequences=seq, stats=stats, step_logits=logits)


def _new_caches(blocks):
    return [b.new_cache() for b in blocks]


def _done(tokens: List[torch.Tensor], eos) -> bool:
    if eos is None or not tokens:
        return False
    return bool((torch.cat(tokens, 1) == eos).any(1).all())


def _plain(model, ids, n_new, temperature, top_k, top_p, eos, generator, return_logits):
    caches = _new_caches(model.model.layers)
    out = model(ids, caches=caches, logits_to_keep=1)
    logits = out.logits[:, -1]
    toks: List[torch.Tensor] = []
    all_logits = [] if return_logits else None
    forwards = 1
    for i in range(n_new):
        if return_logits:
            all_logits.append(logits)
        tok = _pick(logits, temperature, top_k, top_p, generator)
        toks.append(tok[:, None])
        if i == n_new - 1 or _done(toks, eos):
            break
        logits = model(tok[:, None], caches=caches).logits[:, -1]
        forwards += 1
    seq = torch.cat([ids] + toks, 1)
    return seq, {"target_forwards": forwards}, all_logits


def _speculative(model, ids, n_new, temperature, top_k, top_p, eos, generator, k, draft_fn, replay=False):
    caches = _new_caches(model.model.layers)
    for c in caches:
        if isinstance(c, MambaCache):
            c.replay = replay
    mtp_caches = _new_caches(model.mtp.step_blocks(0)) if draft_fn is None else []
    embed = model.model.embeddings
    lm_head = model.lm_head
    sampling = bool(temperature)

    out = model(ids, caches=caches, logits_to_keep=1)   # hidden_states cover every position
    forwards = 1
    if n_new == 0:
        return ids, {"target_forwards": forwards, "drafted": 0, "accepted": 0, "kept": 0, "acceptance_rate": 0.0}
    last = _pick(out.logits[:, -1], temperature, top_k, top_p, generator)      # x_n (B,)
    toks = [last[:, None]]
    pend_tok = torch.cat([ids[:, 1:], last[:, None]], 1)                        # x_{t+1} for pending t
    pend_h = out.hidden_states                                                  # h_t for pending t
    drafted = accepted = kept = rounds = 0
    produced = 1
    while produced < n_new and not _done(toks, eos):
        k_eff = min(k, n_new - produced - 1)
        # 1. MTP: consume the committed positions, then draft k_eff tokens.
        drafts, qs = [], []
        if draft_fn is not None:
            if k_eff:
                drafts = list(draft_fn(torch.cat([ids] + toks, 1), k_eff).unbind(1))
            k_mtp = 0
        else:
            g = model.mtp(0, embed(pend_tok), pend_h, caches=mtp_caches)
            k_mtp = k_eff
        committed = [c.length if isinstance(c, AttentionCache) else None for c in mtp_caches]
        for j in range(k_mtp):
            d_logits = lm_head(g[:, -1]).float()
            if sampling:
                q = speculative.sampling_probs(d_logits, temperature, top_k, top_p)
                d = torch.multinomial(q, 1, generator=generator).squeeze(-1)
                qs.append(q)
            else:
                d = d_logits.argmax(-1)
            drafts.append(d)
            if j < k_mtp - 1:
                g = model.mtp(0, embed(d[:, None]), g[:, -1:], caches=mtp_caches)
        for c, n in zip(mtp_caches, committed):
            if n is not None:
                c.truncate(n)
        # 2. one target forward over [x_n, d_1..d_k].
        inp = torch.cat([last[:, None]] + [d[:, None] for d in drafts], 1)
        out = model(inp, caches=caches, verify=True)
        forwards += 1
        # 3. verification.
        if k_eff == 0:
            new = _pick(out.logits[:, 0], temperature, top_k, top_p, generator)[:, None]
            n_acc = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        else:
            dr = torch.stack(drafts, 1)
            if sampling:
                p = speculative.sampling_probs(out.logits, temperature, top_k, top_p)
                new, n_acc = speculative.rejection_sample(dr, torch.stack(qs, 1), p, generator=generator)
            else:
                new, n_acc = speculative.verify_greedy(dr, out.logits)
        m = int(n_acc.min())
        new = new[:, : m + 1]
        # 4. roll every cache to the kept prefix (positions x_n, d_1..d_m).
        _commit(caches, torch.full_like(n_acc, m + 1), m + 1)
        drafted += k_eff * ids.shape[0]
        accepted += int(n_acc.sum())
        kept += m * ids.shape[0]
        rounds += 1
        toks.append(new)
        produced += m + 1
        pend_tok = new
        pend_h = out.hidden_states[:, : m + 1]
        last = new[:, -1]
    seq = torch.cat([ids] + toks, 1)[:, : ids.shape[1] + n_new]
    stats = {"target_forwards": forwards, "drafted": drafted, "accepted": accepted, "kept": kept,
             "acceptance_rate": accepted / drafted if drafted else 0.0,
             "mean_accepted_per_round": accepted / (rounds * ids.shape[0]) if rounds else 0.0}
    return seq, stats
