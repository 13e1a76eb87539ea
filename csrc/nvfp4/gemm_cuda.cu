// Portable NVFP4 GEMM (every arch >= sm_80; the sm_90 path): out = alpha * A_hat @ B_hat^T
// + bias with A_hat, B_hat dequantized in registers, never in memory.
// Details: docs/nvfp4.md, section `csrc/nvfp4/gemm_cuda.cu`.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "nvfp4/gemm.h"
#include "nvfp4/gemm_common.cuh"
#include "nvfp4/numerics.cuh"
#include "nvfp4/quantize.h"

namespace nk {
namespace {

constexpr int kBM = 128, kBN = 128;  // block tile (rows of A, rows of B)
constexpr int kBK = 64;              // K elements per tile
constexpr int kRowBytes = kBK / 2;   // packed code bytes per row per tile
constexpr int kThreads = 128;        // 4 warps: 2 (M) x 2 (N), 64 x 64 each
constexpr int kStages = 2;
constexpr int kMT = 4, kNT = 8;      // m16 / n8 MMA tiles per warp

struct __align__(16) GemmSmem {
  uint8_t a[kStages][kBM * kRowBytes];
  uint8_t b[kStages][kBN * kRowBytes];
  uint32_t a_sf[kStages][kBM];  // the tile's 4 scale bytes of each row (byte j = block j)
  uint32_t b_sf[kStages][kBN];
};

// The PTX pieces (cp.async, mma.sync, fp16x2 multiply), and C++ equivalents for the CPU
// emulator (tools/cuda_emu; tests/nvfp4/test_cuda_emulation_nvfp4_gemm.py runs this file there).
#ifdef EMU_HAVE_INT_ATOMICS
#define NK_NVFP4_EMU 1
#endif

#ifndef NK_NVFP4_EMU
__device__ __forceinline__ void cp_async8(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 8 : 0;  // 0: nothing read, 8 zero bytes written
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void mma_f16_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// fp16x2 (as bits) times fp16x2 (as bits).
__device__ __forceinline__ uint32_t hmul2_u32(uint32_t x, uint32_t s) {
  __half2 h = __hmul2(*reinterpret_cast<__half2*>(&x), *reinterpret_cast<__half2*>(&s));
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t half2_bits(float v) {
  __half2 h = __float2half2_rn(v);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint8_t ld_u8(const uint8_t* p) { return __ldg(p); }
#else
inline void cp_async8(void* smem, const void* gmem, bool valid) {
  if (valid) std::memcpy(smem, gmem, 8);
  else std::memset(smem, 0, 8);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

inline float half_lo(uint32_t x) { return __half2float(__half{static_cast<uint16_t>(x & 0xffffu)}); }
inline float half_hi(uint32_t x) { return __half2float(__half{static_cast<uint16_t>(x >> 16)}); }
// mma.sync m16n8k16 with the PTX fragment layout: every lane publishes its registers, then
// computes its own four accumulators (A row r, k from lane (r%8)*4 + (k%8)/2, register
// (r>=8) + 2(k>=8), half k%2; B column n, k from lane n*4 + (k%8)/2, register k>=8).
inline void mma_f16_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                          uint32_t b1) {
  static uint32_t frag[32][32][6];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  for (int i = 0; i < 6; ++i) frag[warp][lane][i] = mine[i];
  __syncwarp();
  const int g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float sum = c[e];
    for (int k = 0; k < 16; ++k) {
      const uint32_t ar = frag[warp][(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)];
      const uint32_t br = frag[warp][col * 4 + (k % 8) / 2][4 + (k >= 8)];
      sum += ((k & 1) ? half_hi(ar) : half_lo(ar)) * ((k & 1) ? half_hi(br) : half_lo(br));
    }
    c[e] = sum;
  }
  __syncwarp();
}
inline uint32_t hmul2_u32(uint32_t x, uint32_t s) {  // exact here: the products fit fp16
  const uint32_t lo = __float2half_rn(half_lo(x) * half_lo(s)).bits, hi = __float2half_rn(half_hi(x) * half_hi(s)).bits;
  return lo | (hi << 16);
}
inline uint32_t half2_bits(float v) {
  const uint32_t b = __float2half_rn(v).bits;
  return b | (b << 16);
}
inline uint8_t ld_u8(const uint8_t* p) { return *p; }
#endif

// Scale byte j of a packed 4-byte row word, as an exact fp16x2 broadcast (bits).
__device__ __forceinline__ uint32_t scale_h2(uint32_t word, int j) {
  return half2_bits(nvfp4::e4m3_decode(static_cast<uint8_t>(word >> (8 * j))));  // e4m3 values are fp16 values
}

// The 4 scale bytes of tile kt for `row` (zero past rows / K/16).
__device__ __forceinline__ uint32_t load_sf_word(const uint8_t* sf, int64_t rows, int64_t row, int64_t nblk,
                                                 int kt) {
  uint32_t v = 0;
  if (row < rows) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = int64_t(kt) * 4 + j;
      if (c < nblk) v |= uint32_t(ld_u8(sf + row * nblk + c)) << (8 * j);
    }
  }
  return v;
}

// Issue the cp.async copies of tile kt's packed codes (A and B) into stage `st`.
__device__ __forceinline__ void load_codes(GemmSmem& sm, int st, const Nvfp4GemmParams& p, int64_t m0,
                                           int64_t n0, int kt, int tid) {
  const int64_t row_bytes = p.K / 2;
  const int64_t k_byte0 = int64_t(kt) * kRowBytes;
#pragma unroll
  for (int i = 0; i < kBM * kRowBytes / 8 / kThreads; ++i) {
    const int c = tid + i * kThreads, r = c >> 2, col = (c & 3) * 8;
    const int64_t kb = k_byte0 + col;
    const bool ok = (m0 + r < p.M) && (kb < row_bytes);
    cp_async8(&sm.a[st][r * kRowBytes + col], ok ? p.a_data + (m0 + r) * row_bytes + kb : p.a_data, ok);
  }
#pragma unroll
  for (int i = 0; i < kBN * kRowBytes / 8 / kThreads; ++i) {
    const int c = tid + i * kThreads, r = c >> 2, col = (c & 3) * 8;
    const int64_t kb = k_byte0 + col;
    const bool ok = (n0 + r < p.N) && (kb < row_bytes);
    cp_async8(&sm.b[st][r * kRowBytes + col], ok ? p.b_data + (n0 + r) * row_bytes + kb : p.b_data, ok);
  }
}

// Split-K: block z of gridDim.z covers K tiles [z * kt_per_split, (z + 1) * kt_per_split) and,
// when `partial` is given, stores its raw float32 sums to partial[z] (M, N) for
// split_reduce_kernel instead of the epilogue.
template <typename OutT>
__global__ void __launch_bounds__(kThreads)
    nvfp4_gemm_kernel(const Nvfp4GemmParams p, float* __restrict__ partial, int kt_per_split) {
  __shared__ GemmSmem sm;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = (warp & 1) * 64, wn = (warp >> 1) * 64;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int64_t nblk = p.K / 16;
  const int total_kt = static_cast<int>((p.K + kBK - 1) / kBK);
  const int kt0 = static_cast<int>(blockIdx.z) * kt_per_split;
  const int num_kt = max(0, min(total_kt - kt0, kt_per_split));  // K tiles of this split

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  if (num_kt > 0) {
    load_codes(sm, 0, p, m0, n0, kt0, tid);
    cp_async_commit();
    sm.a_sf[0][tid] = load_sf_word(p.a_scales, p.M, m0 + tid, nblk, kt0);
    sm.b_sf[0][tid] = load_sf_word(p.b_scales, p.N, n0 + tid, nblk, kt0);
  }
  for (int kt = 0; kt < num_kt; ++kt) {
    const int st = kt & 1;
    const bool more = kt + 1 < num_kt;
    uint32_t next_a_sf = 0, next_b_sf = 0;
    if (more) {  // stage st^1 was last read in iteration kt-1, before its closing barrier
      load_codes(sm, st ^ 1, p, m0, n0, kt0 + kt + 1, tid);
      cp_async_commit();
      next_a_sf = load_sf_word(p.a_scales, p.M, m0 + tid, nblk, kt0 + kt + 1);
      next_b_sf = load_sf_word(p.b_scales, p.N, n0 + tid, nblk, kt0 + kt + 1);
      cp_async_wait<1>();  // tile kt has landed (tile kt+1 may be in flight)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile kt's codes (cp.async) and scales (stored last iteration) visible

    // A: this lane's 8 rows (m16 tile i, half h: row wm + 16i + g + 8h), block t's 8 bytes.
    uint2 a_words[kMT][2];
    uint32_t a_scale[kMT][2];
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm + 16 * i + g + 8 * h;
        a_words[i][h] = *reinterpret_cast<const uint2*>(&sm.a[st][r * kRowBytes + 8 * t]);
        a_scale[i][h] = scale_h2(sm.a_sf[st][r], t);
      }
#pragma unroll
    for (int w = 0; w < 2; ++w) {  // word w: elements 16t + 8w .. 16t + 8w + 7
      uint32_t ha[kMT][2][4];
#pragma unroll
      for (int i = 0; i < kMT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          nvfp4::e2m1x8_to_half2x4(w ? a_words[i][h].y : a_words[i][h].x, ha[i][h]);
#pragma unroll
          for (int j = 0; j < 4; ++j) ha[i][h][j] = hmul2_u32(ha[i][h][j], a_scale[i][h]);
        }
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        const int r = wn + 8 * n + g;  // B row = output column
        const uint2 bw = *reinterpret_cast<const uint2*>(&sm.b[st][r * kRowBytes + 8 * t]);
        const uint32_t bs = scale_h2(sm.b_sf[st][r], t);
        uint32_t hb[4];
        nvfp4::e2m1x8_to_half2x4(w ? bw.y : bw.x, hb);
#pragma unroll
        for (int j = 0; j < 4; ++j) hb[j] = hmul2_u32(hb[j], bs);
        // Two k16 steps per word: step s takes fp16x2 2s (k slots 2t, 2t+1) and 2s+1
        // (k slots 2t+8, 2t+9), the same for A (rows g, g+8) and B (column g).
#pragma unroll
        for (int s = 0; s < 2; ++s)
#pragma unroll
          for (int i = 0; i < kMT; ++i)
            mma_f16_16816(acc[i][n], ha[i][0][2 * s], ha[i][1][2 * s], ha[i][0][2 * s + 1], ha[i][1][2 * s + 1],
                          hb[2 * s], hb[2 * s + 1]);
      }
    }
    if (more) {  // stage st^1's scales: nobody reads that stage until after the next barrier
      sm.a_sf[st ^ 1][tid] = next_a_sf;
      sm.b_sf[st ^ 1][tid] = next_b_sf;
    }
    __syncthreads();  // stage st is overwritten by the next iteration's cp.async
  }

