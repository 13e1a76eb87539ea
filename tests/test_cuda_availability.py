"""A GPU this build cannot serve is named once, with the fix (nemokernels/device_check.py): the
arch rule against a table, the once-per-device warning with the device query replaced, and the
CPU-only build's raising CUDA kernels through torch's dispatcher. No GPU needed."""
import warnings

import pytest
import torch

from nemokernels import NemokernelsWarning, _C, device_check, info
from nemokernels.info import OPS

H100, B200, B300, A100, RTX4090, RTX5090, GB10 = (9, 0), (10, 0), (10, 3), (8, 0), (8, 9), (12, 0), (12, 1)


@pytest.mark.parametrize("archs, capability, runs", [
    (["sm_90a", "sm_100a"], H100, True),
    (["sm_90a", "sm_100a"], B200, True),
    (["sm_90a", "sm_100a"], B300, False),    # sm_100a code runs on 10.0 only
    (["sm_90a", "sm_100a"], A100, False),
    (["sm_90a", "sm_100a"], RTX5090, False),
    (["sm_90a"], (9, 1), False),             # arch-specific: not even a newer minor
    (["sm_100f"], B200, True),               # the family: 10.0 and 10.3
    (["sm_100f"], B300, True),
    (["sm_103f"], B200, False),
    (["sm_100f"], RTX5090, False),
    (["sm_80"], A100, True),                 # plain SASS: same major, minor >= its own
    (["sm_80"], (8, 6), True),
    (["sm_86"], A100, False),
    (["sm_80"], H100, False),                # no PTX in the build: no newer major
    (["sm_90"], H100, True),
    (["sm_120"], RTX5090, True),
    (["sm_120"], GB10, True),
    (["sm_89"], RTX4090, True),
    ([], H100, False),                       # CPU-only build
    (["compute_120"], GB10, True),           # PTX ("120+PTX"): JIT for any capability >= its own
    (["compute_120"], (13, 0), True),
    (["compute_120"], RTX5090, True),
    (["compute_120"], B200, False),
    (["sm_80", "sm_90a", "sm_100f", "sm_120", "compute_120"], (13, 0), True),  # the release wheel
    (["sm_80", "sm_90a", "sm_100f", "sm_120", "compute_120"], B300, True),     # (scripts/build_wheels.sh)
    (["sm_80", "sm_90a", "sm_100a", "sm_120", "compute_120"], B300, False),    # 100a would miss the B300
    (["sm_120", "compute_120"], A100, False),
    (["sm_89", "sm_120"], (13, 0), False),   # no PTX: no newer major
    (["compute_x"], H100, None),             # an entry the rule does not know: no claim
    (["compute_x", "sm_90a"], H100, True),
    (["compute_x", "sm_100a"], H100, None),
])
def test_build_runs_on(archs, capability, runs):
    assert device_check.build_runs_on(archs, capability) is runs


@pytest.mark.parametrize("capability, arch", [(H100, "90a"), (B200, "100a"), (B300, "103a"), (A100, "80"),
                                              (RTX5090, "120")])
def test_arch_to_build_is_one_that_runs(capability, arch):
    assert device_check.arch_to_build(capability) == arch
    assert device_check.build_runs_on([f"sm_{arch}"], capability) is True


@pytest.fixture
def fake_gpus(monkeypatch):
    """A CUDA build for 90a;100a on a machine with devices {index: capability} (set per test);
    no device judged yet in this process."""
    devices = {}
    monkeypatch.setattr(device_check, "compiled_archs", lambda: ["sm_90a", "sm_100a"])
    monkeypatch.setattr(device_check, "_capability", lambda i: devices[i])
    monkeypatch.setattr(device_check, "_checked", set())
    return devices


