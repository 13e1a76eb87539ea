"""NemotronHModel / NemotronHForCausalLM on the nemokernels ops, with the MTP head and
Hugging Face safetensors checkpoints (parameter names as in the checkpoint and transformers:
``model.embeddings``, ``model.layers.{i}.norm`` / ``.mixer.*``, ``model.norm_f``, ``lm_head``,
plus ``mtp.layers.{i}.*``).

Details: docs/models.md, section `nemokernels/models/model.py`."""
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import NemotronHConfig
from .layers import Block, MTPBlock, RMSNorm

__all__ = ["NemotronHModel", "NemotronHForCausalLM", "CausalLMOutput", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that does not match the model (missing, unexpected or mis-shaped tensors)."""


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    mtp_loss: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None


def _init_weights(module: nn.Module, config: NemotronHConfig) -> None:
    std = config.initializer_range
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
                if config.rescale_prenorm_residual and name.endswith(("out_proj", "o_proj", "down_proj")):
                    m.weight.div_(max(1, config.num_hidden_layers) ** 0.5)
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
        # MoE tensors by name, whichever LatentMoE implementation holds them
        for name, p in module.named_parameters():
            if name.endswith(("experts.up_proj", "experts.down_proj", "mixer.gate.weight")):
                p.normal_(0.0, std)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()


class NemotronHModel(nn.Module):
    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config, kind, i) for i, kind in enumerate(config.layers_block_type)])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, caches: Optional[List] = None, verify: bool = False,
                parents: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for i, blk in enumerate(self.layers):
            if caches is None and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x, cache=None if caches is None else caches[i], verify=verify, parents=parents)
        return self.norm_f(x)


class MTP(nn.Module):
    """The MTP steps: ``layers`` holds num_nextn_predict_layers * P blocks (``mtp.layers.{i}``)."""

    def __init__(self, config: NemotronHConfig):
        super().__init__()
        kinds = config.mtp_layers_block_type
        P = len(kinds)
        self.steps = config.num_nextn_predict_layers
        self.pattern_len = P
        base = config.num_hidden_layers
        self.layers = nn.ModuleList([
            MTPBlock(config, kinds[i % P], base + i, first=i % P == 0, last=i % P == P - 1)
            for i in range(self.steps * P)])

    def step_blocks(self, step: int):
        P = self.pattern_len
        return self.layers[step * P:(step + 1) * P]

    def forward(self, step: int, emb_next: torch.Tensor, h: torch.Tensor, caches: Optional[List] = None,
                verify: bool = False) -> torch.Tensor:
        """One MTP step: embeddings of token t+1+step and hidden h_t -> g_t (..., d)."""
        blocks = self.step_blocks(step)
        first = blocks[0]
        x = first.eh_proj(torch.cat([first.enorm(emb_next), first.hnorm(h)], dim=-1))
        for j, blk in enumerate(blocks):
            x = blk(x, cache=None if caches is None else caches[j], verify=verify)
        return blocks[-1].final_layernorm(x)


_STACKED = re.compile(r"^(.*\.experts)\.(up_proj|down_proj)$")
# per-expert tensors: the 16-bit weight, or a quantized checkpoint's weight and scales (Model Optimizer)
_QSUFFIX = r"(weight|weight_scale|weight_scale_2|input_scale)"
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(up_proj|down_proj)\." + _QSUFFIX + "$")
_STACKED_Q = re.compile(r"^(.*\.experts)\.(up_proj|down_proj)\." + _QSUFFIX + "$")
# one-value scales, stored as () or (1,) in the checkpoints; held as () per matrix
_SCALAR_SUFFIXES = (".weight_scale_2", ".input_scale", ".weight_scale")
_QUANT_DTYPES = (torch.uint8, torch.float8_e4m3fn)


def _checkpoint_name(k: str) -> str:
    return "backbone." + k[len("model."):] if k.startswith("model.") else k


def _scalar(k: str, v: torch.Tensor) -> torch.Tensor:
    return v.reshape(()) if k.endswith(_SCALAR_SUFFIXES) and v.dim() == 1 and v.shape[0] == 1 else v


def _from_checkpoint_names(tensors: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                           source: str, origin: Optional[Dict[str, str]] = None) -> Dict[str, torch.Tensor]:
    """backbone.* -> model.*; experts.{j}.up_proj.weight (j = 0..E-1) stacked into experts.up_proj
    (16-bit) or experts.up_proj.weight (quantized; likewise weight_scale, weight_scale_2,
    input_scale). ``origin`` (filled when given): stacked key -> the checkpoint name of its expert 0,
    so errors name a key the checkpoint has."""
    out: Dict[str, torch.Tensor] = {}
    per_expert: Dict[str, Dict[int, torch.Tensor]] = {}
    names: Dict[str, tuple] = {}
    for k, v in tensors.items():
        if k.startswith("backbone."):
            k = "model." + k[len("backbone."):]
        m = _PER_EXPERT.match(k)
        if m:
            base, j, proj, suffix = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            dst = f"{base}.{proj}" if suffix == "weight" and f"{base}.{proj}" in expected else f"{base}.{proj}.{suffix}"
            per_expert.setdefault(dst, {})[j] = _scalar(k, v)
            names[dst] = (base, proj, suffix)
        else:
            out[k] = _scalar(k, v)
    for k, parts in per_expert.items():
        base, proj, suffix = names[k]

        def pname(j):
            return _checkpoint_name(f"{base}.{j}.{proj}.{suffix}")

        if origin is not None:
            origin[k] = pname(min(parts))
        n = expected[k].shape[0] if k in expected else max(parts) + 1
        absent = [j for j in range(n) if j not in parts]
        if absent:
            raise CheckpointError(f"NemotronHForCausalLM: {source} is missing tensor {pname(absent[0])!r} "
                                  f"({len(absent)} of {n} experts absent)")
        extra = sorted(j for j in parts if j >= n)
        if extra:
            raise CheckpointError(f"NemotronHForCausalLM: {source} has unexpected tensor {pname(extra[0])!r} (the "
                                  f"config has {n} routed experts)")
        want = tuple(expected[k].shape[1:]) if k in expected else tuple(parts[0].shape)
        for j in range(n):
            if tuple(parts[j].shape) != want:
                raise CheckpointError(f"NemotronHForCausalLM: {source} tensor {pname(j)!r} has shape "
                                      f"{tuple(parts[j].shape)}, the model expects {want}")
        out[k] = torch.stack([parts[j] for j in range(n)])
    return out


def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, shift: int) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + shift] (ignore_index -100)."""
    L = labels.shape[1]
    lg = logits[:, : L - shift].float()
    tg = labels[:, shift:].to(lg.device)
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100)