  // Epilogue. Accumulator layout of m16n8: c0, c1 at (row g, cols 2t, 2t+1), c2, c3 at row g+8.
  const float alpha = __ldg(p.a_global) * __ldg(p.b_global);
  OutT* out = static_cast<OutT*>(p.out);
  float* part = partial ? partial + int64_t(blockIdx.z) * p.M * p.N : nullptr;
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int n = 0; n < kNT; ++n)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + wm + 16 * i + g + 8 * h;
        if (row >= p.M) continue;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t col = n0 + wn + 8 * n + 2 * t + e;
          if (col >= p.N) continue;
          if (part) {
            part[row * p.N + col] = acc[i][n][2 * h + e];
            continue;
          }
          float v = alpha * acc[i][n][2 * h + e];
          if (p.bias) v += __ldg(p.bias + col);
          out[row * p.N + col] = from_f<OutT>(v);
        }
      }
}

// out = alpha * sum_z partial[z] + bias, the splits summed in order (deterministic).
template <typename OutT>
__global__ void split_reduce_kernel(const Nvfp4GemmParams p, const float* __restrict__ partial, int splits) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, mn = p.M * p.N;
  if (i >= mn) return;
  float s = 0.f;
  for (int z = 0; z < splits; ++z) s += partial[z * mn + i];
  float v = __ldg(p.a_global) * __ldg(p.b_global) * s;
  if (p.bias) v += __ldg(p.bias + i % p.N);
  static_cast<OutT*>(p.out)[i] = from_f<OutT>(v);
}

