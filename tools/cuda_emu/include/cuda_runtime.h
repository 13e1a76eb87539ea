// CPU emulation of the CUDA runtime/device features the nemokernels kernels use (tests only:
// tools/cuda_emu, tests/ssd/test_cuda_emulation_ssd.py). A kernel launch runs the grid's blocks one
// after another; inside a block every CUDA thread is a fiber (ucontext) with its own stack,
// scheduled cooperatively: a thread runs until it reaches a barrier (__syncthreads,
// __syncwarp, a warp shuffle) or returns, then the next thread runs. So threads of a block
// interleave exactly at barriers, deterministically, in thread order: a read of data another
// thread writes without a barrier in between sees the poisoned (0xFF = NaN) shared memory, a
// barrier reached by only part of the block (divergent __syncthreads) is reported as a
// deadlock, and a throw in a kernel (e.g. a misaligned 16-byte access) fails the launch.
#pragma once

#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#ifndef __CUDACC__
#define __CUDACC__ 1
#define NK_CUDA_EMULATOR 1  // kernels may replace what cannot run here (a spin-wait on another block)
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;  // set by the scheduler at every switch
constexpr int warpSize = 32;

// ---- error codes / runtime API ---------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
                   cudaErrorLaunchFailure = 719 };
typedef struct emu_stream* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97, cudaDevAttrMultiProcessorCount = 16,
                      cudaDevAttrMaxSharedMemoryPerBlock = 8, cudaDevAttrComputeCapabilityMajor = 75,
                      cudaDevAttrComputeCapabilityMinor = 76 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
                      cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };

namespace emu {
constexpr size_t kMaxOptinSmem = 232448;  // 227 KB (sm_90 / sm_100 opt-in per block)
constexpr size_t kDefaultSmem = 49152;    // without cudaFuncAttributeMaxDynamicSharedMemorySize
inline cudaError_t last_error = cudaSuccess;
inline std::string last_error_msg;
inline long long blocks_run = 0, launches = 0;
inline int compute_capability_major = 9;  // what cudaDevAttrComputeCapabilityMajor reports (drivers may change it)
#ifndef EMU_SM_COUNT
#define EMU_SM_COUNT 132  // an H100/H200; a library built with fewer makes grids sized per SM loop more
#endif
constexpr int kSmCount = EMU_SM_COUNT;
constexpr int kMaxThreadsPerSm = 2048, kMaxBlocksPerSm = 32;  // sm_90 / sm_100
inline std::vector<std::pair<const void*, int>> func_max_smem;  // cudaFuncSetAttribute records
inline cudaError_t set_error(cudaError_t e, std::string msg) {
  if (last_error == cudaSuccess) { last_error = e; last_error_msg = std::move(msg); }
  return e;
}
}  // namespace emu

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : emu::last_error_msg.empty() ? "emulated CUDA error" : emu::last_error_msg.c_str();
}
inline cudaError_t cudaGetLastError() {
  cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::last_error; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = static_cast<int>(emu::kMaxOptinSmem); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = static_cast<int>(emu::kDefaultSmem); return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *v = emu::kSmCount; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = emu::compute_capability_major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; return cudaSuccess;
  }
  return emu::set_error(cudaErrorInvalidValue, "emu: cudaDeviceGetAttribute: attribute not emulated");
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute a, int v) {
  if (a != cudaFuncAttributeMaxDynamicSharedMemorySize || v < 0 || static_cast<size_t>(v) > emu::kMaxOptinSmem)
    return emu::set_error(cudaErrorInvalidValue, "emu: cudaFuncSetAttribute: max dynamic smem " + std::to_string(v) +
                                                     " > " + std::to_string(emu::kMaxOptinSmem));
  for (auto& e : emu::func_max_smem)
    if (e.first == reinterpret_cast<const void*>(f)) { e.second = v; return cudaSuccess; }
  emu::func_max_smem.emplace_back(reinterpret_cast<const void*>(f), v);
  return cudaSuccess;
}
// Resident blocks per SM by the thread and block limits only (registers and shared memory are
// not modelled): what a kernel under its __launch_bounds__ gets at most.
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F*, int block_threads, size_t) {
  if (block_threads <= 0 || block_threads > 1024)
    return emu::set_error(cudaErrorInvalidValue, "emu: occupancy query for " + std::to_string(block_threads) + " threads");
  *n = std::min(emu::kMaxBlocksPerSm, emu::kMaxThreadsPerSm / block_threads);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemset(void* p, int v, size_t n) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memmove(d, s, n); return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { std::memmove(d, s, n); return cudaSuccess; }

// ---- vector types: 16/8-byte accesses through reinterpret_cast'ed pointers are checked ------
// Declared with the alignment of their scalar (so the compiler cannot assume 16 and fold the
// check away); the copy/assignment that a `*reinterpret_cast<uint4*>(p)` access runs throws
// when p is not aligned to the CUDA type's size, as the GPU would fault (misaligned address).
namespace emu {
[[noreturn]] inline void misaligned(const void* p, int bytes) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "emu: misaligned %d-byte vector access at %p", bytes, p);
  throw std::runtime_error(buf);
}
inline void check_align(const void* p, int bytes) {
  if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) != 0) misaligned(p, bytes);
}
}  // namespace emu
#define EMU_VEC_TYPE(NAME, S, N, ...)                                                          \
  struct NAME {                                                                                \
    S __VA_ARGS__;                                                                             \
    NAME() = default;                                                                          \
    NAME(const NAME& o) { emu::check_align(&o, sizeof(S) * N); std::memcpy((void*)this, (const void*)&o, sizeof(S) * N); } \
    NAME& operator=(const NAME& o) {                                                           \
      emu::check_align(this, sizeof(S) * N); emu::check_align(&o, sizeof(S) * N);              \
      std::memcpy((void*)this, (const void*)&o, sizeof(S) * N); return *this;                  \
    }                                                                                          \
  };
