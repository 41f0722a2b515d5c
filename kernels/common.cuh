/* common.cuh: what every kernel file of fusedhead shares.
 *
 * - FH_LAUNCH / FH_DYNAMIC_SMEM / fh_cuda_launch_status: the launch path, identical under nvcc
 *   and under the SIMT emulator (tests/emu), which compiles these same files as host C++.
 * - struct fh_cuda_state: the device properties and the device error flag a context caches.
 * - Numerics: dtype loads to fp32, warp and block reductions written with __shfl_xor_sync and
 *   shared memory (CUB's block/warp primitives cannot run under the emulator), and the online
 *   (max, sum-exp) statistics every softmax-shaped kernel merges.
 * - Async copies (cp.async) behind wrappers with a synchronous emulator twin.
 *
 * Rules for kernels (docs/architecture.md, "Kernels"): every warp collective names exactly the lanes that
 * call it; every __syncthreads is reached by every thread of the block (no early return before a
 * barrier); index math that multiplies a row by V or D is int64_t. */
#ifndef FH_KERNELS_COMMON_CUH
#define FH_KERNELS_COMMON_CUH

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif
/* Without nvcc, tests/emu/emu_device.h was force-included and provides all of the above. */

#include <math.h>
#include <stdint.h>

#include "cuda_backend.h"
#include "fh_internal.h"
#include "fusedhead.h"

/* ---- launch ----------------------------------------------------------------------------------
 * FH_LAUNCH(kernel, grid, block, smem, stream, args...). `kernel` must be one macro argument:
 * for a template kernel with several arguments take a pointer first,
 *   auto k = my_kernel<float, 128>;  FH_LAUNCH(k, ...);
 * Check the result right after with fh_cuda_launch_status(). */
#ifdef __CUDACC__
#define FH_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#else
#define FH_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::fh_emu::launch_kernel(#kernel, kernel, (grid), (block), (smem), (stream), ##__VA_ARGS__)
#endif

/* FH_LAUNCH_CLUSTER(kernel, grid, block, cluster, smem, stream, args...): a launch in clusters of
 * cluster.x * cluster.y * cluster.z CTAs (compute capability 9.0; at most 8, dividing the grid),
 * whose CTAs run together and reach each other's shared memory (docs/hopper.md). */
#ifdef __CUDACC__
template <class... P, class... A>
static inline void fh_launch_cluster(void (*kernel)(P...), dim3 grid, dim3 block, dim3 cluster, size_t smem,
                                     cudaStream_t stream, A&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeClusterDimension;
  at[0].val.clusterDim.x = cluster.x;
  at[0].val.clusterDim.y = cluster.y;
  at[0].val.clusterDim.z = cluster.z;
  cfg.attrs = at;
  cfg.numAttrs = 1;
  (void)cudaLaunchKernelEx(&cfg, kernel, static_cast<A&&>(args)...); /* fh_cuda_launch_status reads the error */
}
#define FH_LAUNCH_CLUSTER(kernel, grid, block, cluster, smem, stream, ...) \
  fh_launch_cluster(kernel, (grid), (block), (cluster), (smem), (stream), ##__VA_ARGS__)
#else
#define FH_LAUNCH_CLUSTER(kernel, grid, block, cluster, smem, stream, ...) \
  ::fh_emu::launch_kernel_cluster(#kernel, kernel, (grid), (block), (cluster), (smem), (stream), ##__VA_ARGS__)
#endif

/* Dynamic shared memory as `T* name`, 128-byte aligned (WMMA needs 256-bit alignment). A macro
 * because the emulator cannot give `extern __shared__ T name[]` a per-block size. */
#ifdef __CUDACC__
#define FH_DYNAMIC_SMEM(T, name)                                   \
  extern __shared__ __align__(128) unsigned char fh_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(fh_dynamic_smem_)
#else
#define FH_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::fh_emu::dynamic_smem())
#endif

/* The launch just made (or the launch configuration) failed: clear the error, name it. */
static inline fh_status_t fh_cuda_launch_status(const char* fn, const char* kernel) {
  cudaError_t e = cudaGetLastError(); /* also clears it, so the next call starts clean */
  if (e == cudaSuccess) return FH_SUCCESS;
  return fh_set_error(FH_ERR_CUDA, fn, "launch of %s failed: %s (%s)", kernel, cudaGetErrorString(e),
                      cudaGetErrorName(e));
}
/* Any other runtime call. */
static inline fh_status_t fh_cuda_status(cudaError_t e, const char* fn, const char* what) {
  if (e == cudaSuccess) return FH_SUCCESS;
  (void)cudaGetLastError();
  return fh_set_error(FH_ERR_CUDA, fn, "%s failed: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

/* ---- the context's CUDA state ------------------------------------------------------------- */
struct fh_cuda_state {
  int device;
  int sm_count;
  int cc_major, cc_minor;
  size_t smem_per_block;       /* default dynamic + static limit (48 KiB) */
  size_t smem_per_block_optin; /* with cudaFuncAttributeMaxDynamicSharedMemorySize */
  size_t smem_per_sm;
  int* d_error; /* device int: 0, or an fh_device_error_t a kernel raised */
  void* blas;   /* cublasHandle_t under nvcc (kernels/blas.cu), unused by the emulator */
};

/* Codes kernels store (atomicExch, first one wins in practice) into fh_cuda_state::d_error. */
typedef enum fh_device_error {
  FH_DEVERR_NONE = 0,
  FH_DEVERR_TARGET_OUT_OF_RANGE = 1, /* a target outside [0, V) that is not ignore_index */
  FH_DEVERR_BAD_WEIGHT = 2,          /* a per-row weight that is negative or not finite */
  FH_DEVERR_BAD_SPARSE_TEACHER = 3,  /* a sparse teacher's id or log-probs (fusedhead.h) */
  FH_DEVERR_DECODE_PARAM = 4,        /* a decoding per-row parameter or sparse-list entry out of range */
  FH_DEVERR_COUNT
} fh_device_error_t;

/* ---- numerics --------------------------------------------------------------------------------- */
__device__ __forceinline__ float fh_to_float(float x) { return x; }
__device__ __forceinline__ float fh_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float fh_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

#define FH_FULL_MASK 0xffffffffu

__device__ __forceinline__ float fh_warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FH_FULL_MASK, v, off);
  return v; /* every lane holds the sum */
}
__device__ __forceinline__ float fh_warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FH_FULL_MASK, v, off));
  return v;
}

