"""MoE token permutation: the routing plan and the gather into expert-contiguous rows.

Details: docs/moe.md, section `nemokernels/moe/permute.py`."""
from typing import NamedTuple

import torch

_ops = torch.ops.nemokernels


class MoEPlan(NamedTuple):
    expert_counts: torch.Tensor   # (E,) int32
    expert_offsets: torch.Tensor  # (E+1,) int32
    row_of_slot: torch.Tensor     # (T*k,) int32
    slot_of_row: torch.Tensor     # (R,) int32, -1 on padding rows
    top_k: int

    @property
    def num_rows(self) -> int:
        """The static row count R = T*k + E*(pad_to-1) (rows past expert_offsets[E] are padding)."""
        return self.slot_of_row.shape[0]


@torch.library.register_fake("nemokernels::moe_permute_plan")
def _plan_fake(topk_ids, num_experts, pad_to):
    n = topk_ids.shape[0] * topk_ids.shape[1]
    i32 = dict(dtype=torch.int32)
    return (topk_ids.new_empty((num_experts,), **i32), topk_ids.new_empty((num_experts + 1,), **i32),
            topk_ids.new_empty((n,), **i32), topk_ids.new_empty((n + num_experts * (pad_to - 1),), **i32))


@torch.library.register_fake("nemokernels::moe_gather")
def _gather_fake(x, slot_of_row, row_of_slot, top_k):
    return x.new_empty((slot_of_row.shape[0], x.shape[1]))


@torch.library.register_fake("nemokernels::moe_gather_bwd")
def _gather_bwd_fake(dxs, row_of_slot, top_k):
    return dxs.new_empty((row_of_slot.shape[0] // top_k, dxs.shape[1]))


def _gather_setup(ctx, inputs, output):
    _, _, row_of_slot, top_k = inputs
    ctx.save_for_backward(row_of_slot)
    ctx.top_k = top_k


def _gather_backward(ctx, dxs):
    (row_of_slot,) = ctx.saved_tensors
    return _ops.moe_gather_bwd(dxs, row_of_slot, ctx.top_k), None, None, None


torch.library.register_autograd("nemokernels::moe_gather", _gather_backward, setup_context=_gather_setup)


def moe_permute_plan(topk_ids: torch.Tensor, num_experts: int, pad_to: int = 1) -> MoEPlan:
    """The routing plan of topk_ids (T, k) (int32; int64 is converted)."""
    if topk_ids.dtype != torch.int32:
        topk_ids = topk_ids.to(torch.int32)
    counts, offsets, row_of_slot, slot_of_row = _ops.moe_permute_plan(topk_ids, int(num_experts), int(pad_to))
    return MoEPlan(counts, offsets, row_of_slot, slot_of_row, int(topk_ids.shape[1]))


def moe_gather(x: torch.Tensor, plan: MoEPlan) -> torch.Tensor:
    """(T, l) tokens -> (R, l) expert-contiguous rows (zero rows for padding)."""
    return _ops.moe_gather(x, plan.slot_of_row, plan.row_of_slot, plan.top_k)
