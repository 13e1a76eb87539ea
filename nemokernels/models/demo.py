"""`nemokernels demo`: train a small hybrid Mamba-2 / attention / MoE byte-level model with an
MTP head on the Python standard library's own .py files, then generate with and without MTP
speculation and report the acceptance rate and the speedup. A few minutes on 2 CPU cores.
"""
import argparse
import glob
import math
import os
import sys
import time
from typing import Optional

import torch

from .config import NemotronHConfig
from .model import NemotronHForCausalLM

SIZES = {
    # d, pattern, mamba heads x head dim, state, attention heads / kv, MoE experts / F / latent, MLP
    "tiny": dict(hidden_size=64, layers_block_type="M*EME-", mamba_num_heads=4, mamba_head_dim=32,
                 ssm_state_size=16, n_groups=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 n_routed_experts=4, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
                 moe_latent_size=32, intermediate_size=128, chunk_size=64),
    "small": dict(hidden_size=128, layers_block_type="M*EM-E", mamba_num_heads=8, mamba_head_dim=32,
                  ssm_state_size=32, n_groups=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  n_routed_experts=8, moe_intermediate_size=128, moe_shared_expert_intermediate_size=128,
                  moe_latent_size=64, intermediate_size=256, chunk_size=64),
}


def demo_config(size: str, mtp_pattern: str = "*-") -> NemotronHConfig:
    if size not in SIZES:
        raise ValueError(f"demo: --size must be one of {sorted(SIZES)}, got {size!r}")
    return NemotronHConfig(vocab_size=256, num_experts_per_tok=2, n_group=1, topk_group=1, conv_kernel=4,
                           num_nextn_predict_layers=1, mtp_layers_block_type=mtp_pattern, mtp_loss_weight=0.3,
                           initializer_range=0.02, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                           **SIZES[size])