// One byte of the swizzled scale layout per thread (padding written as 0).
__global__ void swizzle_scales_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t rows,
                                      int64_t sf_cols, int64_t size) {
  const int64_t off = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (off >= size) return;
  const int64_t col_tiles = (sf_cols + 3) / 4;
  const int64_t atom = off / 512, in = off % 512;
  const int64_t r = (atom / col_tiles) * 128 + ((in % 16) / 4) * 32 + in / 16;
  const int64_t c = (atom % col_tiles) * 4 + in % 4;
  dst[off] = (r < rows && c < sf_cols) ? src[r * sf_cols + c] : uint8_t{0};
}

__global__ void alpha_kernel(const float* a, const float* b, float* alpha) { *alpha = *a * *b; }

template <typename OutT>
__global__ void bias_convert_kernel(const float* __restrict__ acc, const float* __restrict__ bias,
                                    OutT* __restrict__ out, int64_t M, int64_t N) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  float v = acc[i];
  if (bias) v += bias[i % N];
  out[i] = from_f<OutT>(v);
}

// Blocks of a one-element-per-thread grid over n elements (grid dimension x < 2^31). n is at
// most the bytes of a tensor in memory, so the limit is out of reach; the check keeps the int
// conversion honest.
unsigned blocks_1d(int64_t n, int threads, const char* what, const char* op = "nvfp4.gemm") {
  const int64_t b = (n + threads - 1) / threads;
  if (b > 2147483647LL) {
    throw std::runtime_error(std::string("nemokernels: ") + op + ": " + what + " = " + std::to_string(n) +
                             " elements exceed the one-thread-per-element grid (2^31 - 1 blocks of " +
                             std::to_string(threads) + "); split the problem into several calls");
  }
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

}  // namespace