def _warnings_of(call, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(*args)
    return [str(w.message) for w in caught if issubclass(w.category, NemokernelsWarning)]


def test_warns_once_per_device_naming_the_arch_and_the_fix(fake_gpus):
    fake_gpus.update({0: RTX5090, 1: H100, 2: A100})
    first = _warnings_of(device_check.check_cuda_devices, [0])
    assert len(first) == 1
    msg = first[0]
    assert "cuda:0 (sm_120)" in msg and "sm_90a, sm_100a" in msg
    assert 'NEMOKERNELS_CUDA_ARCHS="90a;100a;120"' in msg
    assert _warnings_of(device_check.check_cuda_devices, [0]) == []  # judged once per process
    assert _warnings_of(device_check.check_cuda_devices, [1]) == []  # an H100 runs this build
    later = _warnings_of(device_check.check_cuda_devices, [0, 1, 2])  # only the new one
    assert len(later) == 1 and "cuda:2 (sm_80)" in later[0] and "cuda:0" not in later[0]
    assert 'NEMOKERNELS_CUDA_ARCHS="90a;100a;80"' in later[0]


def test_one_warning_names_every_device_without_code(fake_gpus):
    fake_gpus.update({0: B300, 1: B300, 2: B200})
    (msg,) = _warnings_of(device_check.check_cuda_devices, range(3))
    assert "cuda:0 (sm_103), cuda:1 (sm_103)" in msg and "cuda:2" not in msg
    assert 'NEMOKERNELS_CUDA_ARCHS="90a;100a;103a"' in msg


def test_no_warning_when_the_rule_cannot_decide(fake_gpus, monkeypatch):
    monkeypatch.setattr(device_check, "compiled_archs", lambda: ["compute_x"])
    fake_gpus[0] = H100
    assert _warnings_of(device_check.check_cuda_devices, [0]) == []


def test_the_check_at_cuda_init_judges_every_visible_device(fake_gpus, monkeypatch, capsys):
    fake_gpus.update({0: H100, 1: RTX5090})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    (msg,) = _warnings_of(device_check._at_cuda_init)
    assert "cuda:1 (sm_120)" in msg
    # Under -W error the warning must not fail torch's CUDA initialisation: it is printed.
    monkeypatch.setattr(device_check, "_checked", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", NemokernelsWarning)
        device_check._at_cuda_init()
    assert "cuda:1 (sm_120)" in capsys.readouterr().err
    # nor may a failing device query: the check only advises
    monkeypatch.setattr(device_check, "_checked", set())
    monkeypatch.setattr(device_check, "_capability", lambda i: (_ for _ in ()).throw(RuntimeError("query failed")))
    device_check._at_cuda_init()
    assert "could not check the GPUs" in capsys.readouterr().err


def test_a_cuda_build_queues_the_check_at_cuda_init(fake_gpus, monkeypatch):
    queued = []
    monkeypatch.setattr(torch.cuda, "_lazy_call", queued.append)
    monkeypatch.setattr(device_check, "_library", None)
    device_check.install()
    assert queued == [device_check._at_cuda_init]


def test_info_path_follows_the_rule(fake_gpus, monkeypatch):
    fake_gpus.update({0: B300, 1: B200})
    monkeypatch.setattr(info, "has_cuda_kernel", lambda op: True)
    monkeypatch.setattr(_C, "cuda_archs", "sm_90a,sm_100a")
    assert info.op_path("moe_gather", torch.device("cuda", 0)) == "unavailable: built for sm_90a,sm_100a, device is sm_103"
    assert info.op_path("moe_gather", torch.device("cuda", 1)) == "cuda"


@pytest.mark.skipif(_C.with_cuda, reason="a CUDA build registers CUDA kernels of its own")
def test_cpu_only_build_raises_the_fix_for_cuda_tensors():
    """Every op's CUDA kernel is the raising one, and the dispatcher reaches it (the call is sent
    to the CUDA key explicitly: there is no CUDA tensor here)."""
    assert device_check.GUARDED == set(OPS) and info.cuda_ops() == []
    assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f"nemokernels::{op}", "CUDA") for op in OPS)
    ids = torch.zeros(4, 2, dtype=torch.int32)
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError) as err:
        torch.ops.nemokernels.moe_permute_plan.default.redispatch(cuda, ids, 4, 1)
    msg = str(err.value)
    assert "nemokernels::moe_permute_plan got CUDA tensors" in msg and "no CUDA kernels" in msg
    assert "NEMOKERNELS_BUILD_CUDA=1" in msg and "CUDA_HOME" in msg and "wheel built with CUDA" in msg
    # through the autograd formula (Python, register_autograd) too
    x, w = torch.randn(1, 4, 8, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    autograd_cuda = cuda | torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradCUDA)
    with pytest.raises(RuntimeError, match="causal_conv1d_fwd got CUDA tensors.*NEMOKERNELS_BUILD_CUDA=1"):
        torch.ops.nemokernels.causal_conv1d_fwd.default.redispatch(autograd_cuda, x, w, None, None, None, False, True)
    # the CPU kernel is untouched
    assert torch.ops.nemokernels.moe_permute_plan(ids, 4, 1)[0].tolist() == [8, 0, 0, 0]
