"""NemotronHConfig: the model settings read from a Hugging Face ``config.json``.

Details: docs/models.md, section `nemokernels/models/config.py`."""
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

__all__ = ["NemotronHConfig", "LAYER_KINDS"]

LAYER_KINDS = ("mamba", "attention", "moe", "mlp")
_PATTERN_CHARS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
_KIND_TO_CHAR = {v: k for k, v in _PATTERN_CHARS.items()}
_NAME_ALIASES = {
    "mamba": "mamba", "linear_attention": "mamba", "mamba2": "mamba",
    "attention": "attention", "full_attention": "attention",
    "moe": "moe", "mlp": "mlp",
}
_HF_NAMES = {"mamba": "linear_attention", "attention": "full_attention", "moe": "moe", "mlp": "mlp"}

# Old key -> canonical key (values of the old key win only when the canonical key is absent).
_KEY_ALIASES = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "mamba_d_state": "ssm_state_size",
    "mamba_d_head": "mamba_head_dim",
    "mamba_n_heads": "mamba_num_heads",
    "num_local_experts": "n_routed_experts",
    "rms_norm_eps": "layer_norm_epsilon",
}


def _json_float(v: Any) -> float:
    """transformers writes infinity as {"__float__": "Infinity"}; json writes Infinity."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float(v)


def _parse_kinds(value: Any, key: str) -> List[str]:
    """A pattern string or a list of names -> list of internal kinds; errors name the key."""
    if isinstance(value, str):
        kinds = []
        for i, ch in enumerate(value):
            if ch not in _PATTERN_CHARS:
                raise ValueError(f"NemotronHConfig: {key}[{i}] = {ch!r} is not a layer kind; expected one of "
                                 f"'M' (Mamba-2), '*' (attention), 'E' (MoE), '-' (MLP) in {value!r}")
            kinds.append(_PATTERN_CHARS[ch])
        return kinds
    if isinstance(value, (list, tuple)):
        kinds = []
        for i, name in enumerate(value):
            if not isinstance(name, str) or name not in _NAME_ALIASES:
                raise ValueError(f"NemotronHConfig: {key}[{i}] = {name!r} is not a layer kind; expected one of "
                                 f"{sorted(_NAME_ALIASES)}")
            kinds.append(_NAME_ALIASES[name])
        return kinds
    raise ValueError(f"NemotronHConfig: {key} must be a pattern string or a list of layer names, "
                     f"got {type(value).__name__}")


@dataclass
class NemotronHConfig:
    vocab_size: int = 131072
    hidden_size: int = 4096
    layers_block_type: List[str] = field(default_factory=lambda: ["mamba", "moe", "attention", "mlp"])
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    # dense MLP
    intermediate_size: int = 21504
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"
    # Mamba-2
    ssm_state_size: int = 128
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    mamba_hidden_act: str = "silu"
    n_groups: int = 8
    conv_kernel: int = 4
    expand: int = 2
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_limit: tuple = (0.0, float("inf"))
    time_step_floor: float = 1e-4
    use_conv_bias: bool = True
    chunk_size: int = 128
    mamba_proj_bias: bool = False
    use_bias: bool = False
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: Optional[int] = None
    num_experts_per_tok: int = 2
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # MTP
    num_nextn_predict_layers: int = 0
    mtp_layers_block_type: List[str] = field(default_factory=lambda: ["attention", "moe"])
    mtp_loss_weight: float = 0.3
    # misc
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    residual_in_fp32: bool = False
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, List[int]]] = 2
    torch_dtype: Optional[str] = None
    # keys we do not interpret, kept so to_dict round-trips them
    extra: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.layers_block_type = _parse_kinds(self.layers_block_type, "layers_block_type")
        self.mtp_layers_block_type = _parse_kinds(self.mtp_layers_block_type, "mtp_layers_block_type")
        if isinstance(self.time_step_limit, (list, tuple)):
            self.time_step_limit = tuple(_json_float(v) for v in self.time_step_limit)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers_block_type)

    @property
    def hybrid_override_pattern(self) -> str:
        return "".join(_KIND_TO_CHAR[k] for k in self.layers_block_type)

    @property
    def mtp_hybrid_override_pattern(self) -> str:
        return "".join(_KIND_TO_CHAR[k] for k in self.mtp_layers_block_type)

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"NemotronHConfig: {msg}")

        for key in ("vocab_size", "hidden_size"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) > 0,
                 f"{key} must be a positive int, got {getattr(self, key)!r}")
        need(len(self.layers_block_type) > 0, "layers_block_type (or hybrid_override_pattern) is empty")
        kinds = set(self.layers_block_type)
        if self.num_nextn_predict_layers:
            need(isinstance(self.num_nextn_predict_layers, int) and self.num_nextn_predict_layers >= 0,
                 f"num_nextn_predict_layers must be an int >= 0, got {self.num_nextn_predict_layers!r}")
            need(len(self.mtp_layers_block_type) > 0,
                 "mtp_layers_block_type (or mtp_hybrid_override_pattern) is empty but num_nextn_predict_layers = "
                 f"{self.num_nextn_predict_layers}")
            kinds |= set(self.mtp_layers_block_type)
        if "attention" in kinds:
            for key in ("num_attention_heads", "num_key_value_heads", "head_dim"):
                need(isinstance(getattr(self, key), int) and getattr(self, key) > 0,
                     f"{key} must be a positive int, got {getattr(self, key)!r}")
            need(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                 f"({self.num_key_value_heads})")
        if "mamba" in kinds:
            for key in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                        "chunk_size"):
                need(isinstance(getattr(self, key), int) and getattr(self, key) > 0,
                     f"{key} must be a positive int, got {getattr(self, key)!r}")
            need(self.mamba_num_heads % self.n_groups == 0,
                 f"mamba_num_heads ({self.mamba_num_heads}) must be a multiple of n_groups ({self.n_groups})")
            need(2 <= self.conv_kernel <= 4, f"conv_kernel must be 2..4 (causal_conv1d), got {self.conv_kernel}")
            need(self.mamba_hidden_act in ("silu", "swish"),
                 f"mamba_hidden_act must be 'silu', got {self.mamba_hidden_act!r}")
            need(len(self.time_step_limit) == 2, f"time_step_limit must be a (min, max) pair, got {self.time_step_limit!r}")
        if "mlp" in kinds or "moe" in kinds:
            need(self.mlp_hidden_act == "relu2", f"mlp_hidden_act must be 'relu2', got {self.mlp_hidden_act!r}")
        if "moe" in kinds:
            for key in ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
                        "num_experts_per_tok", "n_group", "topk_group"):
                need(isinstance(getattr(self, key), int) and getattr(self, key) > 0,
                     f"{key} must be a positive int, got {getattr(self, key)!r}")
            need(self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts ({self.n_routed_experts}) must be a multiple of n_group ({self.n_group})")
            need(self.topk_group <= self.n_group, f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            need(per_group >= 2, f"each routing group needs >= 2 experts (group score = sum of top-2), got "
                 f"n_routed_experts / n_group = {per_group}")
            need(self.num_experts_per_tok <= self.topk_group * per_group,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= topk_group * experts per group "
                 f"({self.topk_group * per_group})")
            if self.moe_latent_size is not None:
                need(isinstance(self.moe_latent_size, int) and self.moe_latent_size > 0,
                     f"moe_latent_size must be a positive int or null, got {self.moe_latent_size!r}")
        if "mlp" in kinds:
            need(isinstance(self.intermediate_size, int) and self.intermediate_size > 0,
                 f"intermediate_size must be a positive int, got {self.intermediate_size!r}")

    # ---- I/O -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "NemotronHConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for old, new in _KEY_ALIASES.items():
            if old in d:
                val = d.pop(old)
                d.setdefault(new, val)
        # layer pattern: an explicit list wins over the pattern string (as in transformers)
        pattern = d.pop("hybrid_override_pattern", None)
        if d.get("layers_block_type") is None and d.get("layer_types") is not None:
            d["layers_block_type"] = d.pop("layer_types")
        d.pop("layer_types", None)
        if d.get("layers_block_type") is None:
            if pattern is None:
                raise ValueError("NemotronHConfig: config has neither layers_block_type nor hybrid_override_pattern")
            d["layers_block_type"] = _parse_kinds(pattern, "hybrid_override_pattern")
        mtp_pattern = d.pop("mtp_hybrid_override_pattern", None)
        if d.get("mtp_layers_block_type") is None:
            if mtp_pattern is not None:
                d["mtp_layers_block_type"] = _parse_kinds(mtp_pattern, "mtp_hybrid_override_pattern")
            else:
                d.pop("mtp_layers_block_type", None)
        if d.get("num_nextn_predict_layers") is None:
            d["num_nextn_predict_layers"] = int(d.pop("mtp_num_layers", 0) or 0)
        n_layers = d.pop("num_hidden_layers", None)
        if n_layers is not None and n_layers != len(d["layers_block_type"]):
            raise ValueError(f"NemotronHConfig: num_hidden_layers = {n_layers} does not match the "
                             f"{len(d['layers_block_type'])} layers of layers_block_type / hybrid_override_pattern")
        if d.get("num_key_value_heads") is None and "num_attention_heads" in d:
            d["num_key_value_heads"] = d["num_attention_heads"]
        if d.get("head_dim") is None and "num_attention_heads" in d and "hidden_size" in d:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if d.get("dtype") is not None:
            d.setdefault("torch_dtype", d.pop("dtype"))
        kwargs = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> "NemotronHConfig":
        """From a checkpoint directory (its config.json) or a config.json path."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"NemotronHConfig.from_pretrained: no config.json at {file}")
        with open(file) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> Dict[str, Any]:
        d = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            d[f.name] = getattr(self, f.name)
        d["layers_block_type"] = [_HF_NAMES[k] for k in self.layers_block_type]
        d["mtp_layers_block_type"] = [_HF_NAMES[k] for k in self.mtp_layers_block_type]
        d["time_step_limit"] = [v if math.isfinite(v) else {"__float__": "Infinity" if v > 0 else "-Infinity"}
                                for v in self.time_step_limit]
        d["num_hidden_layers"] = self.num_hidden_layers
        if d["torch_dtype"] is None:
            d.pop("torch_dtype")
        out = dict(self.extra)
        out.update(d)
        out["model_type"] = "nemotron_h"
        out.setdefault("architectures", ["NemotronHForCausalLM"])
        return out

    def save_pretrained(self, path: Union[str, os.PathLike]) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
