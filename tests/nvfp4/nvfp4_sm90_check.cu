// Host check of the NVFP4 decode-in-the-mainloop GEMM's pieces (csrc/nvfp4/gemm_decode_mma_sm90.cuh):
// the fp16x2 decoder against e2m1_decode x e4m3_decode for every 16-bit code input and every
// scale byte; the decode table and decode_row_lut's value and place of each element; the wgmma fragment map (register A
// operand and accumulators) against CuTe's layouts for every thread; the token tile's written-out
// offsets against its CuTe layout. Built and run by tests/nvfp4/test_nvfp4_sm90_check.py with
// nvcc (no GPU needed). Prints "ok" or the first mismatch.
#include <cmath>
#include <cstdio>
#include <cstring>

#include "nvfp4/gemm_decode_mma_sm90.cuh"

using namespace cute;
namespace ns = nk::nvfp4_sm90;
using nk::sm90::frag_col;
using nk::sm90::frag_row;

namespace {
// The 16-bit pattern of want in E (round to nearest); NaN matches any NaN.
template <class E>
bool same_bits(uint32_t got, float want) {
  if constexpr (ns::kIsHalf<E>) {
    if (std::isnan(want)) return (got & 0x7c00u) == 0x7c00u && (got & 0x3ffu) != 0;
    return got == __half_as_ushort(__float2half_rn(want));
  } else {
    if (std::isnan(want)) return (got & 0x7f80u) == 0x7f80u && (got & 0x7fu) != 0;
    return got == __bfloat16_as_ushort(__float2bfloat16_rn(want));
  }
}

template <class E>
int check_decoder() {
  for (uint32_t s = 0; s < 256; ++s) {
    const float sv = nk::nvfp4::e4m3_decode(static_cast<uint8_t>(s));
    const uint32_t sh = ns::e4m3x2_to_x2<E>(s | (s << 8));
    for (uint32_t x = 0; x < 65536; ++x) {
      uint32_t h0, h1;
      ns::e2m1x4_to_x2<E>(x | 0xabcd0000u, h0, h1);  // bits above 15 must not matter
      h0 = ns::mul2_bits<E>(h0, sh), h1 = ns::mul2_bits<E>(h1, sh);
      const uint32_t got[4] = {h0 & 0xffffu, h0 >> 16, h1 & 0xffffu, h1 >> 16};
      for (int i = 0; i < 4; ++i) {
        const float want = nk::nvfp4::e2m1_decode(static_cast<uint8_t>((x >> (4 * i)) & 0xfu)) * sv;
        if (!same_bits<E>(got[i], want)) {
          std::printf("decoder (%s): codes 0x%04x scale 0x%02x element %d: 0x%04x, want %g\n",
                      ns::kIsHalf<E> ? "fp16" : "bf16", x, s, i, got[i], want);
          return 1;
        }
      }
    }
  }
  return 0;
}

// The decode table's 256 entries, and decode_row_lut's value and place for every element: each
// lane (its byte t = lane % 4, its table copy) on random rows against e2m1 x e4m3.
template <class E>
int check_decode_row() {
  static uint32_t lut[ns::kLutWords];
  for (uint32_t b = 0; b < 256; ++b)
    for (int l = 0; l < 32; ++l) lut[32 * b + l] = ns::lut_entry<E>(b);
  for (uint32_t b = 0; b < 256; ++b) {
    const uint32_t e = lut[32 * b + 5];
    const float lo = nk::nvfp4::e2m1_decode(static_cast<uint8_t>(b & 0xf)),
                hi = nk::nvfp4::e2m1_decode(static_cast<uint8_t>(b >> 4));
    if (!same_bits<E>(e & 0xffffu, lo) || !same_bits<E>(e >> 16, hi)) {
      std::printf("lut entry 0x%02x: 0x%08x, want (%g, %g)\n", b, e, lo, hi);
      return 1;
    }
  }
  uint32_t seed = 12345;
  auto rnd = [&]() { return seed = seed * 1664525u + 1013904223u; };
  for (int trial = 0; trial < 2000; ++trial) {
    uint32_t w[8];
    for (auto& v : w) v = rnd();
    const uint32_t scales = rnd();
    for (int lane = 0; lane < 32; ++lane) {
      const int t = lane % 4;
      uint32_t out[4][2];
      ns::decode_row_lut<E>(w, scales, lane, lut, out);
      for (int kb = 0; kb < 4; ++kb) {
        const float sv = nk::nvfp4::e4m3_decode(static_cast<uint8_t>(scales >> (8 * kb)));
        for (int j = 0; j < 2; ++j)
          for (int h = 0; h < 2; ++h) {
            const int col = 16 * kb + 8 * j + 2 * t + h;  // element of the row's 64
            const uint32_t code = (w[col / 8] >> (4 * (col % 8))) & 0xfu;
            const float want = nk::nvfp4::e2m1_decode(static_cast<uint8_t>(code)) * sv;
            const uint32_t got = h ? out[kb][j] >> 16 : out[kb][j] & 0xffffu;
            if (!same_bits<E>(got, want)) {
              std::printf("decode_row_lut: lane %d block %d column %d: 0x%04x, want %g\n", lane, kb, col, got, want);
              return 1;
            }
          }
      }
    }
  }
  return 0;
}

template <class E, int kTok>
int check_fragments() {
  typename ns::Cfg<E, kTok>::Mma mma;
  if (size(mma) != ns::kThreads) {
    std::printf("the tiled MMA does not take %d threads\n", ns::kThreads);
    return 1;
  }
  for (int tid = 0; tid < ns::kThreads; ++tid) {
    const int lane = tid % 32;
    auto thr = mma.get_thread_slice(tid);
    auto a = thr.partition_A(make_identity_tensor(Shape<Int<ns::kRows>, Int<ns::kK>>{}));
    auto c = thr.partition_C(make_identity_tensor(Shape<Int<ns::kRows>, Int<kTok>>{}));
    if (size(a) != 32 || size<0>(a) != 8 || size<1>(a) != 1 || size<2>(a) != 4 || size(c) != kTok / 2) {
      std::printf("fragment sizes differ from the kernel's\n");
      return 1;
    }
    for (int v = 0; v < kTok / 2; ++v) {
      const int r = frag_row(tid, v), col = frag_col(v, lane);
      if (get<0>(c(v)) != r || get<1>(c(v)) != col) {
        std::printf("accumulator tid %d value %d is (%d, %d), frag map says (%d, %d)\n", tid, v, int(get<0>(c(v))),
                    int(get<1>(c(v))), r, col);
        return 1;
      }
      if (v < 32) {
        auto av = a(v % 8, 0, v / 8);
        if (get<0>(av) != r || get<1>(av) != col) {
          std::printf("A operand tid %d value %d is (%d, %d), frag map says (%d, %d)\n", tid, v, int(get<0>(av)),
                      int(get<1>(av)), r, col);
          return 1;
        }
      }
    }
  }
  return 0;
}

template <class E, int kTok>
int check_tile() {
  alignas(1024) static E buf[kTok * ns::kK];
  Tensor t = make_tensor(make_smem_ptr(buf), typename ns::Cfg<E, kTok>::SmemX{});
  for (int r = 0; r < kTok; ++r)
    for (int c = 0; c < ns::kK; ++c) {
      const int got = static_cast<int>(&t(r, c) - buf), want = nk::sm90::k_sw128_offset<kTok>(r, c);
      if (got != want) {
        std::printf("token tile (%d, %d) at %d, k_sw128_offset says %d\n", r, c, got, want);
        return 1;
      }
    }
  return 0;
}
}  // namespace

int main() {
  using H = cute::half_t;
  using B = cute::bfloat16_t;
  if (check_decoder<H>() || check_decoder<B>() || check_decode_row<H>() || check_decode_row<B>() ||
      check_fragments<H, 64>() || check_fragments<H, 128>() || check_fragments<H, 256>() ||
      check_fragments<B, 64>() || check_fragments<B, 128>() || check_tile<H, 64>() || check_tile<H, 128>() ||
      check_tile<H, 256>() || check_tile<B, 64>() || check_tile<B, 128>())
    return 1;
  std::printf("ok\n");
  return 0;
}
