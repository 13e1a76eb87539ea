"""Distributed training of a Nemotron-H model on nemokernels: FSDP2 for the dense parts, expert
parallelism (all-to-all of latent rows) for the LatentMoE layers. One process per GPU (NCCL), or
per CPU process with gloo.

    torchrun --nproc_per_node 8 examples/train_distributed.py --size small --steps 200
    torchrun --nproc_per_node 2 examples/train_distributed.py --device cpu --steps 20   # CPU, gloo

Details: docs/distributed.md, section `examples/train_distributed.py`."""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist

# Before init_process_group (see nemokernels/distributed/__init__.py).
from nemokernels.distributed import full_state_dict, parallelize, shutdown
from nemokernels.models import NemotronHForCausalLM
from nemokernels.models.demo import SIZES, demo_config, stdlib_corpus


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--checkpoint-dir", default=None, help="start from this checkpoint (save_pretrained layout)")
    p.add_argument("--save-dir", default=None, help="rank 0 writes the trained model here")
    args = p.parse_args()

    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        train(args, use_cuda)
    except BaseException:
        dist.destroy_process_group()  # no barrier: another rank may never reach it
        raise
    # Every rank is past its last collective and holds no model, optimizer or graph: destroy the
    # process group while the interpreter is alive (its backend threads are joined here, not
    # left to interpreter shutdown, where they aborted the process now and then).
    shutdown()
    return 0


def train(args, use_cuda: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda" if use_cuda else "cpu")

    torch.manual_seed(0)  # identical initial weights on every rank
    if args.checkpoint_dir:
        model = NemotronHForCausalLM.from_pretrained(args.checkpoint_dir)
    else:
        model = NemotronHForCausalLM(demo_config(args.size, mtp_pattern="*E"))
    model.to(device)
    if model.config.n_routed_experts % world:
        raise SystemExit(f"n_routed_experts ({model.config.n_routed_experts}) must be divisible by the "
                         f"number of ranks ({world})")
    parallelize(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)

    data = stdlib_corpus()
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    n = data.numel() - args.seqlen - 1
    t0, tokens = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        starts = torch.randint(0, n, (args.batch,), generator=gen).tolist()
        ids = torch.stack([data[s:s + args.seqlen] for s in starts]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            out = model(ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        tokens += ids.numel() * world
        loss = out.lm_loss.detach().clone()
        dist.all_reduce(loss)
        if rank == 0 and (step % 10 == 0 or step == args.steps):
            print(f"step {step}/{args.steps} loss {loss.item() / world:.3f} "
                  f"{tokens / (time.perf_counter() - t0):,.0f} tok/s on {world} ranks", flush=True)

    state = full_state_dict(model)  # collective: every rank takes part
    if args.save_dir and rank == 0:
        plain = NemotronHForCausalLM(model.config)
        plain.load_state_dict(state)
        plain.save_pretrained(args.save_dir)
        print(f"saved to {args.save_dir}")


if __name__ == "__main__":
    raise SystemExit(main())
