"""SSD family cases: causal_conv1d (the Mamba-2 mixer's short depthwise conv), bf16, width 4,
at the points of docs/design.md section 7. Baselines are the plain PyTorch the op replaces, eager and compiled.
The "tree8" update points run 8 draft nodes of a binary tree of depth 3 (TREE_PARENTS, as in
cases_ssd_state_update.py); the baseline gathers each node's window with a precomputed index."""
import torch
import torch.nn.functional as F

import nemokernels as nk

from .harness import Case, lazy_compile

WIDTH = 4
DTYPE = torch.bfloat16
# conv channels = d_inner + 2 * n_groups * d_state (docs/design.md section 7, Mamba-2 heads x head dim).
DIMS = {"nano": 64 * 64 + 2 * 8 * 128, "super": 128 * 64 + 2 * 8 * 128}
TREE_PARENTS = [-1, 0, 0, 1, 1, 2, 2, 3]


def _tree_windows(parents, width):
    """(T, width) positions in cat(state (width - 1 columns), x): node t's window, oldest first."""
    rows = []
    for t in range(len(parents)):
        pos, cur = [], t
        for _ in range(width):
            pos.append(cur + width - 1)
            cur = parents[cur] if cur >= 0 else cur - 1
        rows.append(pos[::-1])
    return rows


def conv_ref(x, weight, bias):
    """Mamba-2's fallback without the causal-conv1d package."""
    seqlen = x.shape[-1]
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=x.shape[1])
    return F.silu(y[..., :seqlen])


def update_ref(x, conv_state, weight, bias):
    """One decode step in eager PyTorch: shift the state left by one column, dot with the taps."""
    window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # (batch, dim, width)
    conv_state.copy_(window[..., 1:])
    return F.silu((window * weight).sum(-1) + bias)


def tree_update_ref(x, conv_state, weight, bias, parents, windows):
    """A tree update in eager PyTorch: each node's window gathered from cat(state, x)."""
    cat = torch.cat([conv_state, x], dim=-1)                          # (batch, dim, width - 1 + T)
    win = cat[:, :, windows]                                          # (batch, dim, T, width)
    return F.silu((win * weight[:, None, :]).sum(-1) + bias[:, None])


def ours_tree_update(x, conv_state, weight, bias, parents, windows):
    return nk.causal_conv1d_update(x, conv_state, weight, bias, activation="silu", parents=parents)


def ours_fwd(x, weight, bias):
    return nk.causal_conv1d_fn(x, weight, bias, activation="silu")


def ours_update(x, conv_state, weight, bias):
    return nk.causal_conv1d_update(x, conv_state, weight, bias, activation="silu")


def fwd_bwd(forward):
    """Forward then backward; autograd.grad returns fresh gradients (no .grad accumulation)."""
    def run(x, weight, bias, dout):
        return torch.autograd.grad(forward(x, weight, bias), (x, weight, bias), dout)
    return run


def _weights(dim, device, grad):
    w = (torch.randn(dim, WIDTH, device=device, dtype=DTYPE) / WIDTH**0.5).requires_grad_(grad)
    return w, torch.randn(dim, device=device, dtype=DTYPE).requires_grad_(grad)


def _seq_maker(batch, seqlen, dim, device, backward):
    def make():
        # Channel-last x, as Mamba-2 passes it (a transpose of its (b, L, d) projection).
        x = torch.randn(batch, seqlen, dim, device=device, dtype=DTYPE).transpose(1, 2)
        w, b = _weights(dim, device, backward)
        if not backward:
            return x, w, b
        dout = torch.randn(batch, seqlen, dim, device=device, dtype=DTYPE).transpose(1, 2)
        return x.requires_grad_(), w, b, dout
    return make


def _update_maker(batch, dim, device):
    def make():
        x = torch.randn(batch, dim, device=device, dtype=DTYPE)
        state = torch.randn(batch, dim, WIDTH - 1, device=device, dtype=DTYPE)
        return (x, state) + _weights(dim, device, False)
    return make


def _tree_update_maker(batch, dim, device):
    def make():
        T = len(TREE_PARENTS)
        x = torch.randn(batch, dim, T, device=device, dtype=DTYPE)
        state = torch.randn(batch, dim, WIDTH - 1, device=device, dtype=DTYPE)
        parents = torch.tensor(TREE_PARENTS, dtype=torch.int32, device=device).expand(batch, T).contiguous()
        windows = torch.tensor(_tree_windows(TREE_PARENTS, WIDTH), device=device)
        return (x, state) + _weights(dim, device, False) + (parents, windows)
    return make


