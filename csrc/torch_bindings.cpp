// The one list of nemokernels op schemas (namespace `nemokernels`) and their CPU/CUDA
// kernels. Every op's entry function checks its inputs and picks the CPU or CUDA path by the
// inputs' device, so the same function is registered for both dispatch keys. Fake (meta)
// kernels and autograd formulas live on the Python side (nemokernels/ops/).
#include <torch/csrc/stable/library.h>

#include <optional>
#include <tuple>

#include "common/check.h"

namespace nk {
// ssd/causal_conv1d.cpp
std::tuple<Tensor, Tensor> causal_conv1d_fwd(Tensor x, Tensor weight, std::optional<Tensor> bias,
                                             std::optional<Tensor> seq_idx,
                                             std::optional<Tensor> initial_states,
                                             bool return_final_states, bool silu);
std::tuple<Tensor, Tensor, Tensor, Tensor> causal_conv1d_bwd(
    Tensor x, Tensor weight, std::optional<Tensor> bias, Tensor dout,
    std::optional<Tensor> seq_idx, std::optional<Tensor> initial_states,
    std::optional<Tensor> dfinal_states, bool return_dinitial_states, bool silu);
Tensor causal_conv1d_update(Tensor x, Tensor conv_state, Tensor weight, std::optional<Tensor> bias,
                            bool silu, std::optional<Tensor> conv_state_indices);
// ssd/rmsnorm_gated.cpp
std::tuple<Tensor, Tensor> rmsnorm_gated_fwd(Tensor x, Tensor weight, std::optional<Tensor> bias,
                                             std::optional<Tensor> z, double eps, int64_t group_size,
                                             bool norm_before_gate);
std::tuple<Tensor, Tensor, Tensor, Tensor> rmsnorm_gated_bwd(
    Tensor dout, Tensor x, Tensor weight, std::optional<Tensor> bias, std::optional<Tensor> z,
    Tensor rstd, int64_t group_size, bool norm_before_gate);
}  // namespace nk

STABLE_TORCH_LIBRARY(nemokernels, m) {
  // ---- ssd: causal conv1d --------------------------------------------------------------
  // final_states is (0, dim, width-1) unless return_final_states.
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, "
        "Tensor? initial_states, bool return_final_states, bool silu) -> (Tensor out, Tensor final_states)");
  // dbias is (0,) without bias; dinitial_states is (0, dim, width-1) unless asked for.
  m.def("causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor dout, Tensor? seq_idx, "
        "Tensor? initial_states, Tensor? dfinal_states, bool return_dinitial_states, bool silu) "
        "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dinitial_states)");
  m.def("causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
        "bool silu, Tensor? conv_state_indices) -> Tensor");

  // ---- ssd: gated RMSNorm -----------------------------------------------------------------
  // x (..., D); group_size divides D; rstd (x.shape[:-1] + (D / group_size,)) float32 is saved
  // for the backward.
  m.def("rmsnorm_gated_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? z, float eps, "
        "int group_size, bool norm_before_gate) -> (Tensor out, Tensor rstd)");
  // dbias is (0,) float32 without bias; dz is (0,) without z.
  m.def("rmsnorm_gated_bwd(Tensor dout, Tensor x, Tensor weight, Tensor? bias, Tensor? z, "
        "Tensor rstd, int group_size, bool norm_before_gate) "
        "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dz)");
}

// Same entry for both keys: the entry routes by device.
#define NK_IMPL_ALL(m)                                                          \
  m.impl("causal_conv1d_fwd", TORCH_BOX(&nk::causal_conv1d_fwd));               \
  m.impl("causal_conv1d_bwd", TORCH_BOX(&nk::causal_conv1d_bwd));               \
  m.impl("causal_conv1d_update", TORCH_BOX(&nk::causal_conv1d_update));         \
  m.impl("rmsnorm_gated_fwd", TORCH_BOX(&nk::rmsnorm_gated_fwd));               \
  m.impl("rmsnorm_gated_bwd", TORCH_BOX(&nk::rmsnorm_gated_bwd));

STABLE_TORCH_LIBRARY_IMPL(nemokernels, CPU, m) { NK_IMPL_ALL(m) }
STABLE_TORCH_LIBRARY_IMPL(nemokernels, CUDA, m) { NK_IMPL_ALL(m) }
