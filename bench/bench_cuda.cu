/* bench_cuda.cu: see bench_cuda.h. Host glue plus two fill kernels (grid-stride, one element
 * per thread per step; a splitmix64 hash of (seed, index), so the data do not depend on the
 * launch configuration). */
#include "bench_cuda.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
/* The launch; the SIMT emulator's form otherwise (kernels/common.cuh's FH_LAUNCH, which needs the
 * library's private headers), so this file can be smoke-tested against fusedhead_emu. */
#define BC_LAUNCH(kernel, grid, block, ...) kernel<<<(grid), (block)>>>(__VA_ARGS__)
#else
#define BC_LAUNCH(kernel, grid, block, ...) \
  ::fh_emu::launch_kernel(#kernel, kernel, dim3(grid), dim3(block), 0, (cudaStream_t)0, __VA_ARGS__)
#endif
#include <string.h>

#include <new>

struct bc_timer {
  cudaEvent_t start, stop;
};

static int ok(cudaError_t e) {
  if (e == cudaSuccess) return 0;
  (void)cudaGetLastError();
  return (int)e;
}

extern "C" int bc_device_info(int device, bc_device_info_t* info) {
  memset(info, 0, sizeof *info);
  cudaDeviceProp p;
  int r = ok(cudaGetDeviceProperties(&p, device));
  if (r) return r;
  strncpy(info->name, p.name, sizeof info->name - 1);
  info->cc_major = p.major, info->cc_minor = p.minor;
  info->total_mem = p.totalGlobalMem;
  int v = 0;
  if (!ok(cudaDeviceGetAttribute(&v, cudaDevAttrClockRate, device))) info->sm_clock_mhz = v / 1000;
  if (!ok(cudaDeviceGetAttribute(&v, cudaDevAttrMemoryClockRate, device))) info->mem_clock_mhz = v / 1000;
  if (!ok(cudaDeviceGetAttribute(&v, cudaDevAttrL2CacheSize, device))) info->l2_bytes = (size_t)v;
  (void)ok(cudaDriverGetVersion(&info->driver_version));
  (void)ok(cudaRuntimeGetVersion(&info->runtime_version));
  return 0;
}

extern "C" int bc_mem_info(size_t* free_bytes, size_t* total_bytes) { return ok(cudaMemGetInfo(free_bytes, total_bytes)); }

extern "C" void* bc_malloc(size_t bytes) {
  void* p = NULL;
  if (ok(cudaMalloc(&p, bytes ? bytes : 1))) return NULL;
  return p;
}
extern "C" void bc_free(void* p) {
  if (p) (void)cudaFree(p);
}
extern "C" int bc_memset(void* p, int value, size_t bytes) { return ok(cudaMemsetAsync(p, value, bytes, 0)); }
extern "C" int bc_copy_to_host(void* dst, const void* src, size_t bytes) {
  return ok(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
extern "C" int bc_copy_to_device(void* dst, const void* src, size_t bytes) {
  return ok(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
extern "C" int bc_sync(void) { return ok(cudaDeviceSynchronize()); }

__device__ __forceinline__ uint64_t bc_hash(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

template <typename T>
__device__ __forceinline__ T bc_from_float(float x);
template <>
__device__ __forceinline__ float bc_from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half bc_from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 bc_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__global__ void bc_fill_kernel(T* p, int64_t n, float scale, uint64_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float u = (float)(bc_hash(seed ^ (uint64_t)i * 0x2545f4914f6cdd1dull) >> 40) * 0x1p-23f - 1.0f;
    p[i] = bc_from_float<T>(scale * u);
  }
}

__global__ void bc_targets_kernel(int64_t* p, int64_t n, int64_t V, uint64_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    p[i] = (int64_t)(bc_hash(seed + (uint64_t)i) % (uint64_t)V);
}

extern "C" int bc_fill_uniform(void* p, fh_dtype_t dtype, int64_t n, float scale, uint64_t seed) {
  if (n <= 0) return 0;
  const unsigned grid = 1024, block = 256;
  if (dtype == FH_DTYPE_F32) {
    auto k = bc_fill_kernel<float>;
    BC_LAUNCH(k, grid, block, (float*)p, n, scale, seed);
  } else if (dtype == FH_DTYPE_F16) {
    auto k = bc_fill_kernel<__half>;
    BC_LAUNCH(k, grid, block, (__half*)p, n, scale, seed);
  } else if (dtype == FH_DTYPE_BF16) {
    auto k = bc_fill_kernel<__nv_bfloat16>;
    BC_LAUNCH(k, grid, block, (__nv_bfloat16*)p, n, scale, seed);
  } else {
    return -1;
  }
  return ok(cudaGetLastError());
}

extern "C" int bc_fill_targets(int64_t* p, int64_t n, int64_t V, uint64_t seed) {
  if (n <= 0) return 0;
  if (V <= 0) return -1;
  BC_LAUNCH(bc_targets_kernel, 1024, 256, p, n, V, seed);
  return ok(cudaGetLastError());
}

extern "C" bc_timer_t* bc_timer_create(void) {
  bc_timer_t* t = new (std::nothrow) bc_timer_t;
  if (!t) return NULL;
  if (ok(cudaEventCreate(&t->start))) {
    delete t;
    return NULL;
  }
  if (ok(cudaEventCreate(&t->stop))) {
    (void)cudaEventDestroy(t->start);
    delete t;
    return NULL;
  }
  return t;
}
extern "C" void bc_timer_destroy(bc_timer_t* t) {
  if (!t) return;
  (void)cudaEventDestroy(t->start);
  (void)cudaEventDestroy(t->stop);
  delete t;
}
extern "C" int bc_timer_start(bc_timer_t* t) { return ok(cudaEventRecord(t->start, 0)); }
extern "C" double bc_timer_stop_ms(bc_timer_t* t) {
  float ms = 0.0f;
  if (ok(cudaEventRecord(t->stop, 0)) || ok(cudaEventSynchronize(t->stop)) || ok(cudaEventElapsedTime(&ms, t->start, t->stop)))
    return -1.0;
  return (double)ms;
}
