"""The gated RMSNorm CUDA kernels (csrc/ssd/rmsnorm_gated_cuda.cu) run on the CPU through the
emulator in tools/cuda_emu, forward and backward, each case checked against a float64 reference
inside the driver (tools/cuda_emu/driver_rmsnorm.cpp): 9 shapes x 3 gate modes x 2 dtypes, with
strided, padded and expanded layouts, every launch plan of the kernels."""
import ctypes

import pytest

import cuda_emu as _emu_base

KERNEL = _emu_base.CSRC / "ssd" / "rmsnorm_gated_cuda.cu"
NUM_CASES = 54
_LIB = []


def lib():
    if not _LIB:
        path = _emu_base.build_emulated("rmsnorm", _emu_base.EMU / "driver_rmsnorm.cpp",
                                        {"rmsnorm_gated_cuda.emu.cpp": _emu_base.transformed(KERNEL)}, families=("ssd",))
        L = ctypes.CDLL(str(path))
        L.emu_rmsnorm_case.restype = ctypes.c_int
        L.emu_rmsnorm_case.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        L.emu_rmsnorm_num_cases.restype = ctypes.c_int
        _LIB.append(L)
    return _LIB[0]


def test_case_count():
    assert lib().emu_rmsnorm_num_cases() == NUM_CASES


@pytest.mark.parametrize("case", range(NUM_CASES))
def test_emulated_kernels_match_float64_reference(case):
    buf = ctypes.create_string_buffer(512)
    rc = lib().emu_rmsnorm_case(case, buf, len(buf))
    assert rc == 0, f"case {case}: {buf.value.decode()}"
