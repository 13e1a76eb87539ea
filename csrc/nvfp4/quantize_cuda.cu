// CUDA kernels of NVFP4 quantize / dequantize (math in quantize.h; every scalar step is a
// numerics.cuh helper shared with the CPU kernel, so codes and scales are bit-identical).
// Details: docs/nvfp4.md, section `csrc/nvfp4/quantize_cuda.cu`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "nvfp4/numerics.cuh"
#include "nvfp4/quantize.h"

namespace nk {
namespace {

using namespace nvfp4;

constexpr int kThreads = 256;
// Upper bound of the grid (and of the amax partials); lowered by the host-emulation test so
// small tensors take several grid-stride iterations.
#ifndef NK_NVFP4_MAX_BLOCKS
#define NK_NVFP4_MAX_BLOCKS kAmaxMaxPartials
#endif
static_assert(NK_NVFP4_MAX_BLOCKS <= kAmaxMaxPartials, "the partials workspace holds kAmaxMaxPartials");
// Unit counts below this take the 32-bit unit -> (row, block) path; the host-emulation test
// also builds with 0 so the 64-bit path runs.
#ifndef NK_NVFP4_FAST_DIV_LIMIT
#define NK_NVFP4_FAST_DIV_LIMIT (int64_t(1) << 31)
#endif

// n / d for n < 2^31 without a division: q = (mulhi(n, mul) + n) >> shift, shift = ceil(log2 d),
// mul = 2^32 (2^shift - d) / d + 1 (Granlund-Montgomery; n + mulhi < 2^32 as n < 2^31). Checked
// against n / d for d < 5000 and 4e5 random d < 2^31 at n in {0..2000, 2^31 - 2000 .. 2^31 - 1,
// random} (docs/nvfp4.md).
struct FastDiv {
  uint32_t mul = 1;
  int shift = 0;
  static FastDiv of(uint32_t d) {
    FastDiv f;
    while ((uint64_t(1) << f.shift) < d) ++f.shift;
    f.mul = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << f.shift) - d)) / d + 1);
    return f;
  }
  NK_HD uint32_t div(uint32_t n) const {
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * mul) >> 32);
    return (t + n) >> shift;
  }
};

struct TileMap {
  int64_t rows, ntr, nblk;
  bool linear;      // row-major unit order (1x16 scales, row-major view), else 16x16 tile order
  bool pair_store;  // tile order with nblk even: lanes l and l + 16 hold adjacent blocks of a row
  bool fast;        // every unit index < 2^31: 32-bit unit -> (row, block) through fdiv
  FastDiv fdiv;     // division by nblk
  // Units: rows * nblk (linear), or ntr * nblk * 16 (tiles, the last row tile maybe partial).
  NK_DEVICE int64_t total() const { return linear ? rows * nblk : ntr * nblk * kBlock; }
  // Unit u -> (row, column block); row may be >= rows in the last, partial row tile. Tile order:
  // tile t = u / 16 is (tr, cb) = (t / nblk, t % nblk), lane u % 16 its row.
  NK_DEVICE void coords(int64_t u, int64_t& r, int64_t& cb) const {
    if (fast) {
      const uint32_t u32 = static_cast<uint32_t>(u);
      const uint32_t t = linear ? u32 : u32 >> 4;
      const uint32_t q = fdiv.div(t);
      cb = static_cast<int64_t>(t - q * static_cast<uint32_t>(nblk));
      r = linear ? int64_t(q) : int64_t(q) * kBlock + (u32 & 15u);
      return;
    }
    if (linear) {
      r = u / nblk;
      cb = u - r * nblk;
      return;
    }
    const int64_t t = u >> 4;
    const int64_t tr = t / nblk;
    cb = t - tr * nblk;
    r = tr * kBlock + (u & 15);
  }
};

TileMap make_map(const Nvfp4QuantParams& p) {
  TileMap m;
  m.rows = p.rows;
  m.ntr = (p.rows + kBlock - 1) / kBlock;
  m.nblk = p.cols / kBlock;
  const bool rows_fast = p.a_sr == 1 && p.a_sc != 1;  // a transposed view (quantize_t)
  m.linear = !p.block_2d && !rows_fast;
  // Warps start at even tiles (256 threads = 16 tiles a block), so with nblk even the two
  // half-warps always hold tiles (tr, cb) and (tr, cb + 1), cb even: one 16-byte store per row.
  m.pair_store = !m.linear && m.nblk % 2 == 0;
  // + 32: the warp-rounded unit count of the quantize loop stays below 2^31 too.
  const int64_t units = m.linear ? m.rows * m.nblk : m.ntr * m.nblk * kBlock;
  m.fast = units + 32 < NK_NVFP4_FAST_DIV_LIMIT;
  if (m.fast) m.fdiv = FastDiv::of(static_cast<uint32_t>(m.nblk));
  return m;
}

