"""Packed prefill for serving: three requests, each with a cache from an earlier prefix, have
their continuations prefilled in one packed forward (prefill_packed), then decode greedily
from their own caches, token by token and with draft trees verified in one forward each
(decode_tree_greedy); the tokens are checked against each full prompt generated alone.

The draft trees here come from a stand-in drafter: random trees in which one random path
carries the true continuation to a random depth (taken from the token-by-token run), so that
both acceptance and rejection happen. A real server drafts with the MTP head or a draft model.

    python examples/serve_packed.py                 # a random tiny demo model, a few seconds on CPU
    python examples/serve_packed.py --device cuda"""
import argparse
import copy
import time

import torch

from nemokernels.models import NemotronHForCausalLM, decode_greedy, decode_tree_greedy, prefill_packed
from nemokernels.models.demo import demo_config


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # a tiny model is op overhead: more threads only oversubscribe
    model = NemotronHForCausalLM(demo_config(args.size)).to(dev).eval()
    V = model.config.vocab_size
    print(f"model: {args.size}, layers {model.config.hybrid_override_pattern}, device {dev}")

    # each request: an earlier prefix (prefilled alone into its cache), then a new continuation
    prefix_lens, cont_lens = [37, 5, 90], [12, 70, 1]
    prefixes = [torch.randint(0, V, (n,), device=dev) for n in prefix_lens]
    conts = [torch.randint(0, V, (n,), device=dev) for n in cont_lens]
    caches = []
    with torch.no_grad():
        for pre in prefixes:
            c = [b.new_cache() for b in model.model.layers]
            model(pre[None], caches=c)
            caches.append(c)

    t0 = time.perf_counter()
    logits, caches = prefill_packed(model, conts, caches)
    first = logits.argmax(-1)
    tree_caches = copy.deepcopy(caches)
    tokens = decode_greedy(model, caches, first, args.new_tokens)
    dt = time.perf_counter() - t0
    print(f"packed prefill of {sum(cont_lens)} tokens ({len(conts)} requests) + {args.new_tokens} greedy tokens "
          f"each: {dt * 1e3:.1f} ms")

    # the same decode with draft trees (root, 2 children, then 3 grandchildren, 2 leaves below)
    tree = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 5], device=dev)
    g = torch.Generator(device="cpu").manual_seed(args.seed)

    def draft(r, emitted):
        cand = torch.randint(0, V, (tree.numel(),), generator=g).to(dev)
        node, path = [4, 6, 7][int(torch.randint(0, 3, (1,), generator=g))], []
        while node > 0:
            path.append(node)
            node = int(tree[node])
        depth = int(torch.randint(0, 4, (1,), generator=g))
        truth = tokens[r, emitted.numel():]
        for d, nd in enumerate(reversed(path)):
            if d < min(depth, truth.numel()):
                cand[nd] = truth[d]
        return cand, tree

    stats = {}
    tree_tokens = decode_tree_greedy(model, tree_caches, first, args.new_tokens, draft, stats=stats)
    print(f"tree decode: {stats['forwards']} target forwards for {len(conts) * (args.new_tokens - 1)} tokens "
          f"({stats['accepted']} drafted tokens accepted); same tokens as token by token: "
          f"{torch.equal(tree_tokens, tokens)}")
    assert torch.equal(tree_tokens, tokens), "tree decode differs from token-by-token decode"

    ok = True
    for s, (pre, cont) in enumerate(zip(prefixes, conts)):
        full = torch.cat([pre, cont])[None]
        alone = model.generate(full, args.new_tokens).sequences[0, full.shape[1]:]
        same = torch.equal(tokens[s], alone)
        ok &= same
        print(f"request {s}: prefix {pre.numel():3d} + continuation {cont.numel():3d} tokens -> "
              f"packed {tokens[s].tolist()}  alone {alone.tolist()}  {'same' if same else 'DIFFERENT'}")
    assert ok, "packed prefill + decode differs from generating each request alone"
    print("ok: every request decodes the same tokens as its full prompt generated alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
