// Self-tests of the mocks (tests/ssd/test_cuda_emulation_ssd.py): each emu_selftest case is a tiny
// kernel with a known defect, which the emulator must report; case 0 is a clean kernel.
// Written in CUDA syntax and rewritten by transform.py like the real kernel files.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "emu_api.h"

namespace {

__global__ void clean_kernel(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  float v = s[63 - threadIdx.x];
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[blockIdx.x * 64 + threadIdx.x] = v;
}

// reads another thread's shared write without a barrier: sees the poison (NaN)
__global__ void missing_sync_kernel(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = 1.f;
  out[threadIdx.x] = s[63 - threadIdx.x];
}

// half of a warp waits in __syncwarp, the other half in __syncthreads: neither completes
__global__ void divergent_sync_kernel(float* out) {
  if ((threadIdx.x & 31) < 16) __syncwarp(); else __syncthreads();
  out[threadIdx.x] = 0.f;
}

// a 16-byte load from an address that is only 4-byte aligned
__global__ void misaligned_kernel(const float* in, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(in + 1);
  out[threadIdx.x] = v.x;
}

// a wmma load from a pointer that is 16- but not 32-byte aligned
__global__ void wmma_align_kernel(float* out) {
  namespace w = nvcuda::wmma;
  __shared__ __align__(128) __half tile[16 * 16 + 8];
  for (int i = threadIdx.x; i < 16 * 16 + 8; i += 32) tile[i] = __float2half_rn(1.f);
  __syncwarp();
  w::fragment<w::matrix_a, 16, 16, 16, __half, w::row_major> fa;
  w::load_matrix_sync(fa, tile + 8, 16);
  out[threadIdx.x] = 0.f;
}

// a lane reads the accumulator tile other lanes stored, without __syncwarp
__global__ void wmma_nosyncwarp_kernel(float* out) {
  namespace w = nvcuda::wmma;
  __shared__ __align__(128) float acc_s[16 * 16];
  w::fragment<w::accumulator, 16, 16, 16, float> acc;
  w::fill_fragment(acc, 2.f);
  w::store_matrix_sync(acc_s, acc, 16, w::mem_row_major);
  out[threadIdx.x] = acc_s[(threadIdx.x * 7 + 1) % 256];
}

// dynamic shared memory written one element past the launch's size
__global__ void smem_overflow_kernel(float* out) {
  extern __shared__ __align__(16) unsigned char dyn[];
  float* f = reinterpret_cast<float*>(dyn);
  if (threadIdx.x == 0) f[64] = 1.f;
  out[threadIdx.x] = 0.f;
}

}  // namespace

EMU_EXPORT int emu_selftest(int which, float* out, const float* in, char* err, int errlen) {
  return emu::guarded([&] {
    switch (which) {
      case 0: clean_kernel<<<2, 64>>>(out); break;
      case 1: missing_sync_kernel<<<1, 64>>>(out); break;
      case 2: divergent_sync_kernel<<<1, 32>>>(out); break;
      case 3: misaligned_kernel<<<1, 32>>>(in, out); break;
      case 4: wmma_align_kernel<<<1, 32>>>(out); break;
      case 5: wmma_nosyncwarp_kernel<<<1, 32>>>(out); break;
      case 6: smem_overflow_kernel<<<1, 32, 64 * sizeof(float)>>>(out); break;
      case 7: smem_overflow_kernel<<<1, 32, 60000>>>(out); break;  // > 48 KB without cudaFuncSetAttribute
      case 8: clean_kernel<<<1, 2048>>>(out); break;                // > 1024 threads
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) throw std::runtime_error(cudaGetErrorString(e));
  }, err, errlen);
}

EMU_EXPORT void emu_float2half(const float* in, uint16_t* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).bits;
}
EMU_EXPORT void emu_float2bf16(const float* in, uint16_t* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).bits;
}
EMU_EXPORT void emu_half2float(const uint16_t* in, float* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}