// The seed: from device memory when given as a tensor (changes between CUDA-graph replays).
NK_DEVICE uint64_t kernel_seed(const Nvfp4QuantParams& p) {
  return p.seed_ptr ? static_cast<uint64_t>(*p.seed_ptr) : p.seed;
}

// The 16 elements of (r, cb) as float32, Hadamard-transformed when `had`; returns max |v|.
template <typename T, bool kVec>
NK_DEVICE float load_block(const Nvfp4QuantParams& p, bool had, uint32_t signs, int64_t r, int64_t cb,
                           float (&v)[kBlock]) {
  const T* a = static_cast<const T*>(p.a) + r * p.a_sr + cb * kBlock * p.a_sc;
  if constexpr (kVec) {
    constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte load
#pragma unroll
    for (int q = 0; q < kBlock / kPer; ++q) {
      const uint4 raw = reinterpret_cast<const uint4*>(a)[q];
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        // bf16 -> f32 is the bits shifted up: one shift or one mask per element
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t lo = w[j] << 16, hi = w[j] & 0xffff0000u;
          memcpy(&v[q * kPer + 2 * j], &lo, sizeof(float));
          memcpy(&v[q * kPer + 2 * j + 1], &hi, sizeof(float));
        }
      } else {
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < kPer; ++j) v[q * kPer + j] = to_f<T>(e[j]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kBlock; ++j) v[j] = to_f<T>(a[j * p.a_sc]);
  }
  if (had) hadamard16(v, signs);
  float m = 0.0f;
#pragma unroll
  for (int j = 0; j < kBlock; ++j) m = nan_max(m, fabsf(v[j]));
  return m;
}

// NaN-propagating max over the block; the result is valid in every thread.
NK_DEVICE float block_max(float m, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // smem may still be read from a previous call
  if (lane == 0) smem[warp] = m;
  __syncthreads();
  m = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) m = nan_max(m, smem[w]);
  return m;
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) nvfp4_amax_kernel(Nvfp4QuantParams p, TileMap map) {
  __shared__ float smem[kThreads / 32];
  const uint32_t signs = p.hadamard ? nvfp4_hadamard_signs(kernel_seed(p)) : 0u;
  const int64_t total = map.total();
  float m = 0.0f;
  float v[kBlock];
  for (int64_t u = int64_t(blockIdx.x) * kThreads + threadIdx.x; u < total; u += int64_t(gridDim.x) * kThreads) {
    int64_t r, cb;
    map.coords(u, r, cb);
    if (r < map.rows) m = nan_max(m, load_block<T, kVec>(p, p.hadamard, signs, r, cb, v));
  }
  m = block_max(m, smem);
  if (threadIdx.x == 0) p.partials[blockIdx.x] = m;
}

// max |x| of a dense, 16-byte aligned tensor without the Hadamard transform: the amax does not
// depend on the tile order, so x is read as one flat array, kFlatUnroll independent 16-byte
// loads per thread in flight (kFlatUnroll * 16 B * resident threads per SM: docs/nvfp4.md).
constexpr int kFlatUnroll = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads) nvfp4_amax_flat_kernel(Nvfp4QuantParams p, int64_t n) {
  __shared__ float smem[kThreads / 32];
  constexpr int kPer = 16 / sizeof(T);
  const uint4* a = static_cast<const uint4*>(p.a);
  const int64_t nvec = n / kPer;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  float m = 0.0f;
  int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  for (; i + (kFlatUnroll - 1) * stride < nvec; i += kFlatUnroll * stride) {
    uint4 raw[kFlatUnroll];
#pragma unroll
    for (int k = 0; k < kFlatUnroll; ++k) raw[k] = a[i + k * stride];  // all loads issued first
#pragma unroll
    for (int k = 0; k < kFlatUnroll; ++k) {
      const T* e = reinterpret_cast<const T*>(&raw[k]);
#pragma unroll
      for (int j = 0; j < kPer; ++j) m = nan_max(m, fabsf(to_f<T>(e[j])));
    }
  }
  for (; i < nvec; i += stride) {
    const uint4 raw = a[i];
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kPer; ++j) m = nan_max(m, fabsf(to_f<T>(e[j])));
  }
  // n % kPer trailing elements (n is a multiple of 16, so none for bf16/fp16/fp32; kept for safety)
  for (int64_t t = nvec * kPer + int64_t(blockIdx.x) * kThreads + threadIdx.x; t < n; t += stride)
    m = nan_max(m, fabsf(to_f<T>(static_cast<const T*>(p.a)[t])));
  m = block_max(m, smem);
  if (threadIdx.x == 0) p.partials[blockIdx.x] = m;
}