int nvfp4_gemm_cuda_splits(const Nvfp4GemmParams& p) {
  // Split K only when the output tiles fill less than half the GPU and every split keeps at
  // least 4 K tiles (256 elements); at most 16 splits (the workspace is splits * M * N floats).
  const int sms = sm_count();
  const int64_t tiles = ((p.M + kBM - 1) / kBM) * ((p.N + kBN - 1) / kBN);
  const int64_t total_kt = (p.K + kBK - 1) / kBK;
  if (2 * tiles >= sms || total_kt < 8) return 1;
  int64_t splits = std::min<int64_t>({(sms + tiles - 1) / tiles, total_kt / 4, 16});
  const int64_t per = (total_kt + splits - 1) / splits;
  return static_cast<int>((total_kt + per - 1) / per);  // no empty split
}

void nvfp4_gemm_cuda(const Nvfp4GemmParams& p, int splits, float* workspace, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (splits < 1 || (splits > 1 && workspace == nullptr)) {
    throw std::runtime_error("nemokernels: nvfp4.gemm: internal: split-K needs a workspace");
  }
  // The entry keeps M <= kNvfp4PortableMaxM (grid y) and K <= kNvfp4PortableMaxK (int K tiles).
  const int total_kt = static_cast<int>((p.K + kBK - 1) / kBK);
  const int per = splits > 1 ? (total_kt + splits - 1) / splits : std::max(total_kt, 1);
  const dim3 grid(static_cast<unsigned>((p.N + kBN - 1) / kBN), static_cast<unsigned>((p.M + kBM - 1) / kBM), splits);
  if (p.M > kNvfp4PortableMaxM || p.K > kNvfp4PortableMaxK) {
    throw std::runtime_error("nemokernels: nvfp4.gemm: internal: the entry lets through a problem past the "
                             "portable kernel's limits");
  }
  float* part = splits > 1 ? workspace : nullptr;
  switch (p.out_dtype) {
    case DType::F32: nvfp4_gemm_kernel<float><<<grid, kThreads, 0, s>>>(p, part, per); break;
    case DType::F16: nvfp4_gemm_kernel<__half><<<grid, kThreads, 0, s>>>(p, part, per); break;
    case DType::BF16: nvfp4_gemm_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(p, part, per); break;
  }
  NK_CUDA_LAUNCH_CHECK();
  if (splits == 1) return;
  const unsigned blocks = blocks_1d(p.M * p.N, 256, "M * N");
  switch (p.out_dtype) {
    case DType::F32: split_reduce_kernel<float><<<blocks, 256, 0, s>>>(p, workspace, splits); break;
    case DType::F16: split_reduce_kernel<__half><<<blocks, 256, 0, s>>>(p, workspace, splits); break;
    case DType::BF16: split_reduce_kernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(p, workspace, splits); break;
  }
  NK_CUDA_LAUNCH_CHECK();
}

