"""NVFP4Linear / nvfp4_linear (the NVFP4 training recipe) against a float64 reference of the
same recipe built from nemokernels.nvfp4.reference (same seeds, so the same codes), closeness
to the high-precision Linear, convert_to_nvfp4, and a small model that trains."""
import pytest
import torch

from nemokernels.nvfp4 import NVFP4Linear, NVFP4Recipe, convert_to_nvfp4
from nemokernels.nvfp4 import reference as ref
from nemokernels.nvfp4.linear import derive_seed, nvfp4_linear

from conftest import DEVICES
from helpers import TOL, rel_err


def deq(x2d, **kw):
    kw.setdefault("seed", 0)
    return ref.dequantize_ref(ref.quantize_ref(x2d.detach().cpu(), **kw))


def linear_ref(x, w, b, dy, hadamard, sr, sd, sw):
    """float64 forward and gradients of the recipe (docs/nvfp4.md, file notes of nemokernels/nvfp4/linear.py)."""
    out_f, in_f = w.shape
    x2, dy2 = x.reshape(-1, in_f), dy.reshape(-1, out_f)
    y = deq(x2) @ deq(w, block_2d=True).T
    if b is not None:
        y = y + b.detach().double().cpu()
    dx = deq(dy2, stochastic_rounding=sr, seed=sd) @ deq(w.t().contiguous(), block_2d=True).T
    pad = (-x2.shape[0]) % 16
    xp = torch.nn.functional.pad(x2.detach(), (0, 0, 0, pad))
    dyp = torch.nn.functional.pad(dy2.detach(), (0, 0, 0, pad))
    dw = (deq(dyp.t().contiguous(), hadamard=hadamard, stochastic_rounding=sr, seed=sw)
          @ deq(xp.t().contiguous(), hadamard=hadamard, seed=sw).T)
    db = dy2.double().sum(0).cpu() if b is not None else None
    return y.reshape(*x.shape[:-1], out_f), dx.reshape(x.shape), dw, db


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hadamard,sr", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("lead,in_f,out_f", [((37,), 64, 48), ((2, 24), 32, 16), ((16,), 16, 80)])
def test_matches_recipe_reference(device, dtype, hadamard, sr, lead, in_f, out_f):
    x = torch.randn(*lead, in_f, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(out_f, in_f, device=device) / in_f ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(out_f, device=device, dtype=dtype, requires_grad=True)
    sd, sw = int(torch.randint(0, 2**62, ())), int(torch.randint(0, 2**62, ()))
    y = nvfp4_linear(x, w, b, hadamard=hadamard, stochastic_rounding=sr, seed_dgrad=sd, seed_wgrad=sw)
    # a non-contiguous upstream gradient
    dy = torch.randn(*lead, 2 * out_f, device=device, dtype=dtype)[..., ::2]
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == dtype
    y_r, dx_r, dw_r, db_r = linear_ref(x, w, b, dy, hadamard, sr, sd, sw)
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    assert rel_err(y, y_r) < tol, "forward"
    assert rel_err(x.grad, dx_r) < tol, "dgrad"
    assert rel_err(w.grad, dw_r) < tol, "wgrad"
    assert rel_err(b.grad, db_r) < tol, "bias grad"


@pytest.mark.parametrize("device", DEVICES)
def test_close_to_high_precision_linear(device):
    """Within NVFP4 error of the exact Linear: forward ~0.14 (two quantized operands), gradients
    a little more (stochastic rounding of dy)."""
    x = torch.randn(256, 128, device=device, requires_grad=True)
    lin = torch.nn.Linear(128, 64, device=device)
    q = NVFP4Linear.from_linear(lin, NVFP4Recipe(seed=3))
    dy = torch.randn(256, 64, device=device)
    y = q(x)
    y.backward(dy)
    x64 = x.detach().double()
    w64, b64, dy64 = lin.weight.detach().double(), lin.bias.detach().double(), dy.double()
    assert rel_err(y, x64 @ w64.T + b64) < 0.2
    assert rel_err(x.grad, dy64 @ w64) < 0.25
    assert rel_err(lin.weight.grad, dy64.T @ x64) < 0.25
    assert rel_err(lin.bias.grad, dy64.sum(0)) < 1e-5


def test_module_seeds_reproducible_and_fresh():
    lin = torch.nn.Linear(32, 32)
    a = NVFP4Linear.from_linear(lin, NVFP4Recipe(seed=5), layer_id=2)
    b = NVFP4Linear.from_linear(lin, NVFP4Recipe(seed=5), layer_id=2)
    x, g = torch.randn(16, 32), torch.randn(16, 32)
    grads = []
    for m in (a, b, a):
        xi = x.clone().requires_grad_()
        m(xi).backward(g)
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1]), "same recipe seed, layer and step -> same SR bits"
    assert not torch.equal(grads[0], grads[2]), "the next step draws fresh SR bits"
    assert derive_seed(1, 2, 3) != derive_seed(1, 3, 2)