// 8 packed codes of v[0..7] * inv: round to nearest even, or (kSr) stochastic rounding with
// bits[k] the Philox word of element k (nvfp4_sr_bits). The sign bit of y goes to bit 3 of
// every nibble (a shift and a mask: the device's NaN results are the canonical, positive NaN,
// so this is y < 0 except for -0) and is cleared afterwards, 8 nibbles at once, where the
// magnitude is 0 (e2m1_code: zero is always code 0): magnitude + 7 carries into bit 3 exactly
// when it is nonzero.
template <bool kSr>
NK_DEVICE uint32_t pack8(const float* v, float inv, const uint32_t* bits) {
  uint32_t w = 0u;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float y = v[k] * inv;
    // magnitude in bits 0..2 (raw(): bits above are junk), sign in bit 3: one 3-input LOP3
    const uint32_t mag = kSr ? e2m1_mag_sr(fabsf(y), philox_uniform(bits[k])) : e2m1_near(fabsf(y)).raw();
    w |= ((mag & 7u) | ((float_bits(y) >> 28) & ~7u)) << (4 * k);
  }
  const uint32_t nz = ((w & 0x77777777u) + 0x77777777u) & 0x88888888u;
  return w & (nz | 0x77777777u);
}

// The variant flags that change the per-element work are template arguments (kHad: Hadamard
// transform, kSr: stochastic rounding), so each instantiation holds only its own code; the
// 16x16 tile reduction (4 shuffles per unit) stays a runtime branch. kReverse walks the units
// from the last to the first: after the amax pass, whose last reads are the end of x, the
// first units read are the ones most likely still in L2.
template <typename T, bool kVec, bool kHad, bool kSr>
__global__ void __launch_bounds__(kThreads) nvfp4_quantize_kernel(Nvfp4QuantParams p, TileMap map,
                                                                  int nparts, bool reverse) {
  __shared__ float smem[kThreads / 32];
  // Prologue: the tensor amax (from the partials of the amax kernel, or given).
  float amax;
  if (p.global_amax) {
    amax = *p.global_amax;
  } else {
    float m = 0.0f;
    for (int i = threadIdx.x; i < nparts; i += kThreads) m = nan_max(m, p.partials[i]);
    amax = block_max(m, smem);
  }
  const float s_enc = nvfp4_encode_scale(amax);
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.global_scale = 1.0f / s_enc;
  const uint64_t seed = kernel_seed(p);
  const uint32_t signs = kHad ? nvfp4_hadamard_signs(seed) : 0u;
  const int64_t total = map.total();
  const int64_t nwarps = (total + 31) / 32;
  const int64_t half_cols = p.cols / 2;
  float v[kBlock];
  // Whole warps iterate together (the 2-D tile reduction and the paired store shuffle across
  // the warp); warp w covers units 32 w .. 32 w + 31 (two 16x16 tiles in tile order, so the
  // paired store's pairing holds in either direction); units past the end are inactive.
  const int64_t lane_off = threadIdx.x & 31;
  for (int64_t w = int64_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5); w < nwarps;
       w += int64_t(gridDim.x) * (kThreads / 32)) {
    const int64_t u = (reverse ? nwarps - 1 - w : w) * 32 + lane_off;
    int64_t r = 0, cb = 0;
    bool active = u < total;
    if (active) {
      map.coords(u, r, cb);
      active = r < map.rows;
    }
    float bmax = 0.0f;
    if (active) bmax = load_block<T, kVec>(p, kHad, signs, r, cb, v);
    float amax_b = bmax;
    if (p.block_2d) {
#pragma unroll
      for (int o = 1; o < kBlock; o <<= 1) amax_b = nan_max(amax_b, __shfl_xor_sync(0xffffffffu, amax_b, o));
    }
    uint32_t packed[2] = {0u, 0u};
    if (active) {
      const uint8_t sb = nvfp4_block_scale(amax_b, s_enc);
      const float inv = nvfp4_block_inv(sb, s_enc);
      p.scales[r * map.nblk + cb] = sb;
      if constexpr (kSr) {
        const uint64_t idx0 = static_cast<uint64_t>(r) * p.cols + cb * kBlock;
        uint32_t bits[kBlock];
#pragma unroll
        for (int q = 0; q < kBlock / 4; ++q) {
          const uint64_t c = (idx0 + 4 * q) >> 2;  // == nvfp4_sr_bits' counter of these 4 elements
          const Philox4 b = philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u,
                                          kTagStochastic, seed);
#pragma unroll
          for (int k = 0; k < 4; ++k) bits[4 * q + k] = b.v[k];
        }
        packed[0] = pack8<true>(v, inv, bits);
        packed[1] = pack8<true>(v + 8, inv, bits + 8);
      } else {
        packed[0] = pack8<false>(v, inv, nullptr);
        packed[1] = pack8<false>(v + 8, inv, nullptr);
      }
    }
    uint8_t* dst = p.data + r * half_cols + cb * (kBlock / 2);
    if (map.pair_store) {
      // Lane l < 16 stores its 8 bytes and those of lane l + 16 (same row, block cb + 1, which
      // is active exactly when lane l is): 16 bytes at r * C/2 + 8 cb, 16-byte aligned (cb even,
      // C/2 a multiple of 16 as nblk is even).
      const uint32_t n0 = __shfl_down_sync(0xffffffffu, packed[0], 16);
      const uint32_t n1 = __shfl_down_sync(0xffffffffu, packed[1], 16);
      if (active && lane_off < 16) *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], n0, n1);
    } else if (active) {
      // 8 bytes at byte offset r * C/2 + 8 cb: 8-byte aligned (C/2 is a multiple of 8).
      *reinterpret_cast<uint2*>(dst) = make_uint2(packed[0], packed[1]);
    }
  }
}