void nvfp4_swizzle_scales_cuda(const uint8_t* src, uint8_t* dst, int64_t rows, int64_t sf_cols, void* stream) {
  const int64_t size = nvfp4_sf_swizzled_size(rows, sf_cols);
  if (size == 0) return;
  swizzle_scales_kernel<<<blocks_1d(size, 256, "the swizzled scale bytes", "nvfp4_swizzle_scales"), 256, 0,
                          static_cast<cudaStream_t>(stream)>>>(src, dst, rows, sf_cols, size);
  NK_CUDA_LAUNCH_CHECK();
}

void nvfp4_alpha_cuda(const float* a_global, const float* b_global, float* alpha, void* stream) {
  alpha_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(a_global, b_global, alpha);
  NK_CUDA_LAUNCH_CHECK();
}

void nvfp4_bias_convert_cuda(const float* acc, const float* bias, void* out, DType out_dtype, int64_t M, int64_t N,
                             void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = blocks_1d(M * N, 256, "M * N");
  switch (out_dtype) {
    case DType::F32: bias_convert_kernel<float><<<blocks, 256, 0, s>>>(acc, bias, static_cast<float*>(out), M, N); break;
    case DType::F16: bias_convert_kernel<__half><<<blocks, 256, 0, s>>>(acc, bias, static_cast<__half*>(out), M, N); break;
    case DType::BF16:
      bias_convert_kernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(acc, bias, static_cast<__nv_bfloat16*>(out), M, N);
      break;
  }
  NK_CUDA_LAUNCH_CHECK();
}

#ifdef NK_HAS_SM90
// The sm_90 path (gemm.h): scratch = [A bf16 | B bf16 | float32 accumulator unless D is the output
// | alpha, offsets | CUTLASS workspace], each part 256-byte aligned.
namespace {
int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }
// D is the output itself when no bias follows and the output is bf16 or float32.
bool sm90_direct(const Nvfp4GemmParams& p) { return p.bias == nullptr && p.out_dtype != DType::F16; }
bool sm90_f32_d(const Nvfp4GemmParams& p) { return !(sm90_direct(p) && p.out_dtype == DType::BF16); }
// alpha = a_global * b_global, and the one group's row offsets {0, M}.
__global__ void sm90_setup_kernel(const float* a_global, const float* b_global, float* alpha, int32_t* offsets,
                                  int32_t M) {
  *alpha = *a_global * *b_global;
  offsets[0] = 0;
  offsets[1] = M;
}

}  // namespace

bool nvfp4_gemm_sm90_decode_mma(const Nvfp4GemmParams& p) {
  const char* v = std::getenv("NEMOKERNELS_NVFP4_GEMM_DECODE_MMA");
  return v != nullptr && v[0] == '1' && nvfp4_gemm_decode_mma_sm90_takes(p.M, p.N, p.K);
}

