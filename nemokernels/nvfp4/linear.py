"""NVFP4Linear and the NVFP4 pre-training recipe (docs/design.md section 4.3; NVIDIA, "Pretraining Large
Language Models with NVFP4", 2025):

- forward  y  = gemm(Q(x) 1x16, Q(W) 16x16) (+ bias)
- dgrad    dx = gemm(Q(dy, SR) 1x16, Q_t(W) 16x16)            K = out_features
- wgrad    dW = gemm(Q_t(dy, RHT, SR), Q_t(x, RHT))            K = tokens (padded to 16)

Details: docs/nvfp4.md, section `nemokernels/nvfp4/linear.py`."""
import fnmatch
import re
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .gemm import gemm
from .quantize import quantize, quantize_t

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 64-bit seed mixing the given integers (order matters)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h


@dataclass
class NVFP4Recipe:
    """Which layers run in NVFP4 and how.

    - ``hadamard``: random Hadamard transform on both wgrad operands.
    - ``stochastic_rounding``: SR of the gradient (dy) in dgrad and wgrad.
    - ``seed``: None (default): per-call seeds drawn from torch's generator (compile- and
      graph-friendly); an int: per-call seeds derived from it, the layer and a call counter
      (bit-reproducible without torch's RNG state; eager mode).
    - ``keep_bf16``: fnmatch patterns of module names left as nn.Linear (kept in high
      precision). Defaults: the LM head, embeddings-adjacent projections and MTP heads.
    - ``bf16_first_layers`` / ``bf16_last_layers``: decoder blocks (module names containing
      ``layers.<i>.``) at the start / end of the stack left in high precision. NVIDIA's 12B
      recipe keeps the first 2 and the last 8 blocks in BF16 (about 16% of the layers).
    """
    hadamard: bool = True
    stochastic_rounding: bool = True
    seed: Optional[int] = None
    keep_bf16: Tuple[str, ...] = ("lm_head", "*lm_head", "*embed*", "mtp.*", "*.mtp.*")
    bf16_first_layers: int = 2
    bf16_last_layers: int = 8


class _NVFP4LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, hadamard: bool, sr: bool, seed_dgrad: int, seed_wgrad: int):
        out_f, in_f = weight.shape
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_f)
        qx = quantize(x2)
        qw = quantize(weight, block_2d=True)
        y = gemm(qx, qw, out_dtype=x.dtype, bias=bias)
        # Tensor seeds go through save_for_backward (the way torch.compile tracks tensors from
        # the forward into the backward), int seeds stay on ctx.
        seeds = (seed_dgrad, seed_wgrad)
        ctx.seed_is_tensor = tuple(isinstance(s, torch.Tensor) for s in seeds)
        ctx.save_for_backward(x2, weight, *[s for s in seeds if isinstance(s, torch.Tensor)])
        ctx.int_seeds = tuple(None if isinstance(s, torch.Tensor) else int(s) for s in seeds)
        ctx.has_bias = bias is not None
        ctx.cfg = (hadamard, sr, lead)
        return y.reshape(*lead, out_f)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, *tseeds = ctx.saved_tensors
        hadamard, sr, lead = ctx.cfg
        tseeds = iter(tseeds)
        seed_d, seed_w = (next(tseeds) if is_t else v for is_t, v in zip(ctx.seed_is_tensor, ctx.int_seeds))
        out_f, in_f = weight.shape
        dy2 = dy.reshape(-1, out_f)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            qdy = quantize(dy2, stochastic_rounding=sr, seed=seed_d)
            qwt = quantize_t(weight, block_2d=True)
            dx = gemm(qdy, qwt, out_dtype=x2.dtype).reshape(*lead, in_f)
        if ctx.needs_input_grad[1]:
            m = dy2.shape[0]
            pad = (-m) % 16
            dyp = F.pad(dy2, (0, 0, 0, pad)) if pad else dy2
            xp = F.pad(x2, (0, 0, 0, pad)) if pad else x2
            qdyt = quantize_t(dyp, hadamard=hadamard, stochastic_rounding=sr, seed=seed_w)
            qxt = quantize_t(xp, hadamard=hadamard, seed=seed_w)
            dw = gemm(qdyt, qxt, out_dtype=weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(dy.dtype)
        return dx, dw, db, None, None, None, None


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 hadamard: bool = True, stochastic_rounding: bool = True,
                 seed_dgrad: Union[int, torch.Tensor] = 0,
                 seed_wgrad: Union[int, torch.Tensor] = 1) -> torch.Tensor:
    """Functional NVFP4 linear: x (..., in) @ weight (out, in).T (+ bias), with the recipe's
    backward. in_features and out_features must be multiples of 16. Output in x's dtype;
    weight gradient in weight's dtype. Seeds: ints or 1-element int64 tensors on x's device."""
    return _NVFP4LinearFn.apply(x, weight, bias, bool(hadamard), bool(stochastic_rounding), seed_dgrad,
                                seed_wgrad)