def _packed_states_maker(lengths, dim, device, with_states):
    def make():
        total = sum(lengths)
        x = torch.randn(1, total, dim, device=device, dtype=DTYPE).transpose(1, 2)
        cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
        init = torch.randn(len(lengths), dim, WIDTH - 1, device=device, dtype=DTYPE) if with_states else None
        return (x,) + _weights(dim, device, False) + (cu, init)
    return make


def packed_ours(x, weight, bias, cu, init):
    return nk.causal_conv1d_fn(x, weight, bias, initial_states=init, return_final_states=True, activation="silu",
                               cu_seqlens=cu)


def cases(quick: bool, device) -> list:
    esize = torch.empty((), dtype=DTYPE).element_size()
    seq_points = ([("nano", 1, 2048), ("super", 1, 2048)] if quick else
                  [(cfg, b, L) for cfg in DIMS for b in (1, 4) for L in (2048, 8192, 32768)])
    update_points = ([("nano", 1), ("super", 64)] if quick else
                     [(cfg, b) for cfg in DIMS for b in (1, 8, 64, 256)])
    tree_points = [("nano", 64)] if quick else [(cfg, b) for cfg in DIMS for b in (8, 64)]
    if quick and torch.device(device).type != "cuda":  # CPU-sized
        seq_points, update_points, tree_points = [("nano", 1, 512)], [("nano", 1)], [("nano", 1)]
    out = []
    for cfg, batch, seqlen in seq_points:
        dim = DIMS[cfg]
        n = batch * dim * seqlen
        params = dim * (WIDTH + 1) * esize
        name = f"{cfg} b{batch} L{seqlen} d{dim}"
        out.append(Case(
            op="causal_conv1d_fn", name=name, make_inputs=_seq_maker(batch, seqlen, dim, device, False),
            fn=ours_fwd, bytes=2 * n * esize + params, flops=2 * WIDTH * n,
            baselines={"torch_eager": conv_ref, "torch_compile": lazy_compile(conv_ref)}))
        # x, dout read; out, dx written; weight and bias read, their grads written.
        out.append(Case(
            op="causal_conv1d_fn.fwd_bwd", name=name, make_inputs=_seq_maker(batch, seqlen, dim, device, True),
            fn=fwd_bwd(ours_fwd), bytes=4 * n * esize + 2 * params, flops=3 * 2 * WIDTH * n,
            baselines={"torch_eager": fwd_bwd(conv_ref), "torch_compile": fwd_bwd(lazy_compile(conv_ref))},
            backward=True))
    for cfg, batch in update_points:
        dim = DIMS[cfg]
        n = batch * dim
        # x read, out written, the (width - 1)-column state read and written in place.
        out.append(Case(
            op="causal_conv1d_update", name=f"{cfg} b{batch} d{dim}", make_inputs=_update_maker(batch, dim, device),
            fn=ours_update, bytes=(2 * n + 2 * n * (WIDTH - 1) + dim * (WIDTH + 1)) * esize, flops=2 * WIDTH * n,
            baselines={"torch_eager": update_ref, "torch_compile": lazy_compile(update_ref)}))
    for cfg, batch in tree_points:
        dim, T = DIMS[cfg], len(TREE_PARENTS)
        n = batch * dim
        # x read and out written per node, the state read once (the tree leaves it alone).
        out.append(Case(
            op="causal_conv1d_update", name=f"{cfg} b{batch} tree{T} d{dim}",
            make_inputs=_tree_update_maker(batch, dim, device), fn=ours_tree_update,
            bytes=(2 * n * T + n * (WIDTH - 1) + dim * (WIDTH + 1)) * esize + batch * T * 4, flops=2 * WIDTH * n * T,
            baselines={"torch_eager": tree_update_ref, "torch_compile": lazy_compile(tree_update_ref)}))
    # Packed prefill with a state per sequence (issue 20's serving shape, GPU only): the
    # composition around the packed kernel against the same call without initial states.
    from .cases_ssd_scan import serving_lengths
    for cfg in ([] if torch.device(device).type != "cuda" else (["nano"] if quick else list(DIMS))):
        dim, lengths = DIMS[cfg], serving_lengths()
        n = sum(lengths) * dim
        out.append(Case(
            op="causal_conv1d_fn.packed_states", name=f"{cfg} S{len(lengths)} L{sum(lengths)} d{dim}",
            make_inputs=_packed_states_maker(lengths, dim, device, True), fn=packed_ours,
            bytes=(2 * n + 2 * len(lengths) * dim * (WIDTH - 1)) * esize, flops=2 * WIDTH * n,
            baselines={"no_states": lambda x, w, b, cu, init: packed_ours(x, w, b, cu, None)}))
    return out