// Dequantize: one unit = 16 outputs of a row (8 code bytes, 1 scale byte in; 16 T out). A thread
// takes kDqUnroll units per step, units k * stride apart (each load and store instruction of a
// warp stays contiguous), and issues every load before the first decode: kDqUnroll * 9 bytes
// in flight per thread. kVec: rows of codes 8-byte aligned (one 8-byte load per unit).
constexpr int kDqUnroll = 4;

// PRMT: byte i of the result is byte (s >> 4i) & 7 of {a (bytes 0..3), b (bytes 4..7)}; bit 3 of
// each selector nibble is never set here. The host twin keeps the emulator on the same bytes.
NK_DEVICE uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, s);
#else
  const uint64_t ab = (uint64_t(b) << 32) | a;
  uint32_t r = 0u;
  for (int i = 0; i < 4; ++i) r |= uint32_t((ab >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
#endif
}

// (e2m1(code) * sb) * g for the 8 codes of w (code k in bits 4k..4k+3), rounded to T, stored at
// out. The magnitudes come from two 8-entry byte tables (the high and low bytes of their bf16
// encodings: 0 .5 1 1.5 2 3 4 6 are exact in bf16) looked up by PRMT, 4 codes per lookup;
// two more PRMTs interleave them into bf16 pairs and one PRMT + one LOP3 per pair adds the
// sign bits (code bit 3 -> bit 15 / 31). A pair widens to float32 by a shift and a mask.
// Every product e2m1 * sb is exact, so this is bit-identical to e2m1_decode (code 8 is -0).
template <typename T>
NK_DEVICE void decode8(uint32_t w, float sb, float g, T* out) {
  constexpr uint32_t kHiA = 0x3f3f3f00u, kHiB = 0x40404040u;  // high bytes of bf16(e2m1(0..7))
  constexpr uint32_t kLoA = 0xc0800000u, kLoB = 0xc0804000u;  // low bytes
  const uint32_t w4 = w << 4;  // byte j of w4 has code 2j's sign at bit 7; byte j of w, code 2j + 1's
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // codes 4h .. 4h + 3
    const uint32_t sel = (w >> (16 * h)) & 0x7777u;
    const uint32_t hi = byte_perm(kHiA, kHiB, sel), lo = byte_perm(kLoA, kLoB, sel);
#pragma unroll
    for (int q = 0; q < 2; ++q) {  // codes 4h + 2q, 4h + 2q + 1
      const uint32_t pair = byte_perm(lo, hi, q ? 0x7362u : 0x5140u);
      const uint32_t j = 2 * h + q;  // byte of w holding the two codes
      const uint32_t sgn = byte_perm(w4, w, ((4u + j) << 12) | (j << 4));
      const uint32_t b = pair | (sgn & 0x80008000u);
      const uint32_t b0 = b << 16, b1 = b & 0xffff0000u;
      float v0, v1;
      memcpy(&v0, &b0, sizeof(v0));
      memcpy(&v1, &b1, sizeof(v1));
      out[4 * h + 2 * q] = from_f<T>((v0 * sb) * g);
      out[4 * h + 2 * q + 1] = from_f<T>((v1 * sb) * g);
    }
  }
}

