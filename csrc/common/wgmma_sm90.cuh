// Pieces shared by the hand-written sm_90a wgmma kernels (the SSD's in csrc/ssd, the NVFP4
// GEMM's decode-in-the-mainloop kernel in csrc/nvfp4): where each value of a two-warpgroup
// wgmma fragment sits, the 128-byte-swizzled K-major tile offset, and 16-byte cp.async.
// Host-compilable: tests/ssd/sm90_layout_check.cu and tests/nvfp4/nvfp4_sm90_check.cu check the
// maps against CuTe's layouts without a GPU.
#pragma once

#include <cute/tensor.hpp>

#include "common/macros.h"

namespace nk {
namespace sm90 {

// Offset (elements) of (r, c) in a K-major 128-byte-swizzled tile of kRows rows of 16-bit values
// (GMMA::Layout_K_SW128_Atom tiled rows first: 8-row, 64-column atoms, 16-byte chunks XOR-ed with
// r % 8), written out for element reads whose addresses the kernels keep cheap. The host tests
// check it against the kernels' CuTe layouts for every element.
template <int kRows>
NK_HD constexpr int k_sw128_offset(int r, int c) {
  return (r / 8) * 512 + (c / 64) * (kRows * 64) + (r % 8) * 64 + (((c % 64) / 8) ^ (r % 8)) * 8 + c % 8;
}

// Where wgmma's float32 accumulator value v of thread tid sits in a (rows, cols) tile computed by
// two warpgroups along M (PTX ISA, "wgmma .m64nNk16 register fragments"): warp w of warpgroup g
// holds rows 64 g + 16 w + lane / 4 (values v with v & 2 == 0) and 8 rows below (v & 2 == 2);
// value v's column is 8 (v / 4) + 2 (lane % 4) + (v & 1). The same layout is the A operand's of
// the next product: its k-block k is values 8 k .. 8 k + 7. The host tests check both against
// the kernels' CuTe layouts for every thread.
NK_HD constexpr int frag_row(int tid, int v) { return 64 * (tid / 128) + 16 * (tid % 128 / 32) + tid % 32 / 4 + ((v & 2) ? 8 : 0); }
NK_HD constexpr int frag_col(int v, int lane) { return 8 * (v / 4) + 2 * (lane % 4) + (v & 1); }

// 16-byte (and 4-byte) cp.async, zero-filled when !pred (src is then not read); group commit and
// waits (all groups; all but the newest N).
CUTE_DEVICE void cp_async16(void* dst, const void* src, bool pred) {
#if defined(__CUDA_ARCH__)
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(pred ? 16 : 0) : "memory");
#else
  (void)dst, (void)src, (void)pred;
#endif
}
CUTE_DEVICE void cp_async4(void* dst, const void* src, bool pred) {
#if defined(__CUDA_ARCH__)
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(pred ? 4 : 0) : "memory");
#else
  (void)dst, (void)src, (void)pred;
#endif
}
CUTE_DEVICE void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
CUTE_DEVICE void cp_async_wait_all() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

template <int N>
CUTE_DEVICE void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace sm90
}  // namespace nk