class NemotronHForCausalLM(nn.Module):
    def __init__(self, config: NemotronHConfig):
        super().__init__()
        self.config = config
        self.model = NemotronHModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MTP(config) if config.num_nextn_predict_layers > 0 else None
        _init_weights(self, config)
        for m in self.modules():
            if hasattr(m, "reset_ssm_parameters"):
                m.reset_ssm_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    # ---- training / scoring ----------------------------------------------------------------
    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        self.model.gradient_checkpointing = enable

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                mtp_loss_weight: Optional[float] = None, caches=None, verify: bool = False,
                logits_to_keep: int = 0, parents: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """Logits (b, L, V) float32 and, with labels (b, L) (-100 = ignore), the loss: the
        next-token cross-entropy (``lm_loss``) plus ``mtp_loss_weight`` (default: the config's)
        times the MTP loss when the model has MTP layers (``mtp_loss``: mean over steps of the
        cross-entropy of step s against token t+2+s). ``parents`` (b, L) with ``caches``: the
        tokens are a draft tree (verify pass; node t follows parents[t], -1: the cached prefix),
        committed afterwards with MambaCache.commit_tree / AttentionCache.commit_tree."""
        if parents is not None and caches is None:
            raise ValueError("NemotronHForCausalLM: parents (a draft tree) needs caches")
        h = self.model(input_ids, caches=caches, verify=verify, parents=parents)
        hk = h if not logits_to_keep else h[:, -logits_to_keep:]
        logits = self.lm_head(hk).float()
        out = CausalLMOutput(logits=logits, hidden_states=h)
        if labels is None:
            return out
        out.lm_loss = _causal_lm_loss(logits, labels, 1)
        out.loss = out.lm_loss
        if self.mtp is not None and labels.shape[1] > 2:
            w = self.config.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight
            out.mtp_loss = self.mtp_losses(input_ids, h, labels)
            out.loss = out.lm_loss + w * out.mtp_loss
        return out

    def mtp_losses(self, input_ids: torch.Tensor, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.model.embeddings(input_ids)
        L = input_ids.shape[1]
        losses = []
        g = h
        for s in range(self.mtp.steps):
            n = L - 2 - s  # positions t with a target token t + 2 + s
            if n <= 0:
                break
            g = self.mtp(s, emb[:, 1 + s: 1 + s + n], g[:, :n])
            losses.append(_causal_lm_loss(self.lm_head(g).float(), labels[:, : n + 2 + s], 2 + s))
        return torch.stack(losses).mean()

    # ---- generation (nemokernels/models/generate.py) ----------------------------------------
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs):
        from .generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    # ---- checkpoints --------------------------------------------------------------------------
    def expected_keys(self) -> Dict[str, torch.Tensor]:
        sd = self.state_dict()
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def load_checkpoint_state(self, tensors: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copies ``tensors`` (checkpoint names) into the model; every parameter must be there with
        its shape. Accepted spellings: ``backbone.*`` (the released checkpoints, transformers'
        save format) or ``model.*``; experts per expert (``experts.{j}.up_proj.weight``) or
        stacked (``experts.up_proj``). ``mtp.*`` tensors are ignored when the config has no MTP
        layers (transformers does the same)."""
        expected = self.expected_keys()
        spec = getattr(self, "quant_spec", None)
        if spec is not None and spec.kv_cache_quant_algo:
            # KV-cache scales (k_proj.k_scale, v_proj.v_scale): read and dropped (no quantized KV cache)
            from .quantized import KV_SCALE_SUFFIXES

            tensors = dict(tensors)
            for k in [k for k in tensors if k.endswith(KV_SCALE_SUFFIXES)]:
                if tensors[k].numel() != 1:
                    raise CheckpointError(f"NemotronHForCausalLM: {source} tensor {k!r} has shape "
                                          f"{tuple(tensors[k].shape)}, a KV-cache scale holds one value")
                del tensors[k]
        origin: Dict[str, str] = {}
        renamed = _from_checkpoint_names(tensors, expected, source, origin)

        def cname(k):
            return origin.get(k) or _checkpoint_name(k)

        unexpected = []
        for k in renamed:
            if k in expected:
                continue
            if k.startswith("mtp.") and self.mtp is None:
                continue
            if k == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            unexpected.append(k)
        missing = [k for k in expected if k not in renamed]
        if missing:
            hint = (" (the config has num_nextn_predict_layers > 0 but the checkpoint has no MTP weights)"
                    if any(k.startswith("mtp.") for k in missing) else "")
            raise CheckpointError(f"NemotronHForCausalLM: {source} is missing {len(missing)} tensor(s), e.g. "
                                  f"{[_checkpoint_name(k) for k in missing[:5]]}{hint}; nothing is initialised "
                                  "at random")
        if unexpected:
            quant = " (the quantization config does not quantize this module; see exclude_modules / " \
                "quantized_layers)" if spec is not None and any(cname(k).endswith(("_scale", "_scale_2"))
                                                                for k in unexpected[:5]) else ""
            raise CheckpointError(f"NemotronHForCausalLM: {source} has {len(unexpected)} unexpected tensor(s), "
                                  f"e.g. {[cname(k) for k in unexpected[:5]]} (does config.json match "
                                  f"the weights?){quant}")
        for k, dst in expected.items():
            src = renamed[k]
            if tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError(f"NemotronHForCausalLM: {source} tensor {cname(k)!r} has shape "
                                      f"{tuple(src.shape)}, the model expects {tuple(dst.shape)}")
            if (dst.dtype in _QUANT_DTYPES or src.dtype in _QUANT_DTYPES) and src.dtype != dst.dtype:
                raise CheckpointError(f"NemotronHForCausalLM: {source} tensor {cname(k)!r} has dtype {src.dtype}, "
                                      f"the model expects {dst.dtype} (quantization config and weights disagree)")
        with torch.no_grad():
            for k, dst in expected.items():
                dst.copy_(renamed[k].to(dst.dtype))

    def checkpoint_state(self) -> Dict[str, torch.Tensor]:
        """The state dict under the checkpoint's names (``backbone.*``, experts per expert), as
        the released checkpoints and transformers' save_pretrained write them."""
        out = {}
        for k, v in self.expected_keys().items():
            v = v.detach()
            m = _STACKED.match(k)
            mq = _STACKED_Q.match(k) if m is None else None
            if m:
                for j in range(v.shape[0]):
                    out[_checkpoint_name(f"{m.group(1)}.{j}.{m.group(2)}.weight")] = v[j]
            elif mq:  # quantized experts: per-expert weight and scales, as Model Optimizer writes them
                for j in range(v.shape[0]):
                    out[_checkpoint_name(f"{mq.group(1)}.{j}.{mq.group(2)}.{mq.group(3)}")] = v[j]
            else:
                out[_checkpoint_name(k)] = v
        return out

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], dtype: torch.dtype = torch.float32,
                        device: Union[str, torch.device] = "cpu",
                        fp8_input_scale: str = "static") -> "NemotronHForCausalLM":
        """Loads config.json and model.safetensors (or the shards of model.safetensors.index.json).
        Router weights and the correction bias stay float32, as in transformers.

        Model Optimizer quantized checkpoints (config.json's quantization_config with quant_method
        "modelopt", and/or hf_quant_config.json; quant_algo FP8, NVFP4, W4A16_NVFP4 or
        MIXED_PRECISION): the quantized Linear layers become QuantizedLinear and the quantized
        experts QuantizedExperts, holding the checkpoint's tensors (not dequantized copies);
        excluded modules stay 16-bit (``dtype``). Such a model is forward only (parameters need no
        gradient). fp8_input_scale: "static" uses the checkpoint's FP8 input_scale for the
        activations, "dynamic" quantizes each row with amax / 448. docs/models.md, "Quantized
        checkpoints (Model Optimizer)"."""
        from safetensors.torch import load_file

        path = os.fspath(path)
        config = NemotronHConfig.from_pretrained(path)
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"NemotronHForCausalLM.from_pretrained: no model.safetensors or "
                                    f"model.safetensors.index.json in {path}")
        tensors: Dict[str, torch.Tensor] = {}
        for fn in files:
            tensors.update(load_file(os.path.join(path, fn)))
        from .quantized import quantize_modules, read_quant_config

        spec = read_quant_config(path, config)
        model = cls(config)
        if spec is not None:
            quantize_modules(model, spec, fp8_input_scale=fp8_input_scale)
            model.quant_spec = spec
        model.load_checkpoint_state(tensors, source=path)
        model.to_dtype(dtype)
        if spec is not None:
            model.requires_grad_(False)
        return model.to(device)

    def to_dtype(self, dtype: torch.dtype) -> "NemotronHForCausalLM":
        """Casts to dtype, keeping the MoE router (gate.weight, e_score_correction_bias) float32."""
        for name, p in self.named_parameters():
            if name.endswith("gate.weight"):
                continue
            p.data = p.data.to(dtype)
        return self

    def save_pretrained(self, path: Union[str, os.PathLike], max_shard_size: Optional[int] = None) -> None:
        """config.json + model.safetensors, or shards + model.safetensors.index.json when the
        tensors exceed ``max_shard_size`` bytes."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        self.config.save_pretrained(path)
        spec = getattr(self, "quant_spec", None)
        if spec is not None:
            with open(os.path.join(path, "hf_quant_config.json"), "w") as f:
                json.dump(spec.to_hf_quant_config(), f, indent=2, sort_keys=True)
        sd = {k: v.contiguous().cpu().clone() for k, v in self.checkpoint_state().items()}
        total = sum(v.numel() * v.element_size() for v in sd.values())
        meta = {"format": "pt"}
        if max_shard_size is None or total <= max_shard_size:
            save_file(sd, os.path.join(path, "model.safetensors"), metadata=meta)
            return
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            nb = v.numel() * v.element_size()
            if cur and size + nb > max_shard_size:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = v
            size += nb
        if cur:
            shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fn), metadata=meta)
            weight_map.update({k: fn for k in shard})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
