// The gated RMSNorm CUDA kernels (csrc/ssd/rmsnorm_gated_cuda.cu, rewritten by transform.py into
// rmsnorm_gated_cuda.emu.cpp) run by the emulator and checked here against a float64 reference,
// forward and backward, over shapes and layouts that take every kernel path (54 cases), for
// tests/ssd/test_cuda_emulation_rmsnorm.py.
#include "emu_api.h"
#include "rmsnorm_gated_cuda.emu.cpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {
using namespace nk;
static std::mt19937 rng(1234);
static float randn() { static std::normal_distribution<float> d; return d(rng); }

template <typename T> T to_t(float v);
template <> float to_t<float>(float v) { return v; }
template <> __nv_bfloat16 to_t<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> double to_d(T v);
template <> double to_d<float>(float v) { return v; }
template <> double to_d<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

static double silu(double z) { return z / (1 + std::exp(-z)); }
static double dsilu(double z) { double s = 1 / (1 + std::exp(-z)); return s * (1 + z * (1 - s)); }

struct Err { double num = 0, den = 0; void add(double a, double b) { num += (a - b) * (a - b); den += b * b; }
  double rel() const { return den > 0 ? std::sqrt(num / den) : std::sqrt(num); } };

template <typename T>
int run_case(int64_t rows, int64_t D, int64_t G, int mode, bool bias, int layout, char* report, int report_len) {
  // layout 0: contiguous; 1: x channel stride 2; 2: rows padded (sr = D + 8); 3: dout expanded (stride 0)
  const int64_t xsc = layout == 1 ? 2 : 1, xsr = layout == 1 ? 2 * D : layout == 2 ? D + 8 : D;
  std::vector<T> x(rows * xsr + 16), z(rows * xsr + 16), g(rows * D + 16);
  std::vector<float> w(D + 4), b(D + 4);
  for (auto& v : x) v = to_t<T>(randn());
  for (auto& v : z) v = to_t<T>(randn());
  for (auto& v : g) v = to_t<T>(randn());
  for (auto& v : w) v = 1 + 0.5f * randn();
  for (auto& v : b) v = 0.5f * randn();
  const int64_t ngroups = D / G;
  std::vector<T> out(rows * D), dx(rows * D), dz(rows * D);
  std::vector<float> rstd(rows * ngroups, NAN), dw(D, NAN), db(D, NAN);
  for (auto& v : out) v = to_t<T>(NAN);
  for (auto& v : dx) v = to_t<T>(NAN);
  for (auto& v : dz) v = to_t<T>(NAN);
  const bool has_z = mode != 0, nbg = mode == 2;
  RmsNormFwdParams p{};
  p.rows = rows, p.dim = D, p.group_size = G;
  p.dtype = sizeof(T) == 4 ? DType::F32 : DType::BF16;
  p.eps = 1e-5f; p.norm_before_gate = nbg;
  p.x = x.data(); p.x_sr = xsr; p.x_sc = xsc;
  if (has_z) { p.z = z.data(); p.z_sr = xsr; p.z_sc = xsc; }
  p.weight = w.data(); p.bias = bias ? b.data() : nullptr;  // vector<float> is 16-byte aligned
  p.out = out.data(); p.rstd = rstd.data();
  rmsnorm_gated_fwd_cuda(p, nullptr);
  RmsNormBwdParams q{};
  q.fwd = p;
  q.dout = g.data();
  q.dout_sr = layout == 3 ? 0 : D; q.dout_sc = layout == 3 ? 0 : 1;
  q.dx = dx.data(); q.dz = has_z ? dz.data() : nullptr;
  q.dweight = dw.data(); q.dbias = bias ? db.data() : nullptr;
  q.num_partials = rmsnorm_gated_bwd_cuda_num_partials(q);
  std::vector<float> partials(q.num_partials * 2 * D, NAN);
  q.partials = partials.data();
  rmsnorm_gated_bwd_cuda(q, nullptr);
  // float64 reference
  Err eo, er, ex, ez, ew, eb;
  std::vector<double> rdw(D, 0), rdb(D, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t gi = 0; gi < ngroups; ++gi) {
      std::vector<double> u(G), xh(G), dy(G), dxh(G), xs(G), zs(G);
      double ss = 0;
      for (int64_t i = 0; i < G; ++i) {
        int64_t c = gi * G + i;
        xs[i] = to_d(x[r * xsr + c * xsc]); zs[i] = to_d(z[r * xsr + c * xsc]);
        u[i] = (has_z && !nbg) ? xs[i] * silu(zs[i]) : xs[i];
        ss += u[i] * u[i];
      }
      double rs = 1 / std::sqrt(ss / G + 1e-5);
      er.add(rstd[r * ngroups + gi], rs);
      double dot = 0;
      for (int64_t i = 0; i < G; ++i) {
        int64_t c = gi * G + i;
        xh[i] = u[i] * rs;
        double y = xh[i] * w[c] + (bias ? b[c] : 0);
        double o = (has_z && nbg) ? y * silu(zs[i]) : y;
        eo.add(to_d(out[r * D + c]), o);
        double gg = to_d(g[layout == 3 ? 0 : r * D + c]);
        dy[i] = (has_z && nbg) ? gg * silu(zs[i]) : gg;
        if (has_z && nbg) ez.add(to_d(dz[r * D + c]), gg * y * dsilu(zs[i]));
        rdw[c] += dy[i] * xh[i]; rdb[c] += dy[i];
        dxh[i] = dy[i] * w[c]; dot += dxh[i] * xh[i];
      }
      double m = dot / G;
      for (int64_t i = 0; i < G; ++i) {
        int64_t c = gi * G + i;
        double du = rs * (dxh[i] - xh[i] * m);
        if (has_z && !nbg) { ex.add(to_d(dx[r * D + c]), du * silu(zs[i])); ez.add(to_d(dz[r * D + c]), du * xs[i] * dsilu(zs[i])); }
        else ex.add(to_d(dx[r * D + c]), du);
      }
    }
  for (int64_t c = 0; c < D; ++c) { ew.add(dw[c], rdw[c]); if (bias) eb.add(db[c], rdb[c]); }
  const double tol = sizeof(T) == 4 ? 1e-5 : 2e-2;
  double worst = std::max({eo.rel(), er.rel(), ex.rel(), ez.rel(), ew.rel(), eb.rel()});
  bool ok = worst < tol * 10 && std::isfinite(worst);
  std::snprintf(report, report_len, "%s %s rows=%ld D=%ld G=%ld mode=%d bias=%d layout=%d P=%ld: out %.1e rstd %.1e dx %.1e dz %.1e dw %.1e db %.1e",
              ok ? "ok  " : "FAIL", sizeof(T) == 4 ? "f32 " : "bf16", (long)rows, (long)D, (long)G, mode, bias, layout,
              (long)q.num_partials, eo.rel(), er.rel(), ex.rel(), ez.rel(), ew.rel(), eb.rel());
  return ok ? 0 : 1;
}