// Unit u -> (row, block): the 32-bit multiply-shift division when `fast` (units < 2^31).
NK_DEVICE void dq_coords(int64_t u, int64_t nblk, bool fast, FastDiv fdiv, int64_t& r, int64_t& cb) {
  if (fast) {
    const uint32_t q = fdiv.div(static_cast<uint32_t>(u));
    r = q;
    cb = static_cast<int64_t>(static_cast<uint32_t>(u) - q * static_cast<uint32_t>(nblk));
  } else {
    r = u / nblk;
    cb = u - r * nblk;
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) nvfp4_dequantize_kernel(Nvfp4DequantParams p, bool fast, FastDiv fdiv) {
  const int64_t nblk = p.cols / kBlock, total = p.rows * nblk;
  const float g = p.global_scale != nullptr ? *p.global_scale : 1.0f;  // null: the bare e2m1 x e4m3
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t u0 = int64_t(blockIdx.x) * kThreads + threadIdx.x; u0 < total; u0 += kDqUnroll * stride) {
    uint2 codes[kDqUnroll];
    uint8_t sbyte[kDqUnroll];
#pragma unroll
    for (int k = 0; k < kDqUnroll; ++k) {  // loads first
      const int64_t u = u0 + k * stride;
      codes[k] = make_uint2(0u, 0u);
      sbyte[k] = 0;
      if (u < total) {
        int64_t r, cb;
        dq_coords(u, nblk, fast, fdiv, r, cb);
        const uint8_t* in = p.data + r * p.d_sr + cb * (kBlock / 2);
        sbyte[k] = p.scales[r * p.s_sr + cb];
        if constexpr (kVec) {
          codes[k] = *reinterpret_cast<const uint2*>(in);
        } else {
          uint32_t lo = 0u, hi = 0u;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            lo |= uint32_t(in[j]) << (8 * j);
            hi |= uint32_t(in[4 + j]) << (8 * j);
          }
          codes[k] = make_uint2(lo, hi);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kDqUnroll; ++k) {
      const int64_t u = u0 + k * stride;
      if (u >= total) break;
      int64_t r, cb;
      dq_coords(u, nblk, fast, fdiv, r, cb);
      const float sb = e4m3_decode(sbyte[k]);
      alignas(16) T out[kBlock];
      decode8<T>(codes[k].x, sb, g, out);
      decode8<T>(codes[k].y, sb, g, out + 8);
      // Output rows are C * sizeof(T) bytes, a multiple of 32: 16-byte aligned vector stores.
      uint4* dst = reinterpret_cast<uint4*>(static_cast<T*>(p.out) + r * p.cols + cb * kBlock);
#pragma unroll
      for (int q = 0; q < int(kBlock * sizeof(T) / 16); ++q) dst[q] = reinterpret_cast<const uint4*>(out)[q];
    }
  }
}

// One wave of `Kernel`: the blocks that are resident at once (registers bound it; asked of the
// runtime once per instantiation), so a grid-stride loop has no partial second wave.
template <auto Kernel>
int resident_grid() {
  static std::atomic<int> cache{0};
  int n = cache.load(std::memory_order_relaxed);
  if (n == 0) {
    NK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, 0));
    n = std::max(n, 1);
    cache.store(n, std::memory_order_relaxed);
  }
  return std::min<int>(NK_NVFP4_MAX_BLOCKS, sm_count() * n);
}

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f.template operator()<float>(); break;
    case DType::F16: f.template operator()<__half>(); break;
    case DType::BF16: f.template operator()<__nv_bfloat16>(); break;
  }
}

}  // namespace