/* Online softmax statistics: m = max seen, s = sum of exp(x - m). The identity is (-inf, 0).
 * Special values follow the reference: NaN anywhere gives NaN; else +inf gives +inf; a row of
 * only -inf (or no elements) gives -inf. */
struct fh_stats {
  float m, s;
};
__device__ __forceinline__ fh_stats fh_stats_identity() { return fh_stats{-INFINITY, 0.0f}; }

__device__ __forceinline__ void fh_stats_add(fh_stats& st, float x) {
  if (x > st.m) { /* new max: rescale what we had (0 * exp(-inf) = 0 for the identity) */
    st.s = st.s * expf(st.m - x) + 1.0f;
    st.m = x;
  } else if (x != -INFINITY) { /* x == m avoids inf - inf; a NaN x falls through to expf(NaN) */
    st.s += (x == st.m) ? 1.0f : expf(x - st.m);
  }
}

__device__ __forceinline__ fh_stats fh_stats_merge(fh_stats a, fh_stats b) {
  if (isnan(a.s) || isnan(b.s)) return fh_stats{NAN, NAN};
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return fh_stats_identity();
  if (m == INFINITY) return fh_stats{INFINITY, 1.0f}; /* avoids exp(inf - inf) */
  return fh_stats{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ float fh_stats_lse(fh_stats st) { return st.m + logf(st.s); }

__device__ __forceinline__ fh_stats fh_warp_stats(fh_stats st) {
  for (int off = 16; off > 0; off >>= 1) {
    fh_stats o{__shfl_xor_sync(FH_FULL_MASK, st.m, off), __shfl_xor_sync(FH_FULL_MASK, st.s, off)};
    st = fh_stats_merge(st, o);
  }
  return st;
}

/* Block-wide reductions. blockDim.x must be a multiple of 32 (<= 1024), blockDim.y = z = 1,
 * and every thread of the block must call them (they contain __syncthreads). `scratch` is shared
 * memory of at least 32 elements; it may be reused right after the call returns. */
__device__ __forceinline__ float fh_block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  v = fh_warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads(); /* partial sums visible to warp 0 */
  if (warp == 0) {
    v = fh_warp_sum(lane < nwarps ? scratch[lane] : 0.0f);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads(); /* result visible to all */
  v = scratch[0];
  __syncthreads(); /* nobody overwrites scratch before everyone read it */
  return v;
}

__device__ __forceinline__ fh_stats fh_block_stats(fh_stats st, fh_stats* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  st = fh_warp_stats(st);
  if (lane == 0) scratch[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = fh_warp_stats(lane < nwarps ? scratch[lane] : fh_stats_identity());
    if (lane == 0) scratch[0] = st;
  }
  __syncthreads();
  st = scratch[0];
  __syncthreads();
  return st;
}

/* ---- async copies --------------------------------------------------------------------------
 * cp.async of 4, 8 or 16 bytes from global to shared memory; commit a group; wait until at most
 * `n` groups are pending. The emulator copies at once, which is one legal schedule. */
__device__ __forceinline__ void fh_cp_async(void* smem_dst, const void* gmem_src, size_t bytes) {
#ifdef __CUDACC__
  __pipeline_memcpy_async(smem_dst, gmem_src, bytes);
#else
  memcpy(smem_dst, gmem_src, bytes);
#endif
}
__device__ __forceinline__ void fh_cp_async_commit() {
#ifdef __CUDACC__
  __pipeline_commit();
#endif
}
__device__ __forceinline__ void fh_cp_async_wait(unsigned n) {
#ifdef __CUDACC__
  __pipeline_wait_prior(n);
#else
  (void)n;
#endif
}

#endif