struct Shape { int64_t rows, D, G; };
const Shape kShapes[] = {{37, 1024, 128}, {33, 2048, 512}, {9, 1536, 1536}, {5, 4100, 1025}, {9, 4096, 4096},
                         {2, 8200, 8200}, {5, 7, 7}, {70, 96, 32}, {3, 24, 1}};
constexpr int kModes = 3;
}  // namespace

EMU_EXPORT int emu_rmsnorm_num_cases() { return static_cast<int>(std::size(kShapes)) * kModes * 2; }

// Case i: shape i / 6, mode (i / 2) % 3 (0 no z, 1 gate before the norm, 2 after), dtype i % 2
// (float32, bfloat16); the layout cycles over contiguous / strided x / padded rows / expanded dout.
// Returns 0 when every output is within tolerance, 1 when not, 2 on an emulator error; `report`
// gets the errors.
EMU_EXPORT int emu_rmsnorm_case(int i, char* report, int report_len) {
  const int si = i / (2 * kModes), mode = (i / 2) % kModes, f32 = i % 2 == 0;
  const Shape s = kShapes[si];
  const int layout = (mode + si * kModes + mode) % 4;
  rng.seed(1234 + i);
  int result = 0;
  const int rc = emu::guarded([&] {
    result = f32 ? run_case<float>(s.rows, s.D, s.G, mode, layout % 2 == 0, layout, report, report_len)
                 : run_case<__nv_bfloat16>(s.rows, s.D, s.G, mode, layout % 2 == 1, layout, report, report_len);
  }, report, report_len);
  return rc ? 2 : result;
}