EMU_VEC_TYPE(uint4, unsigned, 4, x, y, z, w)
EMU_VEC_TYPE(uint2, unsigned, 2, x, y)
EMU_VEC_TYPE(int4, int, 4, x, y, z, w)
EMU_VEC_TYPE(int2, int, 2, x, y)
EMU_VEC_TYPE(float4, float, 4, x, y, z, w)
EMU_VEC_TYPE(float2, float, 2, x, y)
#undef EMU_VEC_TYPE
inline float4 make_float4(float a, float b, float c, float d) { float4 r; r.x = a; r.y = b; r.z = c; r.w = d; return r; }
inline float2 make_float2(float a, float b) { float2 r; r.x = a; r.y = b; return r; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { uint4 r; r.x = a; r.y = b; r.z = c; r.w = d; return r; }
inline uint2 make_uint2(unsigned a, unsigned b) { uint2 r; r.x = a; r.y = b; return r; }

// ---- math: the float functions exist in <cmath>; CUDA's fast intrinsics map to them ----------
using std::min;
using std::max;
inline float __expf(float v) { return expf(v); }
inline float __logf(float v) { return logf(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __saturatef(float v) { return v < 0.f ? 0.f : v > 1.f ? 1.f : v; }
inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline float __ldg(const float* p) { return *p; }
inline float __int_as_float(int v) { float f; __builtin_memcpy(&f, &v, sizeof f); return f; }
inline int __float_as_int(float f) { int v; __builtin_memcpy(&v, &f, sizeof v); return v; }

// ---- the block scheduler ---------------------------------------------------------------------
namespace emu {

enum class St : unsigned char { Run, WaitBlock, WaitWarp, Done };

struct Block {
  int nthreads = 0, cur = 0;
  std::vector<ucontext_t> ctx;
  std::vector<St> st;
  ucontext_t sched;
  int block_arrived = 0, block_alive = 0;
  std::vector<int> warp_arrived, warp_alive;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;
  std::vector<const void*> shared_seen;  // static __shared__ arrays poisoned in this block
  std::vector<unsigned long long> shfl;  // warp shuffles: one slot per thread
};
inline Block* blk = nullptr;

// Fiber stacks: allocated once (mmap, a PROT_NONE guard page below each), reused by every block.
constexpr size_t kStack = 256 * 1024;
struct Stacks {
  std::vector<char*> base;
  char* get(int t) {
    while (static_cast<int>(base.size()) <= t) {
      const size_t pg = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      void* m = mmap(nullptr, kStack + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) throw std::runtime_error("emu: cannot map a fiber stack");
      mprotect(m, pg, PROT_NONE);
      base.push_back(static_cast<char*>(m) + pg);
    }
    return base[t];
  }
};
inline Stacks stacks;

inline void set_ids(int t) {
  const unsigned bx = blockDim.x, by = blockDim.y;
  threadIdx = dim3(t % bx, (t / bx) % by, t / (bx * by));
}
inline void release_if_complete(Block& b) {
  if (b.block_arrived > 0 && b.block_arrived == b.block_alive) {
    for (auto& s : b.st) if (s == St::WaitBlock) s = St::Run;
    b.block_arrived = 0;
  }
  for (size_t w = 0; w < b.warp_arrived.size(); ++w)
    if (b.warp_arrived[w] > 0 && b.warp_arrived[w] == b.warp_alive[w]) {
      for (int t = static_cast<int>(w) * 32; t < std::min<int>(b.nthreads, (static_cast<int>(w) + 1) * 32); ++t)
        if (b.st[t] == St::WaitWarp) b.st[t] = St::Run;
      b.warp_arrived[w] = 0;
    }
}
inline void yield_to_scheduler() {
  Block& b = *blk;
  swapcontext(&b.ctx[b.cur], &b.sched);
}
inline int linear_tid() { return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }
inline void sync_block() {
  Block& b = *blk;
  b.st[b.cur] = St::WaitBlock;
  ++b.block_arrived;
  release_if_complete(b);
  yield_to_scheduler();
}
inline void sync_warp() {
  Block& b = *blk;
  b.st[b.cur] = St::WaitWarp;
  ++b.warp_arrived[b.cur / 32];
  release_if_complete(b);
  yield_to_scheduler();
}
inline void fiber_main() {
  Block& b = *blk;
  const int t = b.cur;
  try {
    b.body(b.body_arg);
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = e.what();
  } catch (...) {
    if (b.error.empty()) b.error = "emu: unknown exception in a kernel";
  }
  // An exited thread no longer takes part in barriers (as on the GPU, where exited threads
  // count as arrived).
  b.st[t] = St::Done;
  --b.block_alive;
  --b.warp_alive[t / 32];
  release_if_complete(b);
  // returning resumes uc_link (the scheduler)
}

// Dynamic shared memory of the running launch (poisoned with 0xFF before every block, a
// canary after its end checked after every block).
constexpr size_t kCanary = 256;
inline std::vector<unsigned char> dyn_buf;
inline size_t dyn_bytes = 0;
inline unsigned char* dyn_base() {
  uintptr_t p = reinterpret_cast<uintptr_t>(dyn_buf.data());
  return reinterpret_cast<unsigned char*>((p + 127) / 128 * 128);
}
inline unsigned char* dyn_smem() { return dyn_base(); }

// Static __shared__ arrays become function statics (one instance shared by the block's
// fibers); the first thread of each block to reach the declaration poisons it.
inline void shared_decl(const void* p, size_t bytes) {
  Block& b = *blk;
  for (const void* q : b.shared_seen) if (q == p) return;
  b.shared_seen.push_back(p);
  std::memset(const_cast<void*>(p), 0xFF, bytes);
}

inline void run_block(Block& b) {
  const int n = b.nthreads;
  b.ctx.assign(n, ucontext_t{});
  b.st.assign(n, St::Run);
  b.block_arrived = 0;
  b.block_alive = n;
  const int nw = (n + 31) / 32;
  b.warp_arrived.assign(nw, 0);
  b.warp_alive.assign(nw, 0);
  for (int t = 0; t < n; ++t) ++b.warp_alive[t / 32];
  b.shared_seen.clear();
  b.shfl.assign(n, 0ull);
  b.error.clear();
  for (int t = 0; t < n; ++t) {
    getcontext(&b.ctx[t]);
    b.ctx[t].uc_stack.ss_sp = stacks.get(t);
    b.ctx[t].uc_stack.ss_size = kStack;
    b.ctx[t].uc_link = &b.sched;
    makecontext(&b.ctx[t], fiber_main, 0);
  }
  for (;;) {
    bool ran = false, all_done = true;
    for (int t = 0; t < n; ++t) {
      if (b.st[t] == St::Done) continue;
      all_done = false;
      if (b.st[t] != St::Run) continue;
      b.cur = t;
      set_ids(t);
      swapcontext(&b.sched, &b.ctx[t]);
      ran = true;
      if (!b.error.empty()) return;
    }
    if (all_done) return;
    if (!ran) {
      int wb = 0, ww = 0, first = -1;
      for (int t = 0; t < n; ++t) {
        if (b.st[t] == St::WaitBlock) ++wb;
        if (b.st[t] == St::WaitWarp) { ++ww; if (first < 0) first = t; }
      }
      b.error = "emu: barrier deadlock: " + std::to_string(wb) + " threads wait in __syncthreads, " +
                std::to_string(ww) + " in __syncwarp/shuffles (first thread " + std::to_string(first) +
                "), " + std::to_string(b.block_alive) + " of " + std::to_string(n) + " threads alive";
      return;
    }
  }
}

template <class Body>
void body_thunk(void* p) { (*static_cast<Body*>(p))(); }

// kernel<<<grid, block, smem, stream>>>(args) becomes launch(&kernel, grid, block, smem, stream,
// [&] { kernel(args); }) (tools/cuda_emu/transform.py).
template <class K, class Body>
void launch(K* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Body&& body) {
  ++launches;
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    set_error(cudaErrorInvalidConfiguration, "emu: invalid launch configuration: grid (" + std::to_string(grid.x) + ", " +
              std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" + std::to_string(block.x) +
              ", " + std::to_string(block.y) + ", " + std::to_string(block.z) + ")");
    return;
  }
  size_t allowed = kDefaultSmem;
  for (auto& e : func_max_smem) if (e.first == reinterpret_cast<const void*>(kernel)) allowed = static_cast<size_t>(e.second);
  if (smem > allowed) {
    set_error(cudaErrorInvalidValue, "emu: launch with " + std::to_string(smem) + " bytes of dynamic shared memory, "
              "the kernel allows " + std::to_string(allowed) + " (cudaFuncSetAttribute)");
    return;
  }
  dyn_bytes = smem;
  dyn_buf.assign(smem + kCanary + 128, 0);
  Block b;
  b.nthreads = static_cast<int>(nthreads);
  using BodyT = std::remove_reference_t<Body>;
  b.body = &body_thunk<BodyT>;
  b.body_arg = const_cast<void*>(static_cast<const void*>(&body));
  Block* saved = blk;
  blk = &b;
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(dyn_base(), 0xFF, smem);
        std::memset(dyn_base() + smem, 0xA5, kCanary);
        blockIdx = dim3(bx, by, bz);
        run_block(b);
        ++blocks_run;
        std::string err = b.error;
        if (err.empty())
          for (size_t i = 0; i < kCanary; ++i)
            if (dyn_base()[smem + i] != 0xA5) { err = "emu: write past the end of dynamic shared memory"; break; }
        if (!err.empty()) {
          blk = saved;
          throw std::runtime_error(err + " (block (" + std::to_string(bx) + ", " + std::to_string(by) + ", " +
                                   std::to_string(bz) + "), " + std::to_string(nthreads) + " threads)");
        }
      }
  blk = saved;
}

}  // namespace emu

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) throw std::runtime_error("emu: __syncwarp with a partial mask is not emulated");
  emu::sync_warp();
}
namespace emu {
template <class V, class F>
V shuffle(V v, F src_of_lane) {
  static_assert(sizeof(V) <= sizeof(float) * 2, "emu: shuffle of a wide type");
  Block& b = *blk;
  const int t = b.cur, base = t & ~31;
  std::vector<unsigned long long>& stage = b.shfl;  // one 8-byte slot per thread
  unsigned long long raw = 0;
  std::memcpy(&raw, &v, sizeof(V));
  stage[t] = raw;
  sync_warp();
  int src = src_of_lane(t & 31);
  if (src < 0 || src > 31) src = t & 31;
  V r;
  std::memcpy(&r, &stage[base + src], sizeof(V));
  sync_warp();
  return r;
}
}  // namespace emu
template <class V> V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32) throw std::runtime_error("emu: partial-mask/width shuffle not emulated");
  return emu::shuffle(v, [&](int l) { return l ^ lane_mask; });
}
template <class V> V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
  if (mask != 0xffffffffu || width != 32) throw std::runtime_error("emu: partial-mask/width shuffle not emulated");
  return emu::shuffle(v, [&](int) { return src & 31; });
}
template <class V> V __shfl_down_sync(unsigned mask, V v, unsigned d, int width = 32) {
  if (mask != 0xffffffffu || width != 32) throw std::runtime_error("emu: partial-mask/width shuffle not emulated");
  return emu::shuffle(v, [&](int l) { return l + static_cast<int>(d) < 32 ? l + static_cast<int>(d) : l; });
}
template <class V> V __shfl_up_sync(unsigned mask, V v, unsigned d, int width = 32) {
  if (mask != 0xffffffffu || width != 32) throw std::runtime_error("emu: partial-mask/width shuffle not emulated");
  return emu::shuffle(v, [&](int l) { return l - static_cast<int>(d) >= 0 ? l - static_cast<int>(d) : l; });
}

