"""Drop the nemokernels kernels into a loaded transformers NemotronH model.

    model = transformers.AutoModelForCausalLM.from_pretrained(...)   # NemotronHForCausalLM
    nemokernels.integrations.transformers.patch(model)

Details: docs/models.md, section `nemokernels/integrations/transformers.py`."""
from typing import Dict

import torch

from ..ssd.causal_conv1d import causal_conv1d_fn
from ..ssd.rmsnorm_gated import rmsnorm_fn
from ..ssd.ssd_chunk_scan import mamba_chunk_scan_combined

__all__ = ["patch", "unpatch"]

_ORIG = "_nemokernels_original_forward"


def _mamba_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    if cache is not None or kwargs.get("cache_params") is not None:
        return getattr(self, _ORIG)(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.dim() != 2:
        return getattr(self, _ORIG)(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    b, L, _ = hidden_states.shape
    dtype = hidden_states.dtype
    if attention_mask is not None:
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(dtype)
    proj = self.in_proj(hidden_states)
    gate, xbc, dt = proj.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
    xt = xbc.transpose(1, 2)
    w = self.conv1d.weight.squeeze(1).to(xt.dtype)
    bias = None if self.conv1d.bias is None else self.conv1d.bias.to(xt.dtype)
    xc = causal_conv1d_fn(xt, w, bias, activation=self.activation).transpose(1, 2)
    if attention_mask is not None:
        xc = (xc * attention_mask[:, :, None]).to(xc.dtype)
    GN = self.n_groups * self.ssm_state_size
    x, B, C = torch.split(xc, [self.intermediate_size, GN, GN], dim=-1)
    y = mamba_chunk_scan_combined(
        x.reshape(b, L, self.num_heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
        B.reshape(b, L, self.n_groups, self.ssm_state_size), C.reshape(b, L, self.n_groups, self.ssm_state_size),
        self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=tuple(self.time_step_limit))
    y = y.reshape(b, L, self.intermediate_size)
    y = rmsnorm_fn(y, self.norm.weight, None, z=gate, eps=self.norm.variance_epsilon,
                   group_size=self.norm.group_size, norm_before_gate=False)
    return self.out_proj(y.to(dtype))


def _rmsnorm_forward(self, hidden_states):
    x = hidden_states.to(self.weight.dtype) if hidden_states.dtype != self.weight.dtype else hidden_states
    return rmsnorm_fn(x, self.weight, None, z=None, eps=self.variance_epsilon).to(hidden_states.dtype)


def _bind(module, fn) -> None:
    if not hasattr(module, _ORIG):
        setattr(module, _ORIG, module.forward)
    module.forward = fn.__get__(module, type(module))


def patch(model: torch.nn.Module, mamba: bool = True, norms: bool = True, moe: bool = True) -> Dict[str, int]:
    """Routes a transformers NemotronH model's modules through the kernels (see the module
    docstring); returns how many modules of each kind were patched."""
    counts = {"mamba": 0, "rmsnorm": 0, "moe": 0}
    LatentMoE = None
    if moe:
        try:
            from nemokernels.moe import LatentMoE  # type: ignore[attr-defined]
        except ImportError:
            LatentMoE = None
    our_cfg = None
    for module in model.modules():
        name = type(module).__name__
        if mamba and name == "NemotronHMamba2Mixer":
            _bind(module, _mamba_forward)
            counts["mamba"] += 1
        elif norms and name == "NemotronHRMSNorm":
            _bind(module, _rmsnorm_forward)
            counts["rmsnorm"] += 1
        elif LatentMoE is not None and name == "NemotronHMoE":
            if our_cfg is None:
                from ..models.config import NemotronHConfig

                our_cfg = NemotronHConfig.from_dict(module.config.to_dict())
            fast = LatentMoE.from_config(our_cfg).to(next(module.parameters()).device)
            for pname, _ in list(fast.named_parameters()):
                owner_name, _, leaf = pname.rpartition(".")
                owner = fast.get_submodule(owner_name) if owner_name else fast
                setattr(owner, leaf, module.get_parameter(pname))
            for bname, _ in list(fast.named_buffers()):
                owner_name, _, leaf = bname.rpartition(".")
                owner = fast.get_submodule(owner_name) if owner_name else fast
                setattr(owner, leaf, module.get_buffer(bname))
            object.__setattr__(module, "_nemokernels_moe", fast)  # not a submodule: no duplicate params
            _bind(module, lambda self, hidden_states: self._nemokernels_moe(hidden_states))
            counts["moe"] += 1
    return counts


def unpatch(model: torch.nn.Module) -> int:
    """Restores every forward that `patch` replaced; returns how many."""
    n = 0
    for module in model.modules():
        if hasattr(module, _ORIG):
            module.forward = getattr(module, _ORIG)
            delattr(module, _ORIG)
            n += 1
    return n
