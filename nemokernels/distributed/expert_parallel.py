"""Expert parallelism for LatentMoE over torch.distributed (docs/distributed.md).

Details: docs/distributed.md, section `nemokernels/distributed/expert_parallel.py`."""
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ..moe.layer import LatentMoE, expert_mlp


def _all_to_all(x: torch.Tensor, out_splits: list, in_splits: list, group) -> torch.Tensor:
    """Differentiable variable-split all-to-all along dim 0 (backward: the reverse exchange)."""
    y = funcol.all_to_all_single_autograd(x, out_splits, in_splits, group)
    return funcol.wait_tensor(y)


class ExpertParallelLatentMoE(LatentMoE):
    """LatentMoE with its routed experts sharded over `group` (default: the world).

    Parameter names follow LatentMoE / the checkpoint (gate.weight, gate.e_score_correction_bias,
    experts.up_proj, experts.down_proj, fc1_latent_proj, fc2_latent_proj, shared_experts.*), with
    experts.* holding only this rank's E/W experts (global ids first_expert .. first_expert+E/W-1).
    Build it with `from_dense(layer, group)` to shard a LatentMoE, or like LatentMoE from a config.
    """

    def __init__(self, hidden_size: int, n_routed_experts: int, num_experts_per_tok: int, moe_intermediate_size: int,
                 moe_shared_expert_intermediate_size: Optional[int] = None, moe_latent_size: Optional[int] = None,
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, mlp_bias: bool = False, dtype=None, device=None,
                 group: Optional[dist.ProcessGroup] = None):
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelLatentMoE: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        group = group if group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if n_routed_experts % world != 0:
            raise ValueError(f"ExpertParallelLatentMoE: n_routed_experts ({n_routed_experts}) must be divisible by "
                             f"the expert-parallel group size ({world})")
        super().__init__(hidden_size, n_routed_experts, num_experts_per_tok, moe_intermediate_size,
                         moe_shared_expert_intermediate_size, moe_latent_size, n_group, topk_group, norm_topk_prob,
                         routed_scaling_factor, mlp_bias, dtype=dtype, device=device,
                         pad_to=1, num_local_experts=n_routed_experts // world)
        self.group, self.world, self.rank = group, world, dist.get_rank(group)
        self.local_experts = n_routed_experts // world
        self.first_expert = self.rank * self.local_experts
        self.last_bytes_sent = 0  # rows x width x itemsize of the last forward's dispatch (stats)

    @classmethod
    def from_dense(cls, layer: LatentMoE, group: Optional[dist.ProcessGroup] = None) -> "ExpertParallelLatentMoE":
        """Shard a LatentMoE (same weights on every rank): keep this rank's experts, copy the rest."""
        up = layer.experts.up_proj
        lat = layer.fc1_latent_proj.out_features if layer.fc1_latent_proj is not None else None
        sh = layer.shared_experts
        ep = cls(layer.hidden_size, layer.num_experts, layer.top_k, up.shape[1],
                 sh.up_proj.out_features if sh is not None else None, lat, layer.n_group, layer.topk_group,
                 layer.norm_topk_prob, layer.routed_scaling_factor,
                 mlp_bias=sh.up_proj.bias is not None if sh is not None else False,
                 dtype=up.dtype, device=up.device, group=group)
        state = {k: v for k, v in layer.state_dict().items() if not k.startswith("experts.")}
        lo, hi = ep.first_expert, ep.first_expert + ep.local_experts
        state["experts.up_proj"] = layer.experts.up_proj.detach()[lo:hi]
        state["experts.down_proj"] = layer.experts.down_proj.detach()[lo:hi]
        ep.load_state_dict(state, strict=True)
        return ep

    def routed_experts(self, xs: torch.Tensor, plan, up_proj: torch.Tensor, down_proj: torch.Tensor,
                       out_dtype=None) -> torch.Tensor:
        """LatentMoE's forward runs with this as its experts: the gathered rows (pad_to=1: exactly
        the T*k pairs, ordered by expert, hence by owner rank) go to their experts' ranks, this
        rank's experts run on what it receives, and the outputs come back in xs's order. 16-bit
        or float32 experts only (out_dtype, for FP8 rows, is refused)."""
        if out_dtype is not None or not isinstance(xs, torch.Tensor) or not isinstance(up_proj, torch.Tensor):
            raise NotImplementedError("ExpertParallelLatentMoE: quantized (NVFP4 / FP8) experts are not supported "
                                      "with expert parallelism; load the checkpoint on one rank")
        W, El = self.world, self.local_experts
        # Counts first: recv_counts[s, e] = rows rank s sends to my local expert e.
        send_counts = plan.expert_counts.view(W, El)
        recv_counts = funcol.wait_tensor(funcol.all_to_all_single(send_counts.contiguous(), None, None, self.group))
        counts_host = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).cpu()  # the one host sync
        send_splits, recv_splits = counts_host[0].tolist(), counts_host[1].tolist()
        self.last_bytes_sent = sum(send_splits) * xs.shape[1] * xs.element_size()

        xr = _all_to_all(xs, recv_splits, send_splits, self.group)
        # Received rows come by (source rank, local expert); the GEMMs want them by local expert.
        flat = recv_counts.reshape(-1).long()
        expert_of_row = torch.repeat_interleave(torch.arange(El, device=xr.device).repeat(W), flat,
                                                output_size=xr.shape[0])
        order = torch.argsort(expert_of_row, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        offsets = torch.zeros(El + 1, dtype=torch.int32, device=xr.device)
        offsets[1:] = torch.cumsum(recv_counts.sum(0), 0)

        ys = expert_mlp(xr.index_select(0, order), up_proj, down_proj, offsets)
        return _all_to_all(ys.index_select(0, inverse), send_splits, recv_splits, self.group)
