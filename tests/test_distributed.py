"""Expert parallelism with real process groups (gloo on CPU, spawned here): the sharded layer
equals the single-process LatentMoE in forward and in every gradient."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import rel_err

from nemokernels.moe import LatentMoE

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args):
    port = _free_port()
    mp.spawn(fn, args=(world, port, *args), nprocs=world, join=True)


def _init(rank, world, port):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


CFG = dict(hidden_size=24, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=20,
           moe_shared_expert_intermediate_size=16, moe_latent_size=12, n_group=2, topk_group=2,
           routed_scaling_factor=2.5)


def _layer(seed, cfg, routing):
    torch.manual_seed(seed)
    layer = LatentMoE(**cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dtype != torch.float32:
                p.normal_(0, 0.3)
        if routing == "rank0":      # every token to experts owned by rank 0 only
            layer.gate.e_score_correction_bias[: cfg["num_experts_per_tok"]] = 100.0
        elif routing == "skewed":   # most choices on the last rank's experts
            layer.gate.e_score_correction_bias[-cfg["num_experts_per_tok"]:] = 0.3
    return layer


def _check_ep(seed, routing, tokens_per_rank, cfg):
    from nemokernels.distributed import ExpertParallelLatentMoE
    rank = dist.get_rank()
    dense = _layer(seed, cfg, routing)
    torch.manual_seed(seed + 1)
    sizes = tokens_per_rank
    x_all = torch.randn(sum(sizes), cfg["hidden_size"], dtype=torch.float32)
    dy_all = torch.randn_like(x_all)
    lo = sum(sizes[:rank])
    x = x_all[lo:lo + sizes[rank]].clone().requires_grad_()

    ep = ExpertParallelLatentMoE.from_dense(dense, group=None)
    y = ep(x)
    y.backward(dy_all[lo:lo + sizes[rank]])

    xr = x_all.clone().requires_grad_()
    yr = dense(xr)
    yr.backward(dy_all)

    assert torch.isfinite(y).all()
    if sizes[rank]:
        assert rel_err(y, yr[lo:lo + sizes[rank]]) < 1e-5
        assert rel_err(x.grad, xr.grad[lo:lo + sizes[rank]]) < 1e-5
    e0, e1 = ep.first_expert, ep.first_expert + ep.local_experts
    for name in ("up_proj", "down_proj"):
        g, gr = getattr(ep.experts, name).grad, getattr(dense.experts, name).grad[e0:e1]
        assert g is not None
        assert rel_err(g, gr) < 1e-5 if gr.abs().sum() > 0 else g.abs().sum() == 0
    # Replicated parameters: this rank's contribution; summed over ranks it is the full gradient.
    dense_params = dict(dense.named_parameters())
    for name, p in ep.named_parameters():
        if name.startswith("experts."):
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        assert rel_err(g, dense_params[name].grad) < 1e-5, name
    # The wire carries latent rows (model-width ones without a latent projection): bytes sent = rows x latent size x itemsize.
    width = cfg["moe_latent_size"] or cfg["hidden_size"]
    assert ep.last_bytes_sent == sizes[rank] * cfg["num_experts_per_tok"] * width * 4


def _run_scenarios(rank, world, port, seed, scenarios):
    _init(rank, world, port)
    try:
        for i, (routing, sizes, cfg) in enumerate(scenarios):
            _check_ep(seed + 7 * i, routing, sizes, cfg)
        if world == 2:
            from nemokernels.distributed import ExpertParallelLatentMoE
            with pytest.raises(ValueError, match="divisible by the expert-parallel group size"):
                ExpertParallelLatentMoE(hidden_size=8, n_routed_experts=3, num_experts_per_tok=1,
                                        moe_intermediate_size=4)
    finally:
        dist.destroy_process_group()


NO_LATENT = dict(CFG, moe_latent_size=None, moe_shared_expert_intermediate_size=None, n_group=1, topk_group=1)


# One spawn per world size (process start-up dominates); scenarios run in sequence inside it.
@pytest.mark.parametrize("world,scenarios", [
    (2, [("uniform", [7, 5], CFG),
         ("rank0", [6, 9], CFG),            # rank 1's experts receive no tokens
         ("uniform", [5, 5], NO_LATENT)]),  # model-width rows on the wire
    (4, [("skewed", [5, 0, 8, 3], CFG),     # rank 1 holds no tokens at all
         ("uniform", [4, 4, 4, 4], CFG)]),
], ids=["2ranks", "4ranks"])
def test_expert_parallel_matches_single_process(world, scenarios, fresh_seed):
    _spawn(_run_scenarios, world, fresh_seed, scenarios)


def test_expert_parallel_needs_process_group():
    from nemokernels.distributed import ExpertParallelLatentMoE
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        ExpertParallelLatentMoE(hidden_size=8, n_routed_experts=4, num_experts_per_tok=1, moe_intermediate_size=4)
