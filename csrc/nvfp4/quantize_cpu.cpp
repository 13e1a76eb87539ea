// CPU kernels of NVFP4 quantize / dequantize (math in quantize.h, scalar steps in
// numerics.cuh, shared with the CUDA kernels so codes and scales are bit-identical).
// Same decomposition as the GPU: a 16x16 tile (16 rows x one 16-column block) is the unit of
// work; pass 1 reduces max |H a| per chunk of tiles (then over the chunks), pass 2 quantizes
// each tile (for block_2d the tile's 16 row maxima are reduced first).
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_access.h"
#include "nvfp4/numerics.cuh"
#include "nvfp4/quantize.h"

namespace nk {
namespace {

using namespace nvfp4;

// Tiles per parallel task (and per amax partial).
constexpr int64_t kTilesPerTask = 64;

// The 16 values of row r, block cb (Hadamard-transformed when asked); returns max |v|.
template <typename T>
float load_block(const Nvfp4QuantParams& p, uint32_t signs, int64_t r, int64_t cb, float (&v)[kBlock]) {
  const int64_t base = r * p.a_sr + cb * kBlock * p.a_sc;
  for (int j = 0; j < kBlock; ++j) v[j] = ld<T>(p.a, base + j * p.a_sc);
  if (p.hadamard) hadamard16(v, signs);
  float m = 0.0f;
  for (int j = 0; j < kBlock; ++j) m = nan_max(m, std::fabs(v[j]));
  return m;
}

}  // namespace

bool nvfp4_quantize_cpu(const Nvfp4QuantParams& p) {
  const int64_t R = p.rows, nblk = p.cols / kBlock, ntr = (R + kBlock - 1) / kBlock;
  const int64_t ntiles = ntr * nblk, ntasks = (ntiles + kTilesPerTask - 1) / kTilesPerTask;
  const uint64_t seed = p.seed_ptr ? static_cast<uint64_t>(*p.seed_ptr) : p.seed;
  const uint32_t signs = p.hadamard ? nvfp4_hadamard_signs(seed) : 0u;
  bool finite = true;
  dispatch_dtype(p.dtype, [&]<typename T>() {
    // Pass 1: amax (max is exact and order-independent; per-task partials, then over tasks).
    float amax;
    if (p.global_amax) {
      amax = *p.global_amax;
    } else {
      std::vector<float> part(ntasks, 0.0f);
      torch::stable::parallel_for(0, ntasks, 1, [&](int64_t b, int64_t e) {
        float v[kBlock];
        for (int64_t task = b; task < e; ++task) {
          float m = 0.0f;
          const int64_t t1 = std::min(ntiles, (task + 1) * kTilesPerTask);
          for (int64_t t = task * kTilesPerTask; t < t1; ++t) {
            const int64_t tr = t / nblk, cb = t % nblk;
            for (int64_t r = tr * kBlock; r < std::min(R, (tr + 1) * kBlock); ++r)
              m = nan_max(m, load_block<T>(p, signs, r, cb, v));
          }
          part[task] = m;
        }
      });
      amax = 0.0f;
      for (float m : part) amax = nan_max(amax, m);
    }
    const float s_enc = nvfp4_encode_scale(amax);
    *p.global_scale = 1.0f / s_enc;
    // Pass 2: quantize tile by tile; non-finite inputs flagged per task (no shared writes).
    std::vector<char> bad(ntasks, 0);
    torch::stable::parallel_for(0, ntasks, 1, [&](int64_t b, int64_t e) {
      float v[kBlock][kBlock];
      float bmax[kBlock];
      for (int64_t task = b; task < e; ++task) {
        const int64_t t1 = std::min(ntiles, (task + 1) * kTilesPerTask);
        for (int64_t t = task * kTilesPerTask; t < t1; ++t) {
          const int64_t tr = t / nblk, cb = t % nblk;
          const int nr = static_cast<int>(std::min<int64_t>(kBlock, R - tr * kBlock));
          float tmax = 0.0f;
          for (int i = 0; i < nr; ++i) {
            bmax[i] = load_block<T>(p, signs, tr * kBlock + i, cb, v[i]);
            tmax = nan_max(tmax, bmax[i]);
          }
          if (!std::isfinite(tmax)) bad[task] = 1;
          for (int i = 0; i < nr; ++i) {
            const int64_t r = tr * kBlock + i;
            const uint64_t idx0 = static_cast<uint64_t>(r) * p.cols + cb * kBlock;
            const uint8_t sb = nvfp4_block_scale(p.block_2d ? tmax : bmax[i], s_enc);
            const float inv = nvfp4_block_inv(sb, s_enc);
            p.scales[r * nblk + cb] = sb;
            uint8_t* out = p.data + r * (p.cols / 2) + cb * (kBlock / 2);
            uint8_t codes[kBlock];
            for (int j = 0; j < kBlock; ++j) {
              const float y = v[i][j] * inv;
              uint8_t mag;
              if (p.stochastic) {
                mag = e2m1_mag_sr(std::fabs(y), philox_uniform(nvfp4_sr_bits(seed, idx0 + j)));
              } else {
                mag = e2m1_mag_rne(std::fabs(y));
              }
              codes[j] = e2m1_code(y, mag);
            }
            for (int j = 0; j < kBlock / 2; ++j)
              out[j] = static_cast<uint8_t>(codes[2 * j] | (codes[2 * j + 1] << 4));
          }
        }
      }
    });
    for (char c : bad) finite = finite && !c;
  });
  return finite;
}

void nvfp4_dequantize_cpu(const Nvfp4DequantParams& p) {
  using nvfp4::kBlock;
  const int64_t nblk = p.cols / kBlock;
  const float g = p.global_scale != nullptr ? *p.global_scale : 1.0f;  // null: the bare e2m1 x e4m3
  dispatch_dtype(p.dtype, [&]<typename T>() {
    torch::stable::parallel_for(0, p.rows, std::max<int64_t>(1, 16384 / p.cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        for (int64_t cb = 0; cb < nblk; ++cb) {
          const float sb = nvfp4::e4m3_decode(p.scales[r * p.s_sr + cb]);
          const uint8_t* in = p.data + r * p.d_sr + cb * (kBlock / 2);
          for (int j = 0; j < kBlock; ++j) {
            const uint8_t code = (in[j / 2] >> (4 * (j & 1))) & 0xf;
            st<T>(p.out, r * p.cols + cb * kBlock + j, (nvfp4::e2m1_decode(code) * sb) * g);
          }
        }
      }
    });
  });
}

}  // namespace nk
