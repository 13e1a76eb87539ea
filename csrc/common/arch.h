// Which devices the arch-specific (Blackwell) kernels of this build run on. Torch-free: used by
// op entries (.cpp), CUDA launchers (.cu) and the _C module's path reports alike, so the op and
// the tests that name the path they test share one predicate.
#pragma once

namespace nk {

// True when the *_sm100.cu kernels (tcgen05, block-scaled MMA) were compiled for a device of
// compute capability `cc` (major * 10 + minor). CMakeLists.txt sets bit cc - 100 of
// NK_SM100_CC_MASK from NEMOKERNELS_CUDA_ARCHS: an arch-specific target gives its own capability
// (100a -> 100, 103a -> 103), a family target its family (100f -> 100 and 103). Arch-specific
// code is not forward compatible: a B300 (sm_103) with a 100a-only build has no sm_100 kernels.
inline bool sm100_kernels_run_on(int cc) {
#if defined(NK_HAS_SM100) && defined(NK_SM100_CC_MASK)
  return cc >= 100 && cc < 110 && ((NK_SM100_CC_MASK >> (cc - 100)) & 1) != 0;
#else
  (void)cc;
  return false;
#endif
}

}  // namespace nk
