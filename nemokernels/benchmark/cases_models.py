"""Model-level cases: one training step (forward, loss, backward) of a Nemotron-3-shaped model
on the kernels against transformers' NemotronHForCausalLM (its PyTorch paths) at the same config
and weights, and greedy generation with and without MTP speculation.

Config "1b" (CUDA, full run): d 2048, 16 blocks `MEMEM*EMEMEM*EME` (Mamba-2 32x64 heads, 8
groups, d_state 128, chunk 128; GQA 16/2 heads of 128; LatentMoE 64 experts top-6, F 1024,
latent 512, shared 2048), vocab 131072: about 1.1B parameters, 0.45B active per token. bf16
autocast, batch 4 x 1024 tokens. "tiny" (CPU or --quick): the demo's small model, 2 x 256 tokens
(1 x 64 in a quick CPU run).
FLOPs counted as 6 x active parameters x tokens (a training step's matmul work).
"""
import tempfile

import torch

from .harness import Case

CONFIGS = {
    "1b": dict(vocab_size=131072, hidden_size=2048, layers_block_type="MEMEM*EMEMEM*EME", mamba_num_heads=32,
               mamba_head_dim=64, n_groups=8, ssm_state_size=128, chunk_size=128, conv_kernel=4,
               num_attention_heads=16, num_key_value_heads=2, head_dim=128, n_routed_experts=64,
               num_experts_per_tok=6, moe_intermediate_size=1024, moe_latent_size=512,
               moe_shared_expert_intermediate_size=2048, intermediate_size=4096, num_nextn_predict_layers=1,
               mtp_layers_block_type="*E"),
    "tiny": dict(vocab_size=256, hidden_size=128, layers_block_type="M*EM-E", mamba_num_heads=8, mamba_head_dim=32,
                 n_groups=2, ssm_state_size=32, chunk_size=64, conv_kernel=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=128, moe_latent_size=64, moe_shared_expert_intermediate_size=128,
                 intermediate_size=256, num_nextn_predict_layers=1, mtp_layers_block_type="*E"),
}


def _active_params(model, cfg) -> int:
    total, experts = 0, 0
    for n, p in model.named_parameters():
        total += p.numel()
        if n.endswith(("experts.up_proj", "experts.down_proj")):
            experts += p.numel()
    return total - experts + experts * cfg["num_experts_per_tok"] // cfg["n_routed_experts"]


def _train_step(device):
    cuda = torch.device(device).type == "cuda"

    def step(model, ids):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss

    return step


def _ours(cfg, device):
    from nemokernels.models import NemotronHConfig, NemotronHForCausalLM
    torch.manual_seed(0)
    return NemotronHForCausalLM(NemotronHConfig(**cfg)).to(device)


def _transformers_twin(ours, device):
    """transformers' model with our weights, through a checkpoint written by save_pretrained
    (the checkpoint's own names; transformers converts them on load)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf = transformers.NemotronHForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32)
    return hf.to(device)


def cases(quick: bool, device) -> list:
    cuda = torch.device(device).type == "cuda"
    name = "1b" if cuda and not quick else "tiny"
    cfg = CONFIGS[name]
    b, L = (4, 1024) if name == "1b" else (2, 256) if cuda or not quick else (1, 64)
    state = {}

    def make():
        if "model" not in state:
            state["model"] = _ours(cfg, device)
        return state["model"], torch.randint(0, cfg["vocab_size"], (b, L), device=device)

    def baseline_inputs_once():
        if "hf" not in state:
            state["hf"] = _transformers_twin(state["model"], device)
        return state["hf"]

    step = _train_step(device)

    def transformers_step(model, ids):
        return step(baseline_inputs_once(), ids)

    # Sizes from the model built on the meta device (no memory, no init work).
    from nemokernels.models import NemotronHConfig, NemotronHForCausalLM
    with torch.device("meta"):
        meta = NemotronHForCausalLM(NemotronHConfig(**cfg))
    active = _active_params(meta, cfg)
    weight_bytes = sum(p.numel() * 4 for p in meta.parameters())
    tokens = b * L
    return [Case(op="model.train_step", name=f"{name} b{b} L{L}", make_inputs=make, fn=step,
                 bytes=3 * weight_bytes, flops=6 * active * tokens,
                 baselines={"transformers": transformers_step}, backward=True)]
