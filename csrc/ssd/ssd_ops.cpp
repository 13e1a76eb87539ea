// The ssd family's ops: causal conv1d, the chunked selective scan (mamba_chunk_scan_combined),
// the decode state updates and the gated RMSNorm. Schemas and kernel registration; the entries
// (in this folder) check inputs and route by device. Fakes and autograd: nemokernels/ssd/.
#include <optional>
#include <tuple>

#include "common/family_ops.h"

namespace nk {
// Entries, defined in this folder.
std::tuple<Tensor, Tensor> causal_conv1d_fwd(Tensor x, Tensor weight, std::optional<Tensor> bias,
                                             std::optional<Tensor> seq_idx,
                                             std::optional<Tensor> initial_states,
                                             bool return_final_states, bool silu);
std::tuple<Tensor, Tensor, Tensor, Tensor> causal_conv1d_bwd(
    Tensor x, Tensor weight, std::optional<Tensor> bias, Tensor dout,
    std::optional<Tensor> seq_idx, std::optional<Tensor> initial_states,
    std::optional<Tensor> dfinal_states, bool return_dinitial_states, bool silu);
Tensor causal_conv1d_update(Tensor x, Tensor conv_state, Tensor weight, std::optional<Tensor> bias,
                            bool silu, std::optional<Tensor> conv_state_indices, std::optional<Tensor> parents);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ssd_chunk_scan_fwd(
    Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int64_t chunk_size, std::optional<Tensor> D,
    std::optional<Tensor> z, std::optional<Tensor> dt_bias, std::optional<Tensor> initial_states,
    std::optional<Tensor> seq_idx, std::optional<Tensor> cu_seqlens, bool dt_softplus, double dt_min,
    double dt_max, bool return_final_states, bool return_varlen_states, bool save_y_pre,
    bool return_chunk_states, std::optional<Tensor> chunk_plan);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ssd_chunk_scan_bwd(
    Tensor dout, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int64_t chunk_size,
    std::optional<Tensor> D, std::optional<Tensor> z, std::optional<Tensor> y_pre,
    std::optional<Tensor> dt_bias, std::optional<Tensor> initial_states, std::optional<Tensor> seq_idx,
    std::optional<Tensor> dfinal_states, bool dt_softplus, double dt_min, double dt_max,
    bool return_dinitial_states, std::optional<Tensor> cu_seqlens, std::optional<Tensor> chunk_plan);
Tensor selective_state_update(Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C,
                              std::optional<Tensor> D, std::optional<Tensor> z, std::optional<Tensor> dt_bias,
                              bool dt_softplus, std::optional<Tensor> state_batch_indices,
                              std::optional<Tensor> rounding_seed);
Tensor selective_state_update_multi(Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C,
                                    std::optional<Tensor> D, std::optional<Tensor> z,
                                    std::optional<Tensor> dt_bias, bool dt_softplus,
                                    std::optional<Tensor> state_batch_indices,
                                    std::optional<Tensor> intermediate_states, std::optional<Tensor> parents,
                                    std::optional<Tensor> rounding_seed);
void selective_state_update_replay(Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C,
                                   std::optional<Tensor> dt_bias, bool dt_softplus,
                                   std::optional<Tensor> state_batch_indices, Tensor replay_to,
                                   std::optional<Tensor> parents, std::optional<Tensor> rounding_seed);
std::tuple<Tensor, Tensor> rmsnorm_gated_fwd(Tensor x, Tensor weight, std::optional<Tensor> bias,
                                             std::optional<Tensor> z, double eps, int64_t group_size,
                                             bool norm_before_gate);
std::tuple<Tensor, Tensor, Tensor, Tensor> rmsnorm_gated_bwd(
    Tensor dout, Tensor x, Tensor weight, std::optional<Tensor> bias, std::optional<Tensor> z,
    Tensor rstd, int64_t group_size, bool norm_before_gate);

// Schemas (with what the shapes and dtypes mean) and the kernel of each.
const OpDef kOps[] = {
  // ---- ssd: causal conv1d --------------------------------------------------------------
  // final_states is (0, dim, width-1) unless return_final_states.
  {"causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, "
   "Tensor? initial_states, bool return_final_states, bool silu) -> (Tensor out, Tensor final_states)",
   TORCH_BOX(&causal_conv1d_fwd)},
  // dbias is (0,) without bias; dinitial_states is (0, dim, width-1) unless asked for.
  {"causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor dout, Tensor? seq_idx, "
   "Tensor? initial_states, Tensor? dfinal_states, bool return_dinitial_states, bool silu) "
   "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dinitial_states)",
   TORCH_BOX(&causal_conv1d_bwd)},
  // parents (batch, seqlen) int32: tree drafts (token t's window follows its ancestors; -1 the
  // state); conv_state is then only read.
  {"causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
   "bool silu, Tensor? conv_state_indices, Tensor? parents=None) -> Tensor",
   TORCH_BOX(&causal_conv1d_update)},

  // ---- ssd: chunked selective scan (mamba_chunk_scan_combined) ----------------------------
  // y_pre (the output before the z gate, kept for the backward) is (0, L, H, P) unless z is
  // given and save_y_pre; final_states (b, H, P, N) / varlen_states (nseq, H, P, N) are
  // float32 and have a zero leading dim unless asked for. chunk_plan (2, nc + 1) int32, with
  // cu_seqlens and batch 1: packed sequences with chunks aligned to each sequence's start
  // (nemokernels.ssd.ssd_chunk_scan.chunk_plan builds it); initial_states then have one row per
  // sequence (or one, for the first).
  {"ssd_chunk_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, "
   "Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? initial_states, Tensor? seq_idx, "
   "Tensor? cu_seqlens, bool dt_softplus, float dt_min, float dt_max, bool return_final_states, "
   "bool return_varlen_states, bool save_y_pre, bool return_chunk_states=False, Tensor? chunk_plan=None) "
   "-> (Tensor y, Tensor y_pre, Tensor final_states, Tensor varlen_states, Tensor entering_states)",
   TORCH_BOX(&ssd_chunk_scan_fwd)},
  // Gradients in the dtypes of their inputs; dD/dz/ddt_bias/dinitial_states are empty when
  // the input is absent (or not asked for).
  {"ssd_chunk_scan_bwd(Tensor dout, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
   "int chunk_size, Tensor? D, Tensor? z, Tensor? y_pre, Tensor? dt_bias, Tensor? initial_states, "
   "Tensor? seq_idx, Tensor? dfinal_states, bool dt_softplus, float dt_min, float dt_max, "
   "bool return_dinitial_states, Tensor? cu_seqlens=None, Tensor? chunk_plan=None) -> (Tensor dx, Tensor ddt, Tensor dA, Tensor dB, Tensor dC, "
   "Tensor dD, Tensor dz, Tensor ddt_bias, Tensor dinitial_states)",
   TORCH_BOX(&ssd_chunk_scan_bwd)},

  // ---- ssd: decode state updates ---------------------------------------------------------
  // One token, state updated in place; returns out shaped like x. rounding_seed (1 element,
  // int64, read on the device): stochastic rounding of a 16-bit state, else round to nearest.
  {"selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
   "Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices, "
   "Tensor? rounding_seed=None) -> Tensor",
   TORCH_BOX(&selective_state_update)},
  // T tokens from state (not modified); the state after every token goes to
  // intermediate_states (b, T, ...) when given. parents (b, T) int32: tree drafts (token t
  // continues from token parents[b, t], -1 the state row); rounding_seed as above, for the
  // snapshots. Returns out (b, T, ...).
  {"selective_state_update_multi(Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
   "Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices, "
   "Tensor(a!)? intermediate_states, Tensor? parents=None, Tensor? rounding_seed=None) -> Tensor",
   TORCH_BOX(&selective_state_update_multi)},
  // Replay commit: state (in place) advanced by entry b's tokens up to replay_to[b] (b,) int32
  // (clamped to [-1, T - 1]; with parents the root-to-node path), from x, dt, B, C (b, T, ...).
  {"selective_state_update_replay(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
   "Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices, Tensor replay_to, Tensor? parents=None, "
   "Tensor? rounding_seed=None) -> ()",
   TORCH_BOX(&selective_state_update_replay)},

  // ---- ssd: gated RMSNorm -----------------------------------------------------------------
  // x (..., D); group_size divides D; rstd (x.shape[:-1] + (D / group_size,)) float32 is saved
  // for the backward.
  {"rmsnorm_gated_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? z, float eps, "
   "int group_size, bool norm_before_gate) -> (Tensor out, Tensor rstd)",
   TORCH_BOX(&rmsnorm_gated_fwd)},
  // dbias is (0,) float32 without bias; dz is (0,) without z.
  {"rmsnorm_gated_bwd(Tensor dout, Tensor x, Tensor weight, Tensor? bias, Tensor? z, "
   "Tensor rstd, int group_size, bool norm_before_gate) "
   "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dz)",
   TORCH_BOX(&rmsnorm_gated_bwd)},
};

}  // namespace nk

NK_REGISTER_FAMILY("ssd", nk::kOps)
