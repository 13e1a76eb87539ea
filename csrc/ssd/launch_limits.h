// CUDA launch geometry of the SSD family's kernels and its limits, in plain C++ (no CUDA and no
// torch headers): the .cu launchers take their grids from here, and a CPU test compiles this
// header alone to check every grid at and past CUDA's limits without a GPU. Each function
// throws (std::runtime_error, "nemokernels: <op>: ...") before a launch CUDA would refuse,
// naming the kernel, the grid dimension, CUDA's limit and how to stay under it. The CPU
// kernels have none of these limits (int64 loops over the same shapes).
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace nk {

constexpr int64_t kCudaMaxGridX = 2147483647;  // 2^31 - 1 blocks
constexpr int64_t kCudaMaxGridYZ = 65535;

struct LaunchGrid {
  int64_t x = 1, y = 1, z = 1;
};

inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// `g` when it fits CUDA's grid limits, else a throw naming `op`, the `kernel`, the first
// dimension over its limit and the advice for that dimension (x, y, z).
inline LaunchGrid checked_grid(const char* op, const char* kernel, LaunchGrid g, const char* advice_x,
                               const char* advice_y = "", const char* advice_z = "") {
  const int64_t v[3] = {g.x, g.y, g.z};
  const int64_t lim[3] = {kCudaMaxGridX, kCudaMaxGridYZ, kCudaMaxGridYZ};
  const char* adv[3] = {advice_x, advice_y, advice_z};
  const char* name[3] = {"x", "y", "z"};
  for (int d = 0; d < 3; ++d)
    if (v[d] > lim[d] || v[d] < 1)
      throw std::runtime_error(std::string("nemokernels: ") + op + ": the CUDA " + kernel + " kernel needs grid." +
                               name[d] + " = " + std::to_string(v[d]) + " blocks, CUDA allows 1.." +
                               std::to_string(lim[d]) + "; " + adv[d]);
  return g;
}

// ---- causal_conv1d (causal_conv1d_cuda.cu) ----------------------------------------------------

// Forward and backward work on tiles of kConvTileL time steps x kConvTileC channels (one
// shared-memory tile per block of kConvThreads threads), flattened into a 1-D tile index, so
// neither the batch nor the sequence length meets a grid.y/z limit.
constexpr int kConvTileC = 64;           // channels per tile
constexpr int kConvTileL = 64;           // time steps per tile
constexpr int kConvThreads = 128;        // threads per tile block (forward and backward)
constexpr int kConvFwdBlocksPerSm = 16;  // resident forward blocks per SM (thread limit 2048)
constexpr int kConvUpdateThreads = 128;  // channels per block of the decode update
constexpr int kConvReduceThreads = 128;  // dweight/dbias reduction
constexpr const char* kConvBatchAdvice =
    "split the batch into calls of at most 65535 sequences (CUDA's grid.y limit)";
constexpr const char* kConvDimAdvice = "split the channels into calls of fewer channels";

inline int64_t conv1d_tiles(int64_t batch, int64_t dim, int64_t seqlen) {
  return batch * ceil_div64(dim, kConvTileC) * std::max<int64_t>(1, ceil_div64(seqlen, kConvTileL));
}

// Forward: one block per tile while the tiles number at most 8 waves of resident blocks
// (kConvFwdBlocksPerSm x sm_count each), the hardware scheduler balancing them; above that
// the grid stays at 8 waves and each block strides over the tiles (the tail is then at most
// 1/8 of the work). seqlen 0 keeps one time tile (it writes the final states).
inline LaunchGrid conv1d_fwd_grid(int64_t batch, int64_t dim, int64_t seqlen, int64_t sm_count) {
  const int64_t cap = 8 * int64_t{kConvFwdBlocksPerSm} * std::max<int64_t>(sm_count, 1);
  return checked_grid("causal_conv1d_fn", "forward", {std::min(conv1d_tiles(batch, dim, seqlen), cap)},
                      kConvDimAdvice);
}

// Backward: blocks = channel blocks x time_splits; the block of (channel block cb, split s)
// walks the (batch, time tile) items s, s + time_splits, ... of its channels and writes its
// dweight/dbias sums as partial row s, so the partial rows are time_splits and the reduction
// order is fixed. At most `target_blocks` blocks (the resident blocks of the device: a second
// partial wave would double the time) unless the channel blocks alone are more, split so that
// every block gets the same number of items (+-1).
struct Conv1dBwdGrid {
  LaunchGrid grid;
  int64_t time_splits;  // partial rows
};

inline Conv1dBwdGrid conv1d_bwd_grid(int64_t batch, int64_t dim, int64_t seqlen, int64_t target_blocks) {
  const int64_t cblocks = ceil_div64(dim, kConvTileC);
  const int64_t items = batch * std::max<int64_t>(1, ceil_div64(seqlen, kConvTileL));
  const int64_t want = std::clamp<int64_t>(target_blocks / std::max<int64_t>(cblocks, 1), 1, items);
  const int64_t splits = ceil_div64(items, ceil_div64(items, want));  // balanced: items per block differ by <= 1
  Conv1dBwdGrid r;
  r.grid = checked_grid("causal_conv1d_fn (backward)", "backward", {cblocks * splits}, kConvDimAdvice);
  r.time_splits = splits;
  return r;
}

inline LaunchGrid conv1d_bwd_reduce_grid(int64_t dim) {
  return checked_grid("causal_conv1d_fn (backward)", "dweight reduction", {ceil_div64(dim, kConvReduceThreads)},
                      kConvDimAdvice);
}

// Decode update: one thread per channel, grid (channel blocks, batch).
inline LaunchGrid conv1d_update_grid(int64_t batch, int64_t dim) {
  return checked_grid("causal_conv1d_update", "update", {ceil_div64(dim, kConvUpdateThreads), batch},
                      kConvDimAdvice, kConvBatchAdvice);
}

// ---- mamba_chunk_scan_combined (ssd_chunk_scan_{fwd,bwd}_cuda.cu) -----------------------------

constexpr int kSsdTile = 64;          // P, N, positions per block tile (H1, F4, F5, B1-B2, B3)
constexpr const char* kSsdAdvice =
    "split the batch, or the sequence (passing final_states on as initial_states), into smaller calls";

// Blocks of every forward kernel (H1 = F1-F3, F4, F5). Throws when one exceeds CUDA's grid limits.
struct SsdFwdGrids {
  LaunchGrid chain, scan, varlen;
};

inline SsdFwdGrids ssd_fwd_grids(int64_t batch, int64_t nchunks, int64_t nheads, int64_t headdim, int64_t dstate,
                                 int64_t chunk_size, int64_t nseq) {
  const char* op = "mamba_chunk_scan_combined";
  const int64_t tiles = ceil_div64(headdim, kSsdTile) * ceil_div64(dstate, kSsdTile);
  SsdFwdGrids g;
  g.chain = checked_grid(op, "state_chain", {batch * nchunks * nheads * tiles}, kSsdAdvice);
  g.scan = checked_grid(op, "chunk_scan", {batch * nchunks * nheads * (chunk_size / kSsdTile)}, kSsdAdvice);
  g.varlen = checked_grid(op, "varlen_states", {std::max<int64_t>(nseq, 1) * nheads * tiles},
                          "split the packed sequences into calls of fewer sequences");
  return g;
}

// Blocks of the backward's grid-sized kernels (the element-wise ones are grid-strided);
// `hs` heads per B3 block.
struct SsdBwdGrids {
  LaunchGrid dstate_chain, col, row, chunk_fin;
};

inline SsdBwdGrids ssd_bwd_grids(int64_t batch, int64_t nchunks, int64_t nheads, int64_t headdim, int64_t dstate,
                                 int64_t chunk_size, int64_t hs) {
  const char* op = "mamba_chunk_scan_combined (backward)";
  const int64_t tiles = ceil_div64(headdim, kSsdTile) * ceil_div64(dstate, kSsdTile);
  const int64_t b3 = batch * nchunks * (nheads / std::max<int64_t>(hs, 1)) * (chunk_size / kSsdTile);
  SsdBwdGrids g;
  g.dstate_chain = checked_grid(op, "dstate_chain", {batch * nchunks * nheads * tiles}, kSsdAdvice);
  g.col = checked_grid(op, "col", {b3}, kSsdAdvice);
  g.row = checked_grid(op, "row", {b3}, kSsdAdvice);
  g.chunk_fin = checked_grid(op, "chunk_fin", {batch * nchunks * nheads}, kSsdAdvice);
  return g;
}

}  // namespace nk
