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

constexpr int kConvChlastThreadsX = 32;  // channel groups per block (channel-last)
constexpr int kConvChlastThreadsY = 4;   // time tiles per block (channel-last)
constexpr int kConvChlastNT = 16;        // time steps per thread (channel-last)
constexpr int kConvTmajorThreads = 128;  // threads per block along time (time-major)
constexpr int kConvTmajorNT = 4;         // time steps per thread (time-major)
constexpr int kConvUpdateThreads = 128;  // channels per block of the decode update
constexpr int kConvSmallThreads = 256;   // final-states kernel
constexpr int kConvReduceThreads = 128;  // dweight/dbias reduction
constexpr const char* kConvBatchAdvice =
    "batch is grid.z (grid.y in the update): split the batch into calls of at most 65535 rows";
constexpr const char* kConvSeqAdvice =
    "split the sequence into pieces, passing each piece's final states on as the next one's initial states";
constexpr const char* kConvDimAdvice = "split the channels into calls of fewer channels";

// Forward: channel-last (x channel stride 1) blocks of kConvChlastThreadsX x kConvChlastThreadsY
// threads, each thread `vc` channels by kConvChlastNT steps; time-major blocks of
// kConvTmajorThreads threads along time. Time (channel-last) and channels (time-major) are
// grid-strided past 65535 blocks, so only the batch is bounded (grid.z <= 65535).
inline LaunchGrid conv1d_fwd_grid(int64_t batch, int64_t dim, int64_t seqlen, bool chlast, int vc) {
  const char* op = "causal_conv1d_fn";
  LaunchGrid g;
  if (chlast) {
    g.x = ceil_div64(dim, int64_t{kConvChlastThreadsX} * vc);
    g.y = std::min(ceil_div64(seqlen, int64_t{kConvChlastThreadsY} * kConvChlastNT), kCudaMaxGridYZ);
  } else {
    g.x = ceil_div64(seqlen, int64_t{kConvTmajorThreads} * kConvTmajorNT);
    g.y = std::min(dim, kCudaMaxGridYZ);
  }
  g.z = batch;
  return checked_grid(op, "forward", g, chlast ? kConvDimAdvice : kConvSeqAdvice, "", kConvBatchAdvice);
}

// One thread per final-state element (batch x dim x (width - 1)).
inline LaunchGrid conv1d_final_states_grid(int64_t batch, int64_t dim, int width) {
  return checked_grid("causal_conv1d_fn", "final-states", {ceil_div64(batch * dim * (width - 1), kConvSmallThreads)},
                      "split the batch into smaller calls");
}

// Backward: about `target_blocks` blocks (8 per SM), time tiles folded (grid-stride) so that
// the dweight/dbias partial rows (batch x time blocks) stay few.
struct Conv1dBwdGrid {
  LaunchGrid grid;
  int64_t time_blocks;  // partial rows per batch entry
};

inline Conv1dBwdGrid conv1d_bwd_grid(int64_t batch, int64_t dim, int64_t seqlen, bool chlast, int vc,
                                     int64_t target_blocks) {
  const char* op = "causal_conv1d_fn (backward)";
  Conv1dBwdGrid r;
  if (chlast) {
    const int64_t cblocks = ceil_div64(dim, int64_t{kConvChlastThreadsX} * vc);
    const int64_t tmax = ceil_div64(seqlen, int64_t{kConvChlastThreadsY} * kConvChlastNT);
    const int64_t tb = std::clamp<int64_t>(ceil_div64(target_blocks, std::max<int64_t>(cblocks * batch, 1)), 1,
                                           std::max<int64_t>(1, std::min(tmax, kCudaMaxGridYZ)));
    r.grid = {cblocks, tb, batch};
    r.time_blocks = tb;
    checked_grid(op, "backward", r.grid, kConvDimAdvice, "", kConvBatchAdvice);
  } else {
    const int64_t cy = std::min(dim, kCudaMaxGridYZ);
    const int64_t tmax = ceil_div64(seqlen, int64_t{kConvTmajorThreads} * kConvTmajorNT);
    const int64_t tb = std::clamp<int64_t>(ceil_div64(target_blocks, std::max<int64_t>(cy * batch, 1)), 1,
                                           std::max<int64_t>(1, tmax));
    r.grid = {tb, cy, batch};
    r.time_blocks = tb;
    checked_grid(op, "backward", r.grid, kConvSeqAdvice, "", kConvBatchAdvice);
  }
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

constexpr int kSsdTile = 64;          // P, N, positions per block tile (H1, F4, F5, B1, B3)
constexpr int kSsdSpChunk = 1024;     // B2 state elements per block
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
  LaunchGrid dstates, state_bwd, col, row, chunk_fin;
};

inline SsdBwdGrids ssd_bwd_grids(int64_t batch, int64_t nchunks, int64_t nheads, int64_t headdim, int64_t dstate,
                                 int64_t chunk_size, int64_t hs) {
  const char* op = "mamba_chunk_scan_combined (backward)";
  const int64_t tiles = ceil_div64(headdim, kSsdTile) * ceil_div64(dstate, kSsdTile);
  const int64_t b3 = batch * nchunks * (nheads / std::max<int64_t>(hs, 1)) * (chunk_size / kSsdTile);
  SsdBwdGrids g;
  g.dstates = checked_grid(op, "dstates", {batch * nchunks * nheads * tiles}, kSsdAdvice);
  g.state_bwd = checked_grid(op, "state_bwd", {batch * nheads * ceil_div64(headdim * dstate, kSsdSpChunk)}, kSsdAdvice);
  g.col = checked_grid(op, "col", {b3}, kSsdAdvice);
  g.row = checked_grid(op, "row", {b3}, kSsdAdvice);
  g.chunk_fin = checked_grid(op, "chunk_fin", {batch * nchunks * nheads}, kSsdAdvice);
  return g;
}

}  // namespace nk
