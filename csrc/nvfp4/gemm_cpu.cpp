// CPU kernel of nvfp4_gemm, tiled like the CUDA kernel: per (64-row, 64-column) output tile,
// K is walked in slabs of 256; each slab of A and B is decoded once into float32 buffers
// (e2m1(code) * e4m3(scale) is exact in float), then every output of the tile accumulates its
// products in float32 in increasing k (no FMA contraction is relied on: either way the error
// is float32 accumulation only). Epilogue: out = alpha * acc + bias[n], rounded
// once to the output dtype, alpha = a_global * b_global (float32).
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <vector>

#include "common/check.h"
#include "common/cpu_access.h"
#include "nvfp4/gemm.h"
#include "nvfp4/numerics.cuh"

namespace nk {
namespace {

constexpr int64_t kTileM = 64, kTileN = 64, kSlabK = 256;

// rows [r0, r0 + nr) x k [k0, k0 + nk) of an operand, decoded row-major into dst (nr x nk).
void decode_slab(const uint8_t* data, const uint8_t* scales, int64_t K, int64_t r0, int64_t nr,
                 int64_t k0, int64_t nk, float* dst) {
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* row = data + (r0 + r) * (K / 2);
    const uint8_t* srow = scales + (r0 + r) * (K / nvfp4::kBlock);
    for (int64_t k = 0; k < nk; k += nvfp4::kBlock) {
      const float s = nvfp4::e4m3_decode(srow[(k0 + k) / nvfp4::kBlock]);
      for (int j = 0; j < nvfp4::kBlock; j += 2) {
        const uint8_t byte = row[(k0 + k + j) / 2];
        dst[r * nk + k + j] = nvfp4::e2m1_decode(byte & 0xF) * s;
        dst[r * nk + k + j + 1] = nvfp4::e2m1_decode(byte >> 4) * s;
      }
    }
  }
}

template <typename T>
void gemm_tiles(const Nvfp4GemmParams& p) {
  const float alpha = *p.a_global * *p.b_global;
  const int64_t tiles_m = (p.M + kTileM - 1) / kTileM, tiles_n = (p.N + kTileN - 1) / kTileN;
  torch::stable::parallel_for(0, tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a_buf(kTileM * kSlabK), b_buf(kTileN * kSlabK), bt_buf(kSlabK * kTileN, 0.f),
        acc(kTileM * kTileN);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m0 = (t / tiles_n) * kTileM, n0 = (t % tiles_n) * kTileN;
      const int64_t nm = std::min(kTileM, p.M - m0), nn = std::min(kTileN, p.N - n0);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k0 = 0; k0 < p.K; k0 += kSlabK) {
        const int64_t nk = std::min(kSlabK, p.K - k0);  // a multiple of 16
        decode_slab(p.a_data, p.a_scales, p.K, m0, nm, k0, nk, a_buf.data());
        decode_slab(p.b_data, p.b_scales, p.K, n0, nn, k0, nk, b_buf.data());
        // B slab transposed to (k, column) so the inner loop runs over columns: each output
        // still sums its products in increasing k, and the loop vectorizes.
        for (int64_t j = 0; j < nn; ++j)
          for (int64_t k = 0; k < nk; ++k) bt_buf[k * kTileN + j] = b_buf[j * nk + k];
        for (int64_t i = 0; i < nm; ++i) {
          const float* a = a_buf.data() + i * nk;
          float* c = acc.data() + i * kTileN;
          for (int64_t k = 0; k < nk; ++k) {
            const float av = a[k];
            const float* b = bt_buf.data() + k * kTileN;
            for (int64_t j = 0; j < kTileN; ++j) c[j] += av * b[j];
          }
        }
      }
      for (int64_t i = 0; i < nm; ++i) {
        for (int64_t j = 0; j < nn; ++j) {
          float v = alpha * acc[i * kTileN + j];
          if (p.bias) v += p.bias[n0 + j];
          st<T>(p.out, (m0 + i) * p.N + n0 + j, v);
        }
      }
    }
  });
}

}  // namespace

void nvfp4_gemm_cpu(const Nvfp4GemmParams& p) {
  switch (p.out_dtype) {
    case DType::F32: gemm_tiles<float>(p); break;
    case DType::F16: gemm_tiles<c10::Half>(p); break;
    case DType::BF16: gemm_tiles<c10::BFloat16>(p); break;
  }
}

void nvfp4_swizzle_scales_cpu(const uint8_t* src, uint8_t* dst, int64_t rows, int64_t sf_cols) {
  const int64_t col_tiles = (sf_cols + 3) / 4;
  const int64_t size = nvfp4_sf_swizzled_size(rows, sf_cols);
  std::fill(dst, dst + size, uint8_t{0});
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < sf_cols; ++c) dst[nvfp4_sf_swizzled_offset(r, c, col_tiles)] = src[r * sf_cols + c];
  }
}

}  // namespace nk
