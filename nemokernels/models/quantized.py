"""Model Optimizer (modelopt) quantized checkpoints for NemotronHForCausalLM: the quantization
config (config.json's ``quantization_config`` and/or ``hf_quant_config.json``), the module swap
and the forward-only quantized Linear.

Formats, sources and the choices made where they are silent: docs/models.md, section
"Quantized checkpoints (Model Optimizer)"."""
import fnmatch
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..moe.fp8 import FP8Tensor
from ..moe.grouped_gemm import grouped_gemm
from ..moe.layer import LatentMoE, QuantizedExpertProj, QuantizedExperts, keep_buffer_dtypes_apply
from ..nvfp4.tensor import NVFP4Tensor

__all__ = ["QuantSpec", "QuantizedLinear", "read_quant_config", "quantize_modules", "SUPPORTED_ALGOS"]

# quant_algo -> (format, has input_scale). W4A16_NVFP4 checkpoints carry no activation scale.
_LAYER_ALGOS = {"FP8": ("fp8", True), "NVFP4": ("nvfp4", True), "W4A16_NVFP4": ("nvfp4", False)}
SUPPORTED_ALGOS = tuple(_LAYER_ALGOS) + ("MIXED_PRECISION",)
# KV-cache scale tensors Model Optimizer writes next to k_proj / v_proj (read and dropped).
KV_SCALE_SUFFIXES = (".k_proj.k_scale", ".v_proj.v_scale")


def _error(msg: str) -> Exception:
    from .model import CheckpointError

    return CheckpointError(msg)


@dataclass
class QuantSpec:
    """The parsed quantization config. quant_algo: "FP8", "NVFP4", "W4A16_NVFP4" or
    "MIXED_PRECISION"; exclude_modules: wildcards (fnmatch) of modules kept unquantized;
    quantized_layers (MIXED_PRECISION): module name -> {"quant_algo", "group_size"}."""
    quant_algo: str
    exclude_modules: List[str] = field(default_factory=list)
    quantized_layers: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    group_size: int = 16
    kv_cache_quant_algo: Optional[str] = None
    source: str = "quantization config"
    producer: Optional[Dict[str, Any]] = None

    def excluded(self, name: str) -> bool:
        names = {name}
        if name.startswith("backbone."):
            names.add("model." + name[len("backbone."):])
        return any(fnmatch.fnmatchcase(n, pat) for pat in self.exclude_modules for n in names)

    def layer_algo(self, name: str) -> Optional[str]:
        """The quant_algo of the module ``name`` (checkpoint spelling: backbone.layers.3.mixer.in_proj),
        None for a module kept in 16 bits."""
        if self.excluded(name):
            return None
        if self.quant_algo != "MIXED_PRECISION":
            return self.quant_algo
        entry = self.quantized_layers.get(name)
        if entry is None and name.startswith("backbone."):
            entry = self.quantized_layers.get("model." + name[len("backbone."):])
        if entry is None:
            return None
        return entry["quant_algo"]

    def to_hf_quant_config(self) -> Dict[str, Any]:
        q: Dict[str, Any] = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo}
        if self.quant_algo == "MIXED_PRECISION":
            q["quantized_layers"] = self.quantized_layers
        else:
            q["group_size"] = self.group_size
        q["exclude_modules"] = list(self.exclude_modules)
        out: Dict[str, Any] = {"quantization": q}
        if self.producer:
            out["producer"] = self.producer
        return out