def stdlib_corpus(max_bytes: int = 4 << 20) -> torch.Tensor:
    """The stdlib's .py files as one uint8 tensor (bytes are the tokens)."""
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    chunks, total = [], 0
    for f in files:
        with open(f, "rb") as fh:
            b = fh.read()
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    data = b"\n".join(chunks)
    if len(data) < 10000:
        raise RuntimeError(f"demo: found too little Python source under {root}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)


def _bar(frac: float, width: int = 24) -> str:
    n = int(round(frac * width))
    return "#" * n + "." * (width - n)


def apply_nvfp4(model, out=None):
    """NVFP4 training recipe on the demo model. NVIDIA's default keeps the first 2 and last 8
    blocks in BF16, which is every block of a 6-layer demo model; here only the first and the
    last block stay in BF16 (plus the LM head, embeddings and MTP, as always)."""
    from nemokernels.nvfp4 import NVFP4Linear, NVFP4Recipe, convert_to_nvfp4

    model = convert_to_nvfp4(model, NVFP4Recipe(bf16_first_layers=1, bf16_last_layers=1))
    n = sum(isinstance(m, NVFP4Linear) for m in model.modules())
    (out or sys.stdout).write(f"  nvfp4: {n} linear layers in NVFP4 (first/last block, lm_head, embeddings, MTP in BF16)\n")
    return model


def train(model, data: torch.Tensor, steps: int, batch: int, seqlen: int, lr: float, device, out=None,
          log_every: int = 10, generator: Optional[torch.Generator] = None):
    out = out or sys.stdout  # looked up per call: a default bound at import would outlive a redirected stdout
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    n = data.numel() - seqlen - 1
    model.train()
    t0 = time.perf_counter()
    tokens = 0
    loss_ema = None
    for step in range(1, steps + 1):
        cur_lr = lr * min(1.0, step / max(1, steps // 10)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        starts = torch.randint(0, n, (batch,), generator=generator)
        ids = torch.stack([data[s:s + seqlen] for s in starts.tolist()]).to(device)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                res = model(ids, labels=ids)
        else:
            res = model(ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids.numel()
        lv = res.lm_loss.item()
        loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
        if step % log_every == 0 or step == steps:
            dt = time.perf_counter() - t0
            mtp = f" mtp {res.mtp_loss.item():.3f}" if res.mtp_loss is not None else ""
            out.write(f"\r  train [{_bar(step / steps)}] {step}/{steps} loss {loss_ema:.3f}{mtp} "
                      f"({loss_ema / math.log(2):.2f} bits/byte) {tokens / dt:,.0f} tok/s")
            out.flush()
    if steps:
        out.write("\n")
    return loss_ema


def main(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        # tiny models are op-overhead bound; a second OpenMP thread only helps on an idle machine
        torch.set_num_threads(1)
    ckpt = args.checkpoint_dir
    loaded = bool(ckpt) and os.path.isfile(os.path.join(ckpt, "config.json"))
    if loaded:
        print(f"loading {ckpt}")
        model = NemotronHForCausalLM.from_pretrained(ckpt).to(device)
    else:
        model = NemotronHForCausalLM(demo_config(args.size)).to(device)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: byte-level NemotronH, pattern {cfg.hybrid_override_pattern} + MTP {cfg.mtp_hybrid_override_pattern}, "
          f"d {cfg.hidden_size}, {n_params / 1e6:.2f}M parameters, device {device}")
    if args.nvfp4:
        model = apply_nvfp4(model)
    data = stdlib_corpus()
    print(f"data: {data.numel() / 1e6:.1f} MB of the Python stdlib's .py files")
    if args.steps:
        train(model, data, args.steps, args.batch, args.seqlen, args.lr, device)
    if ckpt and (args.steps or not loaded):
        model.save_pretrained(ckpt)
        print(f"saved {ckpt}")
    prompt_text = args.prompt.encode()
    prompt = torch.tensor([list(prompt_text)], dtype=torch.long, device=device)
    model.eval()
    model.generate(prompt, 4)  # warm-up
    model.generate(prompt, 4, num_speculative_tokens=1)
    plain = model.generate(prompt, args.new_tokens)
    text = bytes(plain.sequences[0].tolist()).decode("utf-8", errors="replace")
    print("sample (greedy):\n" + "-" * 60 + "\n" + text + "\n" + "-" * 60)
    print(f"plain greedy:        {plain.stats['tokens_per_s']:8.1f} tok/s, {plain.stats['target_forwards']} forwards")
    for k in args.spec_k:
        spec = model.generate(prompt, args.new_tokens, num_speculative_tokens=k)
        same = torch.equal(spec.sequences, plain.sequences)
        st = spec.stats
        print(f"MTP speculative k={k}: {st['tokens_per_s']:8.1f} tok/s, {st['target_forwards']} forwards, "
              f"acceptance {st['acceptance_rate']:.0%}, speedup {st['tokens_per_s'] / plain.stats['tokens_per_s']:.2f}x, "
              f"{'identical to' if same else 'differs from (an argmax near-tie?)'} plain greedy")
    # sampling: rejection sampling keeps the target's distribution
    g = torch.Generator(device=device).manual_seed(args.seed)
    k = max(args.spec_k)
    ps = model.generate(prompt, args.new_tokens, temperature=args.temperature, top_k=args.top_k, generator=g)
    ss = model.generate(prompt, args.new_tokens, temperature=args.temperature, top_k=args.top_k,
                        num_speculative_tokens=k, generator=g)
    text = bytes(ss.sequences[0].tolist()).decode("utf-8", errors="replace")
    print(f"sample (temperature {args.temperature}, top-k {args.top_k}, MTP k={k}):\n" + "-" * 60 + "\n" + text
          + "\n" + "-" * 60)
    st = ss.stats
    print(f"sampling: plain {ps.stats['tokens_per_s']:.1f} tok/s, MTP k={k} {st['tokens_per_s']:.1f} tok/s, "
          f"acceptance {st['acceptance_rate']:.0%}, speedup {st['tokens_per_s'] / ps.stats['tokens_per_s']:.2f}x")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="training steps (0: only generate)")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="model size preset")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--nvfp4", action="store_true", help="train with NVFP4 linears (nemokernels.nvfp4)")
    p.add_argument("--checkpoint-dir", default=None, help="load from here when it holds a checkpoint; save here")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--spec-k", type=int, nargs="+", default=[2, 3], help="draft lengths to compare")
    p.add_argument("--prompt", default="import os\n\n\nclass ")
    p.add_argument("--temperature", type=float, default=0.8, help="for the sampled generation")
    p.add_argument("--top-k", type=int, default=40, help="for the sampled generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: 1 on the CPU, torch's default otherwise)")
