// The sm_90a chunk output of the SSD forward (ssd_chunk_output_sm90.cu): the shapes it takes
// and its entry, called by the forward (ssd_chunk_scan_fwd_cuda.cu) in place of F4 when
// NEMOKERNELS_SSD_SM90=1 on a compute capability 9.0 device. Built only with NK_HAS_SM90.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ssd/ssd_chunk_scan.h"

namespace nk {

// The one tile shape it is built for: Nemotron-H's chunk 128, headdim 64, dstate 128.
constexpr int kSsdSm90Q = 128, kSsdSm90P = 64, kSsdSm90N = 128;

// Shape, dtype (float16 / bfloat16) and the 16-byte alignment its cp.async loads need.
bool ssd_chunk_output_sm90_supports(const SsdParams& p);
// Heads of a group one CTA covers: all of them unless the grid would fill under two waves.
int64_t ssd_chunk_output_sm90_heads_per_cta(const SsdParams& p, int num_sms);
// Dynamic shared memory per CTA.
size_t ssd_chunk_output_sm90_smem_bytes(DType dtype);
// F4 for p (F1-F3 already ran on the stream): y and y_pre.
void ssd_chunk_output_sm90(const SsdParams& p, void* stream);

}  // namespace nk