def test_nvfp4_linear_rejects_bad_features():
    with pytest.raises(ValueError, match="multiples of 16"):
        NVFP4Linear(24, 32)
    with pytest.raises(ValueError, match="multiples of 16"):
        NVFP4Linear.from_linear(torch.nn.Linear(32, 20))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        nvfp4_linear(torch.randn(4, 24), torch.randn(32, 24))


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = torch.nn.Linear(d, 2 * d)
        self.down = torch.nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.down(torch.relu(self.up(h)))


class _Toy(torch.nn.Module):
    def __init__(self, d=32, n=4, vocab=16):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, d)
        self.inp = torch.nn.Linear(d, d)
        self.layers = torch.nn.ModuleList(_Block(d) for _ in range(n))
        self.odd = torch.nn.Linear(d, 20)  # 20 features: not NVFP4-able, stays
        self.lm_head = torch.nn.Linear(d, vocab)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h) + 0 * self.odd(h).sum()


def test_convert_to_nvfp4_selection():
    m = _Toy(n=5)
    w_before = m.layers[2].up.weight
    convert_to_nvfp4(m, NVFP4Recipe(bf16_first_layers=1, bf16_last_layers=2))
    kinds = {n: type(mod).__name__ for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert kinds["lm_head"] == "Linear" and kinds["odd"] == "Linear"
    assert kinds["inp"] == "NVFP4Linear"
    assert kinds["layers.0.up"] == "Linear"
    assert kinds["layers.1.up"] == "NVFP4Linear" and kinds["layers.2.down"] == "NVFP4Linear"
    assert kinds["layers.3.up"] == "Linear" and kinds["layers.4.down"] == "Linear"
    assert m.layers[2].up.weight is w_before, "weights are kept (same Parameter)"
    ids = [mod.layer_id for mod in m.modules() if isinstance(mod, NVFP4Linear)]
    assert len(set(ids)) == len(ids), "each converted layer gets its own seed stream"
    # defaults: lm_head and embeddings kept; a 5-block stack with 2 + 8 kept blocks keeps all blocks
    m2 = convert_to_nvfp4(_Toy(n=5))
    assert isinstance(m2.inp, NVFP4Linear) and type(m2.layers[2].up) is torch.nn.Linear


@pytest.fixture
def one_thread():
    """Tiny matmuls: intra-op threads only add pool overhead (seconds on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_converted_model_trains(one_thread):
    torch.manual_seed(0)
    teacher = _Toy()
    model = _Toy()
    convert_to_nvfp4(model, NVFP4Recipe(seed=1, bf16_first_layers=1, bf16_last_layers=1))
    assert sum(isinstance(mod, NVFP4Linear) for mod in model.modules()) == 5
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs = torch.randn(64, 32)
    with torch.no_grad():
        target = teacher(xs).argmax(-1)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(xs), target)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_module_under_torch_compile_no_recompiles():
    """Default recipe (seed None): seeds are device tensors drawn from torch's generator, so one
    graph serves every step; the forward matches eager, and each step draws fresh SR bits."""
    torch._dynamo.reset()
    m = NVFP4Linear(32, 48)
    f = torch.compile(m, backend="aot_eager", fullgraph=True)
    x, g = torch.randn(16, 32), torch.randn(16, 48)
    from torch._dynamo.utils import counters
    counters.clear()
    grads = []
    for _ in range(3):
        xi = x.clone().requires_grad_()
        y = f(xi)
        y.backward(g)
        assert torch.equal(y, m(x)), "the forward (no random bits) matches eager"
        assert torch.isfinite(xi.grad).all() and torch.isfinite(m.weight.grad).all()
        grads.append(xi.grad)
    assert counters["stats"]["unique_graphs"] == 1
    assert not torch.equal(grads[0], grads[1])
    # reproducible under torch.manual_seed
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        xi = x.clone().requires_grad_()
        m(xi).backward(g)
        outs.append(xi.grad)
    assert torch.equal(*outs)
