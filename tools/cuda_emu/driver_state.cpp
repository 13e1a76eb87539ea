// C ABI of the emulated decode state-update kernel (csrc/ssd/state_update_cuda.cu, rewritten by
// transform.py into state_update_cuda.emu.cpp in the build directory), for
// tests/ssd/test_cuda_emulation_state.py. The test mirrors nk::SsuParams in ctypes by hand and
// checks every offset against emu_ssu_offset / emu_ssu_sizeof.
#include "emu_api.h"
#include "state_update_cuda.emu.cpp"

#include <cstddef>
#include <cstring>

EMU_EXPORT int emu_ssu_cuda(const nk::SsuParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::selective_state_update_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT long long emu_ssu_sizeof() { return (long long)sizeof(nk::SsuParams); }
EMU_EXPORT long long emu_ssu_arg_sizeof() { return (long long)sizeof(nk::SsuArg); }
EMU_EXPORT long long emu_ssu_offset(const char* f) {
#define EMU_F(name) if (!std::strcmp(f, #name)) return (long long)offsetof(nk::SsuParams, name);
  EMU_F(batch) EMU_F(seqlen) EMU_F(nheads) EMU_F(dim) EMU_F(dstate) EMU_F(heads_per_group) EMU_F(state_rows)
  EMU_F(dt_softplus) EMU_F(state_dtype) EMU_F(state) EMU_F(st_s) EMU_F(x) EMU_F(dt) EMU_F(z) EMU_F(B) EMU_F(C)
  EMU_F(A) EMU_F(D) EMU_F(dt_bias) EMU_F(state_indices) EMU_F(in_place) EMU_F(snap) EMU_F(snap_s) EMU_F(out)
  EMU_F(out_dtype) EMU_F(out_s) EMU_F(head_decay)
#undef EMU_F
  return -1;
}
EMU_EXPORT long long emu_ssu_blocks_run() { return emu::blocks_run; }