def _upper(v, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise _error(f"{where}: quant_algo must be a non-empty string, got {v!r}")
    return v.upper()


def _check_algo(algo: str, where: str, allowed) -> str:
    if algo not in allowed:
        raise _error(f"{where}: quant_algo {algo!r} is not supported; supported: {', '.join(allowed)} "
                     "(Model Optimizer FP8 / NVFP4 checkpoints)")
    return algo


def _parse(block: Dict[str, Any], where: str) -> QuantSpec:
    """One quantization block in either spelling: hf_quant_config.json ({"producer", "quantization":
    {quant_algo, kv_cache_quant_algo, exclude_modules, group_size, quantized_layers}}) or
    config.json's quantization_config ({quant_method: "modelopt", quant_algo, ignore, group_size,
    kv_cache_scheme, quantized_layers, config_groups})."""
    if not isinstance(block, dict):
        raise _error(f"{where} must be a JSON object, got {type(block).__name__}")
    producer = block.get("producer")
    if "quantization" in block:
        q = block["quantization"]
        if not isinstance(q, dict):
            raise _error(f"{where}: 'quantization' must be an object, got {type(q).__name__}")
        where_q = f"{where} quantization"
        exclude = q.get("exclude_modules") or []
        kv = q.get("kv_cache_quant_algo")
    else:
        q = block
        where_q = where
        method = q.get("quant_method")
        if method is not None and not str(method).lower().startswith("modelopt"):
            raise _error(f"{where}: quant_method {method!r} is not supported (Model Optimizer checkpoints only: "
                         "quant_method 'modelopt')")
        exclude = q.get("ignore")
        if exclude is None:
            exclude = q.get("exclude_modules") or []
        kv = q.get("kv_cache_quant_algo")
        scheme = q.get("kv_cache_scheme")
        if kv is None and scheme is not None:
            kv = "FP8" if (isinstance(scheme, dict) and scheme.get("num_bits") == 8) or scheme == "FP8" else str(scheme)
    if "quant_algo" not in q:
        raise _error(f"{where_q} has no quant_algo")
    algo = _check_algo(_upper(q["quant_algo"], where_q), where_q, SUPPORTED_ALGOS)
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise _error(f"{where_q}: exclude_modules / ignore must be a list of strings, got {exclude!r}")
    group_size = q.get("group_size", 16)
    layers: Dict[str, Dict[str, Any]] = {}
    if algo == "MIXED_PRECISION":
        raw = q.get("quantized_layers")
        if not isinstance(raw, dict) or not raw:
            raise _error(f"{where_q}: quant_algo MIXED_PRECISION needs a non-empty quantized_layers object")
        for name, info in raw.items():
            if not isinstance(info, dict):
                raise _error(f"{where_q}: quantized_layers[{name!r}] must be an object, got {info!r}")
            la = _check_algo(_upper(info.get("quant_algo"), f"{where_q} quantized_layers[{name!r}]"),
                             f"{where_q} quantized_layers[{name!r}]", tuple(_LAYER_ALGOS))
            gs = info.get("group_size", group_size if group_size is not None else 16)
            if _LAYER_ALGOS[la][0] == "nvfp4" and gs != 16:
                raise _error(f"{where_q}: quantized_layers[{name!r}] group_size = {gs!r}; NVFP4 needs 16")
            layers[name] = {"quant_algo": la, **({"group_size": gs} if _LAYER_ALGOS[la][0] == "nvfp4" else {})}
    elif _LAYER_ALGOS[algo][0] == "nvfp4" and group_size not in (None, 16):
        raise _error(f"{where_q}: group_size = {group_size!r}; NVFP4 needs 16")
    if kv is not None and not isinstance(kv, str):
        raise _error(f"{where_q}: kv_cache_quant_algo must be a string or null, got {kv!r}")
    return QuantSpec(algo, list(exclude), layers, 16 if group_size is None else int(group_size),
                     kv.upper() if kv else None, where, producer)


def read_quant_config(path: str, config) -> Optional[QuantSpec]:
    """The quantization of the checkpoint at ``path``: config.json's ``quantization_config``
    (in config.extra) and/or ``hf_quant_config.json``; None for an unquantized checkpoint. With
    both, config.json's block is used (as vLLM prefers it) and the two must name the same
    quant_algo."""
    from_config = config.extra.get("quantization_config") if config is not None else None
    file = os.path.join(path, "hf_quant_config.json")
    from_file = None
    if os.path.isfile(file):
        with open(file) as f:
            try:
                from_file = json.load(f)
            except json.JSONDecodeError as e:
                raise _error(f"{file} is not valid JSON: {e}") from e
    specs = []
    if from_config is not None:
        specs.append(_parse(from_config, f"{os.path.join(path, 'config.json')} quantization_config"))
    if from_file is not None:
        specs.append(_parse(from_file, file))
    if not specs:
        return None
    if len(specs) == 2 and specs[0].quant_algo != specs[1].quant_algo:
        raise _error(f"{path}: config.json quantization_config has quant_algo {specs[0].quant_algo!r} but "
                     f"hf_quant_config.json has {specs[1].quant_algo!r}")
    return specs[0]


class QuantizedLinear(nn.Module):
    """A Linear with Model Optimizer quantized weights, forward only, on the grouped GEMM with one
    expert (offsets [0, R]); the bias (16-bit, a Parameter: to_dtype casts it) is added afterwards.

    fmt "nvfp4": buffers weight (N, K/2) uint8, weight_scale (N, K/16) float8_e4m3fn,
    weight_scale_2 () float32, input_scale () float32 when the checkpoint has one (not used:
    W4A16, the activations stay 16-bit). fmt "fp8": weight (N, K) float8_e4m3fn, weight_scale ()
    float32, input_scale () float32 (the static activation scale; ``static_input = False``
    quantizes each row with amax / 448 instead)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = False, input_scale: bool = True,
                 static_input: bool = True, device=None, dtype=None):
        super().__init__()
        if fmt not in ("nvfp4", "fp8"):
            raise ValueError(f"QuantizedLinear: fmt must be 'nvfp4' or 'fp8', got {fmt!r}")
        if fmt == "nvfp4" and in_features % 16:
            raise ValueError(f"QuantizedLinear: NVFP4 needs in_features % 16 == 0, got {in_features}")
        self.in_features, self.out_features, self.fmt, self.static_input = in_features, out_features, fmt, static_input
        f32 = dict(dtype=torch.float32, device=device)
        if fmt == "nvfp4":
            self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                       device=device))
            self.register_buffer("weight_scale", torch.zeros(out_features, in_features // 16,
                                                             dtype=torch.float8_e4m3fn, device=device))
            self.register_buffer("weight_scale_2", torch.ones((), **f32))
        else:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                       device=device))
            self.register_buffer("weight_scale", torch.ones((), **f32))
        if input_scale:
            self.register_buffer("input_scale", torch.ones((), **f32))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, " \
               f"bias={self.bias is not None}"

    def quantized(self):
        """The weight as the grouped GEMM takes it: one expert, (1, N, K)."""
        if self.fmt == "nvfp4":
            return NVFP4Tensor(self.weight.unsqueeze(0), self.weight_scale.unsqueeze(0), self.weight_scale_2)
        return FP8Tensor(self.weight.unsqueeze(0), self.weight_scale,
                             self.input_scale if self.static_input else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise NotImplementedError(f"QuantizedLinear ({self.fmt}): no gradient through quantized weights "
                                      "(forward only); run under torch.no_grad() or with inputs that need no "
                                      "gradient")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear: input has {x.shape[-1]} features, the layer takes "
                             f"{self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # [0, R] made on the device (no host-to-device copy: CUDA-graph capturable)
        offsets = torch.arange(2, dtype=torch.int32, device=x.device) * x2.shape[0]
        y = grouped_gemm(x2, self.quantized(), offsets)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        return keep_buffer_dtypes_apply(self, fn, recurse)


def _checkpoint_name(internal: str) -> str:
    return "backbone." + internal[len("model."):] if internal.startswith("model.") else internal


def _fmt(algo: Optional[str]):
    return (None, False) if algo is None else _LAYER_ALGOS[algo]


def quantize_modules(model: nn.Module, spec: QuantSpec, fp8_input_scale: str = "static") -> int:
    """Swaps the modules ``spec`` quantizes for their quantized forms (weights to be loaded
    afterwards, strictly): nn.Linear -> QuantizedLinear, a LatentMoE's experts -> QuantizedExperts.
    The router (a plain parameter), conv1d, norms and embeddings are never quantized (Model
    Optimizer leaves them); a tied lm_head stays the embedding. Returns the number swapped."""
    if fp8_input_scale not in ("static", "dynamic"):
        raise ValueError(f"fp8_input_scale must be 'static' or 'dynamic', got {fp8_input_scale!r}")
    static = fp8_input_scale == "static"
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    swaps = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if tied and name == "lm_head":
                continue
            fmt, has_in = _fmt(spec.layer_algo(_checkpoint_name(name)))
            if fmt is not None:
                q = QuantizedLinear(mod.in_features, mod.out_features, fmt, bias=mod.bias is not None,
                                    input_scale=has_in, static_input=static, device=mod.weight.device,
                                    dtype=mod.weight.dtype)
                swaps.append((name, q))
        elif isinstance(mod, LatentMoE):
            base = _checkpoint_name(f"{name}.experts")
            projs = {}
            for proj in ("up_proj", "down_proj"):
                algos = {spec.layer_algo(f"{base}.{j}.{proj}") for j in range(mod.experts.up_proj.shape[0])}
                if len(algos) > 1:
                    raise _error(f"{spec.source}: the experts of {base}.*.{proj} mix quantization formats "
                                 f"{sorted(map(str, algos))}; one format per projection is supported")
                projs[proj] = algos.pop()
            if (projs["up_proj"] is None) != (projs["down_proj"] is None):
                raise _error(f"{spec.source}: {base}.*.up_proj is {projs['up_proj'] or 'unquantized'} but "
                             f"{base}.*.down_proj is {projs['down_proj'] or 'unquantized'}; both or neither "
                             "must be quantized")
            if projs["up_proj"] is not None:
                E, F_, L = mod.experts.up_proj.shape
                dev = mod.experts.up_proj.device
                ups = _fmt(projs["up_proj"])
                downs = _fmt(projs["down_proj"])
                q = QuantizedExperts(
                    QuantizedExpertProj(ups[0], E, F_, L, input_scale=ups[1], static_input=static, device=dev),
                    QuantizedExpertProj(downs[0], E, L, F_, input_scale=downs[1], static_input=static, device=dev))
                swaps.append((f"{name}.experts", q))
    for name, q in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)
    return len(swaps)
