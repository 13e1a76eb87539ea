// C ABI helpers of the emulator libraries (tools/cuda_emu/driver_*.cpp).
#pragma once
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace emu {
// Runs f; returns 0, or 1 with the exception's message in err (a launch error reported
// through cudaGetLastError surfaces here as the kernels' NK_CUDA_CHECK exception).
template <class F>
int guarded(F&& f, char* err, int errlen) {
  last_error = cudaSuccess;
  last_error_msg.clear();
  try {
    f();
    if (last_error != cudaSuccess) {
      std::snprintf(err, errlen, "unchecked CUDA error: %s", last_error_msg.c_str());
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
  } catch (...) {
    std::snprintf(err, errlen, "unknown exception");
  }
  return 1;
}
}  // namespace emu

// `int NAME(const nk::PARAMS* p, char* err, int errlen)`: the kernel entry nk::FN(*p, nullptr
// stream) run under emu::guarded (0, or 1 with the error text).
#define EMU_ENTRY(NAME, PARAMS, FN)                                     \
  EMU_EXPORT int NAME(const nk::PARAMS* p, char* err, int errlen) {     \
    return emu::guarded([&] { nk::FN(*p, nullptr); }, err, errlen);     \
  }

// The scheduler's counters; one translation unit of each library states them.
#define EMU_COUNTERS                                                    \
  EMU_EXPORT long long emu_blocks_run() { return emu::blocks_run; }     \
  EMU_EXPORT long long emu_launches() { return emu::launches; }
