"""SSD chunk scan cases (mamba_chunk_scan_combined), bf16, chunk 128, at the points of docs/design.md section 7,
as the Mamba-2 mixer calls it (z, D per head, dt_bias, softplus).

Packed points (".packed"): issue 20's serving shape, 64 prompts of 50-500 tokens in one row
with a final state per sequence; ".packed_states" the same with each prompt continuing its own
cached state (initial_states (64, ...)), against one call per prompt (ours and mamba_ssm's,
which cannot continue more than the first packed sequence); GPU only.
Baselines: the PyTorch chunked reference (ssd/reference.py, float32 math), torch.compile of it,
and mamba_ssm's Triton `mamba_chunk_scan_combined` when it can be imported (peers.py).
"""
import torch

import nemokernels as nk
from nemokernels.ssd.reference import ssd_chunked_ref
from nemokernels.ssd.ssd_chunk_scan import ssd_chunk_scan_bytes_flops

from .harness import Case, lazy_compile
from .peers import mamba_ssm_peer

DTYPE = torch.bfloat16
CHUNK = 128
# (nheads, headdim, ngroups, dstate) per docs/design.md section 7 (Super's values marked (?) there).
CONFIGS = {"nano": (64, 64, 8, 128), "super": (128, 64, 8, 128)}


def _ref(x, dt, A, B, C, D, z, dt_bias):
    return ssd_chunked_ref(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)


def _ours(x, dt, A, B, C, D, z, dt_bias):
    return nk.mamba_chunk_scan_combined(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)