class NVFP4Linear(torch.nn.Linear):
    """nn.Linear whose forward and backward GEMMs run in NVFP4 (the recipe: docs/nvfp4.md, file notes of nemokernels/nvfp4/linear.py). The weight
    stays in its own dtype (the master copy); it is quantized on every call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 recipe: Optional[NVFP4Recipe] = None, layer_id: int = 0, device=None, dtype=None):
        if in_features % 16 or out_features % 16:
            raise ValueError(f"NVFP4Linear: in_features and out_features must be multiples of 16, got "
                             f"({in_features}, {out_features})")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe if recipe is not None else NVFP4Recipe()
        self.layer_id = layer_id
        self._calls = 0

    def _seeds(self):
        r = self.recipe
        if r.seed is None:
            # (A device step counter mutated in place would be simpler, but AOT autograd may
            # recompute a seed derived from it in the backward after the mutation.)
            s = torch.randint(0, 2**62, (2,), dtype=torch.int64, device=self.weight.device)
            return s[0:1], s[1:2]
        self._calls += 1
        return (derive_seed(r.seed, self.layer_id, self._calls, 0),
                derive_seed(r.seed, self.layer_id, self._calls, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.recipe
        sd, sw = self._seeds()
        return nvfp4_linear(x, self.weight, self.bias, hadamard=r.hadamard,
                            stochastic_rounding=r.stochastic_rounding, seed_dgrad=sd, seed_wgrad=sw)

    @classmethod
    def from_linear(cls, lin: torch.nn.Linear, recipe: Optional[NVFP4Recipe] = None, layer_id: int = 0):
        """An NVFP4Linear sharing lin's weight and bias Parameters (no copy)."""
        if lin.in_features % 16 or lin.out_features % 16:
            raise ValueError(f"NVFP4Linear: in_features and out_features must be multiples of 16, got "
                             f"({lin.in_features}, {lin.out_features})")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight = lin.weight
        new.bias = lin.bias
        new.recipe = recipe if recipe is not None else NVFP4Recipe()
        new.layer_id = layer_id
        new._calls = 0
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + ", nvfp4"


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _keep(name: str, lin: torch.nn.Linear, recipe: NVFP4Recipe, nlayers: int) -> bool:
    if any(fnmatch.fnmatchcase(name, p) for p in recipe.keep_bf16):
        return True
    if lin.in_features % 16 or lin.out_features % 16:
        return True  # NVFP4 needs K and N in blocks of 16
    m = _LAYER_RE.search(name)
    if m and nlayers:
        i = int(m.group(1))
        if i < recipe.bf16_first_layers or i >= nlayers - recipe.bf16_last_layers:
            return True
    return False


def convert_to_nvfp4(model: torch.nn.Module, recipe: Optional[NVFP4Recipe] = None) -> torch.nn.Module:
    """Replace the model's nn.Linear modules by NVFP4Linear (in place; weights kept, the same
    Parameter objects) except those the recipe keeps in high precision: names matching
    ``recipe.keep_bf16``, linears whose features are not multiples of 16, and the first / last
    decoder blocks (``layers.<i>.``). Returns the model."""
    recipe = recipe if recipe is not None else NVFP4Recipe()
    idx = [int(m.group(1)) for n, _ in model.named_modules() for m in [_LAYER_RE.search(n)] if m]
    nlayers = max(idx) + 1 if idx else 0
    targets = [(n, mod) for n, mod in model.named_modules()
               if type(mod) is torch.nn.Linear and not _keep(n, mod, recipe, nlayers)]
    for lid, (name, lin) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NVFP4Linear.from_linear(lin, recipe, layer_id=lid))
    return model
