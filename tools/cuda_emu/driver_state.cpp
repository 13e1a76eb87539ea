// C ABI of the emulated decode state-update kernel (csrc/ssd/state_update_cuda.cu, rewritten by
// transform.py into state_update_cuda.emu.cpp in the build directory), for
// tests/ssd/test_cuda_emulation_state.py.
#include "emu_api.h"
#include "state_update_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of SsuArg / SsuParams (generated)

EMU_ENTRY(emu_ssu_cuda, SsuParams, selective_state_update_cuda)
EMU_COUNTERS