def _peer(fn):
    def run(x, dt, A, B, C, D, z, dt_bias):
        return fn(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    return run


def fwd_bwd(forward):
    def run(x, dt, A, B, C, D, z, dt_bias, dout):
        ins = (x, dt, A, B, C, D, z, dt_bias)
        return torch.autograd.grad(forward(*ins), ins, dout)
    return run


def _maker(batch, seqlen, cfg, device, backward):
    H, P, G, N = CONFIGS[cfg]

    def make():
        # x and z as views of one projection output, as the Mamba-2 mixer produces them.
        xz = torch.randn(batch, seqlen, H, 2 * P, device=device, dtype=DTYPE)
        x, z = xz[..., :P], xz[..., P:]
        dt = torch.randn(batch, seqlen, H, device=device, dtype=DTYPE) * 0.5 - 2
        A = -torch.exp(torch.rand(H, device=device) * 2.7)  # [-16, -1] as Mamba-2's A_log init
        B = torch.randn(batch, seqlen, G, N, device=device, dtype=DTYPE) / N**0.25
        C = torch.randn(batch, seqlen, G, N, device=device, dtype=DTYPE) / N**0.25
        D = torch.randn(H, device=device)
        dt_bias = torch.randn(H, device=device) * 0.5
        ins = [x, dt, A, B, C, D, z, dt_bias]
        if not backward:
            return tuple(ins)
        ins = [t.detach().requires_grad_() for t in ins]
        return (*ins, torch.randn(batch, seqlen, H, P, device=device, dtype=DTYPE))
    return make


def serving_lengths(n: int = 64, lo: int = 50, hi: int = 500, seed: int = 0) -> list:
    """The serving shape of issue 20: n prompts of lo..hi tokens (fixed by the seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


def _packed_maker(lengths, cfg, device):
    total = sum(lengths)
    base = _maker(1, total, cfg, device, False)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)

    def make():
        return base() + (cu,)
    return make


def _ours_packed(x, dt, A, B, C, D, z, dt_bias, cu):
    return nk.mamba_chunk_scan_combined(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                        cu_seqlens=cu, return_varlen_states=True)


def _peer_packed(fn):
    def run(x, dt, A, B, C, D, z, dt_bias, cu):
        seq_idx = nk.ssd.ssd_chunk_scan.seq_idx_from_cu_seqlens(cu, x.shape[1])
        return fn(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, seq_idx=seq_idx, cu_seqlens=cu,
                  dt_softplus=True, return_varlen_states=True)
    return run


def _packed_states_maker(lengths, cfg, device):
    make = _packed_maker(lengths, cfg, device)
    H, P, G, N = CONFIGS[cfg]
    init = torch.randn(len(lengths), H, P, N, device=device)

    def run():
        return make() + (init,)
    return run


def _ours_packed_states(x, dt, A, B, C, D, z, dt_bias, cu, init):
    return nk.mamba_chunk_scan_combined(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                        cu_seqlens=cu, initial_states=init, return_varlen_states=True)


def _per_sequence(fn, lengths):
    """One call per sequence, each from its own initial state (what a user without per-sequence
    states in packed prefill runs); the bounds are host values, so no sync is timed."""
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()

    def run(x, dt, A, B, C, D, z, dt_bias, cu, init):
        outs = []
        for i in range(len(lengths)):
            s, e = bounds[i], bounds[i + 1]
            outs.append(fn(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], CHUNK, D=D, z=z[:, s:e], dt_bias=dt_bias,
                           initial_states=init[i:i + 1], dt_softplus=True, return_final_states=True))
        return outs
    return run


def cases(quick: bool, device) -> list:
    points = ([("nano", 1, 2048), ("super", 1, 2048)] if quick else
              [(cfg, b, L) for cfg in CONFIGS for b in (1, 4) for L in (2048, 8192, 32768)])
    if quick and torch.device(device).type != "cuda":  # CPU-sized: two chunks
        points = [("nano", 1, 2 * CHUNK)]
    peer = mamba_ssm_peer("ssd_combined", "mamba_chunk_scan_combined")
    out = []
    for cfg, batch, seqlen in points:
        H, P, G, N = CONFIGS[cfg]
        name = f"{cfg} b{batch} L{seqlen} H{H} P{P} G{G} N{N}"
        act, flops = ssd_chunk_scan_bytes_flops(batch, seqlen, H, P, G, N, CHUNK)
        base = {"torch_chunked_eager": _ref}
        if seqlen <= 8192:  # compiling the chunk loop at 32768 (256 chunks) takes minutes
            base["torch_chunked_compile"] = lazy_compile(_ref)
        if peer is not None:
            base["mamba_ssm_triton"] = _peer(peer)
        out.append(Case(op="mamba_chunk_scan_combined", name=name, make_inputs=_maker(batch, seqlen, cfg, device, False),
                        fn=_ours, bytes=act, flops=flops, baselines=base))
        # Backward: reads x, z, B, C, dt, dout and y_pre, writes dx, dz, dB, dC, ddt (about 2.2x the
        # forward's traffic); its products are about 2.5x the forward's FLOPs.
        out.append(Case(op="mamba_chunk_scan_combined.fwd_bwd", name=name,
                        make_inputs=_maker(batch, seqlen, cfg, device, True),
                        fn=fwd_bwd(_ours), bytes=int(act * 3.2), flops=int(flops * 3.5),
                        baselines={k: fwd_bwd(v) for k, v in base.items()}, backward=True))
    # Packed prefill, the serving shape: 64 sequences of 50-500 tokens in one row, a final
    # state per sequence (cu_seqlens + return_varlen_states). GPU only (too large for a CPU run).
    packed = [] if torch.device(device).type != "cuda" else (["nano"] if quick else list(CONFIGS))
    for cfg in packed:
        H, P, G, N = CONFIGS[cfg]
        lengths = serving_lengths()
        total = sum(lengths)
        act, flops = ssd_chunk_scan_bytes_flops(1, total, H, P, G, N, CHUNK)
        act += len(lengths) * H * P * N * 4  # the varlen states
        out.append(Case(op="mamba_chunk_scan_combined.packed", name=f"{cfg} S{len(lengths)} L{total} H{H}",
                        make_inputs=_packed_maker(lengths, cfg, device), fn=_ours_packed, bytes=act, flops=flops,
                        baselines={"mamba_ssm_triton": _peer_packed(peer)} if peer is not None else {}))
        # Each prompt continuing its own cached state: the initial states are read once more.
        per_seq = {"ours_per_sequence": _per_sequence(nk.mamba_chunk_scan_combined, lengths)}
        if peer is not None:
            per_seq["mamba_ssm_triton_per_sequence"] = _per_sequence(peer, lengths)
        out.append(Case(op="mamba_chunk_scan_combined.packed_states", name=f"{cfg} S{len(lengths)} L{total} H{H}",
                        make_inputs=_packed_states_maker(lengths, cfg, device), fn=_ours_packed_states,
                        bytes=act + len(lengths) * H * P * N * 4, flops=flops, baselines=per_seq))
    return out
