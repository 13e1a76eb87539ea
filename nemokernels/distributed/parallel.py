"""Data-parallel (FSDP2) plus expert-parallel training of the model package.

Details: docs/distributed.md, section `nemokernels/distributed/parallel.py`."""
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..moe.layer import LatentMoE
from .expert_parallel import ExpertParallelLatentMoE


def _blocks(model: nn.Module):
    blocks = list(model.model.layers)
    if getattr(model, "mtp", None) is not None:
        blocks += list(model.mtp.layers)
    return blocks


def _sharded_units(model: nn.Module):
    """Blocks that get their own FSDP unit: the backbone's. The MTP blocks' norms and eh_proj are
    used outside the blocks' forward (MTP.forward), so they stay in the root unit."""
    return list(model.model.layers)


def parallelize(model: nn.Module, mesh=None, *, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 for the dense parts, expert parallelism for the MoE layers (in place; returns model).

    model: a nemokernels.models.NemotronHForCausalLM with the same weights on every rank (same
    seed or the same checkpoint). mesh: a 1-D DeviceMesh (default: all ranks, on the model's
    device type)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("parallelize: torch.distributed is not initialised")
    if mesh is None:
        dev = next(model.parameters()).device.type
        mesh = init_device_mesh(dev, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"parallelize: expected a 1-D device mesh, got {mesh.ndim} dimensions")
    group = mesh.get_group()
    world = dist.get_world_size(group)

    expert_params = set()
    for blk in _blocks(model):
        if type(blk.mixer) is LatentMoE:  # not an ExpertParallelLatentMoE (a subclass) already
            blk.mixer = ExpertParallelLatentMoE.from_dense(blk.mixer, group=group)
        if isinstance(blk.mixer, ExpertParallelLatentMoE):
            for p in blk.mixer.experts.parameters():
                expert_params.add(p)
                p.register_hook(lambda g: g / world)

    for blk in _sharded_units(model):
        mine = {p for p in blk.parameters() if p in expert_params}
        fully_shard(blk, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=mine or None)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=expert_params or None)
    return model


def full_state_dict(model: nn.Module, group: Optional[dist.ProcessGroup] = None):
    """The unsharded checkpoint state on every rank: FSDP shards gathered, expert shards
    all-gathered back to (E, ...) in the LatentMoE names."""
    state = {}
    for name, t in model.state_dict().items():
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        state[name] = t
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelLatentMoE):
            for pname in ("up_proj", "down_proj"):
                local = getattr(mod.experts, pname).detach().contiguous()
                parts = [torch.empty_like(local) for _ in range(mod.world)]
                dist.all_gather(parts, local, group=mod.group)
                state[f"{mod_name}.experts.{pname}"] = torch.cat(parts, 0)
    return state
