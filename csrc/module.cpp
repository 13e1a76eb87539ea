// The nemokernels._C Python module. Importing it registers every op (static initialisers in
// csrc/<family>/<family>_ops.cpp); the functions here only report how the binary was built. pybind11
// links to Python, never to libtorch's C++ API.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>
#include <vector>

#include "common/op_registry.h"
#include "common/philox.h"
#include "nvfp4/gemm.h"

#ifndef NK_CUDA_ARCHS
#define NK_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "nemokernels compiled ops (registered under torch.ops.nemokernels)";
  m.attr("__version__") = NK_VERSION;
#ifdef NK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("cuda_archs") = std::string(NK_CUDA_ARCHS);
#ifdef NK_CUDA_VERSION
  m.attr("cuda_version") = std::string(NK_CUDA_VERSION);
#else
  m.attr("cuda_version") = py::none();
#endif
  m.attr("torch_target_version") = static_cast<unsigned long long>(NK_TORCH_TARGET_VERSION);
  m.attr("built_with_torch") = std::string(TORCH_BUILD_VERSION);
  // {op: family}, filed by each family's <family>_ops.cpp as it defines its schemas.
  m.def(
      "op_families",
      [] {
        std::map<std::string, std::string> d;
        for (const auto& [op, family] : nk::op_families()) d[op] = family;
        return d;
      },
      "{op: family} for every op this binary defines (csrc/<family>/<family>_ops.cpp)");
  // The Philox4x32-10 the kernels share (csrc/common/philox.h), for known-answer tests.
  m.def(
      "philox4x32_10",
      [](std::vector<uint32_t> ctr, std::vector<uint32_t> key) {
        if (ctr.size() != 4 || key.size() != 2) throw std::invalid_argument("philox4x32_10: counter has 4 words, key 2");
        nk::Philox4 r = nk::philox4x32_10(ctr[0], ctr[1], ctr[2], ctr[3], key[0], key[1]);
        return std::vector<uint32_t>{r.v[0], r.v[1], r.v[2], r.v[3]};
      },
      "Philox4x32-10 of a 4-word counter and a 2-word key (csrc/common/philox.h)");
  // The path nvfp4_gemm takes on a CUDA device for an (M, N, K) problem: the op's own routing
  // function (csrc/nvfp4/gemm.h), so tests name the kernel they exercise.
  m.def(
      "nvfp4_gemm_path",
      [](int device_index, int64_t M, int64_t N, int64_t K) -> std::string {
#ifdef NK_WITH_CUDA
        return nk::nvfp4_gemm_cuda_path(device_index, M, N, K) == nk::kNvfp4PathCutlassSm100 ? "cutlass_sm100"
                                                                                           : "portable_cuda";
#else
        (void)device_index, (void)M, (void)N, (void)K;
        return "unavailable";
#endif
      },
      "nvfp4_gemm's CUDA path for an (M, N, K) problem on a device: cutlass_sm100, portable_cuda "
      "(or unavailable in a CPU-only build)");
}