void nvfp4_quantize_cuda(const Nvfp4QuantParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const TileMap map = make_map(p);
  const int64_t total = map.linear ? map.rows * map.nblk : map.ntr * map.nblk * kBlock;
  const int64_t want = (total + kThreads - 1) / kThreads;  // blocks with one unit per thread
  const int esize = dtype_size(p.dtype);
  const bool aligned = reinterpret_cast<uintptr_t>(p.a) % 16 == 0;
  // 16-byte vector loads: unit column stride, 16-byte aligned base and row starts.
  const bool vec = p.a_sc == 1 && aligned && (p.a_sr * esize) % 16 == 0;
  // Dense (row-major or its transposed view, no gaps): the amax pass reads x as a flat array.
  const int64_t n = p.rows * p.cols;
  const bool dense = (p.a_sc == 1 && p.a_sr == p.cols) || (p.a_sr == 1 && p.a_sc == p.rows);
  const bool flat = !p.hadamard && dense && aligned;
  const int64_t flat_want = std::max<int64_t>(1, (n * esize / 16 + kThreads * kFlatUnroll - 1) / (kThreads * kFlatUnroll));
  dispatch(p.dtype, [&]<typename T>() {
    auto run = [&]<bool kVec, bool kHad, bool kSr>() {
      int nparts = 0;
      if (!p.global_amax) {
        if (flat) {
          nparts = static_cast<int>(std::min<int64_t>(resident_grid<nvfp4_amax_flat_kernel<T>>(), flat_want));
          nvfp4_amax_flat_kernel<T><<<nparts, kThreads, 0, s>>>(p, n);
        } else {
          nparts = static_cast<int>(std::min<int64_t>(resident_grid<nvfp4_amax_kernel<T, kVec>>(), want));
          nvfp4_amax_kernel<T, kVec><<<nparts, kThreads, 0, s>>>(p, map);
        }
        NK_CUDA_LAUNCH_CHECK();
      }
      const int grid = static_cast<int>(std::min<int64_t>(resident_grid<nvfp4_quantize_kernel<T, kVec, kHad, kSr>>(), want));
      // Walk backwards after an amax pass (L2 reuse of its last reads), forwards otherwise.
      nvfp4_quantize_kernel<T, kVec, kHad, kSr><<<grid, kThreads, 0, s>>>(p, map, nparts, !p.global_amax);
      NK_CUDA_LAUNCH_CHECK();
    };
    auto by_variant = [&]<bool kVec>() {
      if (p.hadamard) {
        if (p.stochastic) run.template operator()<kVec, true, true>();
        else run.template operator()<kVec, true, false>();
      } else {
        if (p.stochastic) run.template operator()<kVec, false, true>();
        else run.template operator()<kVec, false, false>();
      }
    };
    if (vec) by_variant.template operator()<true>();
    else by_variant.template operator()<false>();
  });
}

void nvfp4_dequantize_cuda(const Nvfp4DequantParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t total = p.rows * (p.cols / kBlock);
  const int64_t want = (total + int64_t(kThreads) * kDqUnroll - 1) / (int64_t(kThreads) * kDqUnroll);
  const bool vec = reinterpret_cast<uintptr_t>(p.data) % 8 == 0 && p.d_sr % 8 == 0;
  dispatch(p.dtype, [&]<typename T>() {
    auto run = [&]<bool kVec>() {
      const int grid = static_cast<int>(std::min<int64_t>(resident_grid<nvfp4_dequantize_kernel<T, kVec>>(), want));
      // + one step of the unrolled loop: its largest unit index stays below 2^31 too
      const bool fast = total + int64_t(grid) * kThreads * kDqUnroll < NK_NVFP4_FAST_DIV_LIMIT;
      const FastDiv fdiv = fast ? FastDiv::of(static_cast<uint32_t>(p.cols / kBlock)) : FastDiv{};
      nvfp4_dequantize_kernel<T, kVec><<<grid, kThreads, 0, s>>>(p, fast, fdiv);
      NK_CUDA_LAUNCH_CHECK();
    };
    if (vec) run.template operator()<true>();
    else run.template operator()<false>();
  });
}

}  // namespace nk