int64_t nvfp4_gemm_sm90_scratch_bytes(const Nvfp4GemmParams& p, bool decode_mma) {
  if (decode_mma) return align256(p.M * p.K * 2) + 256;  // [A fp16 | alpha]
  const int64_t acc = sm90_direct(p) ? 0 : align256(p.M * p.N * 4);
  return align256(p.M * p.K * 2) + align256(p.N * p.K * 2) + acc + 256 + nvfp4_gemm_sm90_workspace(sm90_f32_d(p));
}

void nvfp4_gemm_sm90(const Nvfp4GemmParams& p, bool decode_mma, void* scratch, void* stream) {
  char* ws = static_cast<char*>(scratch);
  if (decode_mma) {  // A to fp16 (exact), alpha; B is decoded by the GEMM itself
    Nvfp4DequantParams q{};
    q.rows = p.M, q.cols = p.K, q.data = p.a_data, q.d_sr = p.K / 2, q.scales = p.a_scales, q.s_sr = p.K / 16;
    q.global_scale = nullptr, q.dtype = DType::F16, q.out = ws;
    nvfp4_dequantize_cuda(q, stream);
    float* alpha = reinterpret_cast<float*>(ws + align256(p.M * p.K * 2));
    sm90_setup_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(
        p.a_global, p.b_global, alpha, reinterpret_cast<int32_t*>(alpha + 4), static_cast<int32_t>(p.M));
    NK_CUDA_LAUNCH_CHECK();
    nvfp4_gemm_decode_mma_sm90(p, ws, alpha, stream);
    return;
  }
  void* a16 = ws;
  ws += align256(p.M * p.K * 2);
  void* b16 = ws;
  ws += align256(p.N * p.K * 2);
  const bool direct = sm90_direct(p);
  void* d = direct ? p.out : ws;
  if (!direct) ws += align256(p.M * p.N * 4);
  float* alpha = reinterpret_cast<float*>(ws);
  int32_t* offsets = reinterpret_cast<int32_t*>(ws + 16);
  ws += 256;
  // Exact decode: no global scale (it is alpha in the epilogue), codes rows contiguous.
  for (const bool is_a : {true, false}) {
    Nvfp4DequantParams q{};
    q.rows = is_a ? p.M : p.N;
    q.cols = p.K;
    q.data = is_a ? p.a_data : p.b_data;
    q.d_sr = p.K / 2;
    q.scales = is_a ? p.a_scales : p.b_scales;
    q.s_sr = p.K / 16;
    q.global_scale = nullptr;
    q.dtype = DType::BF16;
    q.out = is_a ? a16 : b16;
    nvfp4_dequantize_cuda(q, stream);
  }
  sm90_setup_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(p.a_global, p.b_global, alpha, offsets,
                                                                    static_cast<int32_t>(p.M));
  NK_CUDA_LAUNCH_CHECK();
  nvfp4_gemm_sm90_run(p.M, p.N, p.K, a16, b16, alpha, offsets, d, sm90_f32_d(p), ws, stream);
  if (!direct) {  // alpha is in the accumulator already: bias, then one rounding
    nvfp4_bias_convert_cuda(static_cast<const float*>(d), p.bias, p.out, p.out_dtype, p.M, p.N, stream);
  }
}
#endif

#ifndef NK_NVFP4_EMU
int nvfp4_device_sm(int device_index) {
  // A clear error where there is no such device (a CUDA build on a machine without a GPU or
  // driver), rather than the runtime's message about driver versions.
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("nemokernels: nvfp4_gemm_path: no CUDA device is usable (") +
                             cudaGetErrorString(err) + ")");
  }
  if (device_index < 0 || device_index >= count)
    throw std::runtime_error("nemokernels: nvfp4_gemm_path: no CUDA device " + std::to_string(device_index) + " (" +
                             std::to_string(count) + " visible)");
  return device_cc(device_index);
}

#endif

}  // namespace nk
