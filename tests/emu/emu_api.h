/* emu_api.h: the emulator's internal interface between device code (emu_device.h, emu_wmma.h)
 * and its runtime (emu_core.cpp, emu_warp.cpp, emu_runtime.cpp). No CUDA keyword macros here,
 * so the runtime's own C++ compiles unchanged. */
#ifndef FH_EMU_API_H
#define FH_EMU_API_H

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <functional>

namespace fh_emu {

/* Coordinates of the CUDA thread the current fiber runs. */
struct ThreadCoords {
  uint3 threadIdx;
  uint3 blockIdx;
  dim3 blockDim;
  dim3 gridDim;
};
extern thread_local const ThreadCoords* tls_coords;
const ThreadCoords& coords(); /* *tls_coords, for threadIdx and friends (emu_device.h says why) */

/* One lane's mailbox for a warp collective: inputs before arrival, result after release. */
struct LaneSlot {
  uint64_t in;
  uint64_t out;
  int arg;
  int width;
  const void* p[4];
  unsigned ldm;
  int layout;
};
/* Runs once, in the last lane to arrive, with every participating lane's slot (others NULL). */
typedef void (*CompleteFn)(LaneSlot* const* lanes, unsigned mask);

LaneSlot& lane_slot();
int lane_id();
/* Block until every lane named in `mask` arrived at a collective with the same `fn`; the last
 * one runs `fn`. `kind` is 0 for ordinary collectives, 1 for shuffles (both counted in
 * warp_collectives), 2 for WMMA and 3 for the .sync.aligned PTX twins (full warp required, counted
 * by their own counters). */
void warp_collective(const char* name, unsigned mask, CompleteFn fn, int kind);
/* __syncthreads and its reductions: returns the number of threads with pred != 0. */
int block_barrier(int pred);
unsigned active_mask();
void* dynamic_smem();
void note_atomic();
void note_mma(uint64_t flops);
[[noreturn]] void report_and_abort(const char* what, const char* fmt, ...);

/* ---- launch ---- */
struct LaunchConfig {
  const char* name;
  const void* func;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  dim3 cluster = dim3(1, 1, 1); /* CTAs per cluster (cudaLaunchAttributeClusterDimension) */
};
void launch(const LaunchConfig& cfg, std::function<void()> body);

template <class... P, class... A>
inline void launch_kernel(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, A&&... args) {
  /* Arguments are captured by value, as the real launch copies them into the parameter space. */
  launch(LaunchConfig{name, reinterpret_cast<const void*>(kernel), grid, block, smem, stream},
         [kernel, args...]() { kernel(args...); });
}

/* A launch with clusters of cluster.x * cluster.y * cluster.z CTAs (FH_LAUNCH_CLUSTER). */
template <class... P, class... A>
inline void launch_kernel_cluster(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, dim3 cluster,
                                  size_t smem, cudaStream_t stream, A&&... args) {
  launch(LaunchConfig{name, reinterpret_cast<const void*>(kernel), grid, block, smem, stream, cluster},
         [kernel, args...]() { kernel(args...); });
}

template <class T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8, "warp collectives move at most 8 bytes per lane");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(static_cast<void*>(&v), &b, sizeof(T));
  return v;
}

void complete_shfl(LaneSlot* const*, unsigned);
void complete_shfl_up(LaneSlot* const*, unsigned);
void complete_shfl_down(LaneSlot* const*, unsigned);
void complete_shfl_xor(LaneSlot* const*, unsigned);
void complete_ballot(LaneSlot* const*, unsigned);
void complete_nothing(LaneSlot* const*, unsigned);
void complete_reduce_add(LaneSlot* const*, unsigned);
void complete_reduce_min_u(LaneSlot* const*, unsigned);
void complete_reduce_max_u(LaneSlot* const*, unsigned);
void complete_reduce_min_i(LaneSlot* const*, unsigned);
void complete_reduce_max_i(LaneSlot* const*, unsigned);
void complete_reduce_and(LaneSlot* const*, unsigned);
void complete_reduce_or(LaneSlot* const*, unsigned);
void complete_reduce_xor(LaneSlot* const*, unsigned);
void complete_match_any(LaneSlot* const*, unsigned);

template <class T>
inline T shuffle(const char* name, CompleteFn fn, unsigned mask, T var, int arg, int width) {
  LaneSlot& s = lane_slot();
  s.in = to_bits(var);
  s.arg = arg;
  s.width = width;
  warp_collective(name, mask, fn, 1);
  /* Only the bytes of T are meaningful; a source lane outside the mask yields 0xFF bytes. */
  return from_bits<T>(s.out);
}

inline uint64_t vote(const char* name, CompleteFn fn, unsigned mask, uint64_t in) {
  LaneSlot& s = lane_slot();
  s.in = in;
  warp_collective(name, mask, fn, 0);
  return s.out;
}

} // namespace fh_emu

#endif