// ---- atomics (integer; the fibers switch only at barriers, so a plain read-modify-write is
// atomic here). No float atomics: the codebase forbids them for reductions. ---------------------
#ifndef EMU_HAVE_INT_ATOMICS
#define EMU_HAVE_INT_ATOMICS 1
inline int atomicAdd(int* a, int v) { const int old = *a; *a = old + v; return old; }
inline unsigned atomicAdd(unsigned* a, unsigned v) { const unsigned old = *a; *a = old + v; return old; }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { const auto old = *a; *a = old + v; return old; }
#endif

// ---- ordering between blocks: blocks run one after another here, so a fence orders nothing
// that is not already ordered, and __ldcg (load through L2, skipping L1) is a plain load. -----
inline void __threadfence() {}
template <class V> V __ldcg(const V* p) { return *p; }

// ---- warp vote / match and bit intrinsics (the MoE router and permutation kernels) -----------
// Lanes that have exited take no part (as on the GPU: they are not in the returned masks).
namespace emu {
template <class F>
unsigned warp_collect(unsigned long long mine, F&& mask_of) {
  Block& b = *blk;
  const int t = b.cur, base = t & ~31;
  b.shfl[t] = mine;
  sync_warp();
  unsigned live = 0;
  for (int l = 0; l < 32 && base + l < b.nthreads; ++l)
    if (b.st[base + l] != St::Done) live |= 1u << l;
  const unsigned r = mask_of(live, base);
  sync_warp();
  return r;
}
}  // namespace emu
inline unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) throw std::runtime_error("emu: partial-mask __ballot_sync not emulated");
  return emu::warp_collect(pred ? 1ull : 0ull, [](unsigned live, int base) {
    unsigned r = 0;
    for (int l = 0; l < 32; ++l)
      if ((live >> l & 1u) && emu::blk->shfl[base + l]) r |= 1u << l;
    return r;
  });
}
// redux.sync.max.u32 (sm_80+): the largest value over the live lanes of the warp.
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  if (mask != 0xffffffffu) throw std::runtime_error("emu: partial-mask __reduce_max_sync not emulated");
  return emu::warp_collect(static_cast<unsigned long long>(v), [](unsigned live, int base) {
    unsigned r = 0;
    for (int l = 0; l < 32; ++l)
      if ((live >> l & 1u) && static_cast<unsigned>(emu::blk->shfl[base + l]) > r) r = static_cast<unsigned>(emu::blk->shfl[base + l]);
    return r;
  });
}
template <class V>
unsigned __match_any_sync(unsigned mask, V v) {
  static_assert(sizeof(V) <= 8, "emu: match of a wide type");
  if (mask != 0xffffffffu) throw std::runtime_error("emu: partial-mask __match_any_sync not emulated");
  unsigned long long raw = 0;
  std::memcpy(&raw, &v, sizeof(V));
  return emu::warp_collect(raw, [raw](unsigned live, int base) {
    unsigned r = 0;
    for (int l = 0; l < 32; ++l)
      if ((live >> l & 1u) && emu::blk->shfl[base + l] == raw) r |= 1u << l;
    return r;
  });
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
