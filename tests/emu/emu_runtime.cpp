/* emu_runtime.cpp: the CUDA runtime calls the launchers use, on host memory, with the
 * declarations of CUDA's own cuda_runtime_api.h (so a wrong call does not compile here either).
 *
 * Device: one, an H100 SXM (sm_90): 132 SMs, 228 KiB shared memory per SM, 48 KiB per block by
 * default and 227 KiB with cudaFuncAttributeMaxDynamicSharedMemorySize. Work is synchronous: a
 * launch or an async copy has finished when the call returns, so streams and events only keep
 * their bookkeeping (event times are host wall-clock times, not GPU times). */
#include "emu_internal.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

namespace {

const size_t kSmemDefault = 48 * 1024;
const size_t kSmemOptin = 227 * 1024;
const size_t kSmemPerSm = 228 * 1024;
const int kSmCount = 132;
const int kNumDevices = 1;

thread_local cudaError_t tls_last_error = cudaSuccess;
thread_local int tls_device = 0;

std::mutex g_attr_mutex;
std::unordered_map<const void*, int> g_max_dyn_smem; /* cudaFuncSetAttribute per kernel */

struct EmuEvent {
  std::chrono::steady_clock::time_point t;
  bool recorded;
};

cudaError_t fail(cudaError_t e) { return fh_emu::set_last_error(e); }

/* FH_EMU_MAX_CLUSTERS=n: at most n clusters (of more than one CTA) resident at once, so a test
 * can stand for a device or partition that schedules fewer, or none (0): the occupancy query
 * answers n at most, and with 0 a cluster launch fails. -1 when unset (no cap). */
long max_clusters_cap() {
  const char* e = std::getenv("FH_EMU_MAX_CLUSTERS");
  if (!e || !*e) return -1;
  char* end = nullptr;
  const long n = std::strtol(e, &end, 10);
  return *end == '\0' && n >= 0 ? n : -1;
}

} // namespace

struct CUstream_st {
  unsigned flags;
};

namespace fh_emu {

cudaError_t set_last_error(cudaError_t e) {
  if (e != cudaSuccess) tls_last_error = e;
  return e;
}

void launch(const LaunchConfig& cfg, std::function<void()> body) {
  const dim3 b = cfg.block, g = cfg.grid;
  const uint64_t threads = (uint64_t)b.x * b.y * b.z;
  if (threads == 0 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 ||
      g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    fail(cudaErrorInvalidConfiguration);
    return;
  }
  size_t limit = kSmemDefault;
  {
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    auto it = g_max_dyn_smem.find(cfg.func);
    if (it != g_max_dyn_smem.end()) limit = (size_t)it->second;
  }
  if (cfg.smem > limit) {
    fail(cudaErrorInvalidValue);
    return;
  }
  /* Clusters: at most 8 CTAs (the portable size), dividing the grid in every dimension; none of
   * more than one CTA when FH_EMU_MAX_CLUSTERS is 0 (a device that schedules no cluster). */
  const dim3 c = cfg.cluster;
  const uint64_t csize = (uint64_t)c.x * c.y * c.z;
  if (c.x == 0 || c.y == 0 || c.z == 0 || csize > 8 || g.x % c.x || g.y % c.y || g.z % c.z ||
      (csize > 1 && max_clusters_cap() == 0)) {
    fail(cudaErrorInvalidClusterSize);
    return;
  }
  LaunchState L{cfg, std::move(body)};
  run_launch(L);
}

} // namespace fh_emu

/* ---- errors ---- */

cudaError_t cudaGetLastError(void) {
  cudaError_t e = tls_last_error;
  tls_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return tls_last_error; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorInvalidClusterSize: return "cudaErrorInvalidClusterSize";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorInvalidClusterSize: return "invalid cluster size";
    default: return "unknown error";
  }
}

/* ---- device ---- */

cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return fail(cudaErrorInvalidValue);
  *count = kNumDevices;
  return cudaSuccess;
}
/* Versions of the toolkit the emulator stands in for (CUDA 13.0). */
cudaError_t cudaDriverGetVersion(int* version) {
  if (!version) return fail(cudaErrorInvalidValue);
  *version = 13000;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  if (!version) return fail(cudaErrorInvalidValue);
  *version = 13000;
  return cudaSuccess;
}
/* The emulated device has the H100's 80 GiB and reports all of it free: allocations are host
 * memory, so the number only lets callers size problems as they would on the real device. */
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  if (!free_bytes || !total_bytes) return fail(cudaErrorInvalidValue);
  *total_bytes = (size_t)80 << 30;
  *free_bytes = *total_bytes;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  if (!device) return fail(cudaErrorInvalidValue);
  *device = tls_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= kNumDevices) return fail(cudaErrorInvalidDevice);
  tls_device = device;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp* p, int device) {
  if (!p) return fail(cudaErrorInvalidValue);
  if (device < 0 || device >= kNumDevices) return fail(cudaErrorInvalidDevice);
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "NVIDIA H100 80GB HBM3 (fusedhead SIMT emulator)");
  p->totalGlobalMem = 80ull << 30;
  p->sharedMemPerBlock = kSmemDefault;
  p->sharedMemPerBlockOptin = kSmemOptin;
  p->sharedMemPerMultiprocessor = kSmemPerSm;
  p->reservedSharedMemPerBlock = 1024;
  p->regsPerBlock = 65536;
  p->regsPerMultiprocessor = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = 1024, p->maxThreadsDim[1] = 1024, p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647, p->maxGridSize[1] = 65535, p->maxGridSize[2] = 65535;
  p->totalConstMem = 65536;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = kSmCount;
  p->maxThreadsPerMultiProcessor = 2048;
  p->maxBlocksPerMultiProcessor = 32;
  p->l2CacheSize = 50 * 1024 * 1024;
  p->memoryBusWidth = 5120;
  p->concurrentKernels = 1;
  p->unifiedAddressing = 1;
  p->cooperativeLaunch = 1;
  p->clusterLaunch = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (!value) return fail(cudaErrorInvalidValue);
  if (device < 0 || device >= kNumDevices) return fail(cudaErrorInvalidDevice);
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, device);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = (int)p.sharedMemPerBlock; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = (int)p.sharedMemPerBlockOptin; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = (int)p.sharedMemPerMultiprocessor; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = p.maxThreadsPerMultiProcessor; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = p.maxBlocksPerMultiProcessor; break;
    case cudaDevAttrWarpSize: *value = p.warpSize; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = p.regsPerBlock; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = p.regsPerMultiprocessor; break;
    case cudaDevAttrL2CacheSize: *value = p.l2CacheSize; break;
    case cudaDevAttrMaxBlockDimX: *value = p.maxThreadsDim[0]; break;
    case cudaDevAttrMaxBlockDimY: *value = p.maxThreadsDim[1]; break;
    case cudaDevAttrMaxBlockDimZ: *value = p.maxThreadsDim[2]; break;
    case cudaDevAttrMaxGridDimX: *value = p.maxGridSize[0]; break;
    case cudaDevAttrMaxGridDimY: *value = p.maxGridSize[1]; break;
    case cudaDevAttrMaxGridDimZ: *value = p.maxGridSize[2]; break;
    case cudaDevAttrClusterLaunch: *value = p.clusterLaunch; break;
    default: return fail(cudaErrorInvalidValue); /* not modelled: fail loudly rather than guess */
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (!func) return fail(cudaErrorInvalidDeviceFunction);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || (size_t)value > kSmemOptin) return fail(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    g_max_dyn_smem[func] = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess; /* a hint */
  return fail(cudaErrorInvalidValue);
}

/* Clusters of the launch configuration's size that the device keeps resident at once: its SMs'
 * CTAs (by threads, dynamic shared memory with the 1 KiB each block reserves, and the 32 blocks
 * an SM holds) grouped by the cluster size, capped by FH_EMU_MAX_CLUSTERS. The emulator has no
 * GPCs, so a real H100 may answer less. The cluster size must be in the configuration (the
 * kernels here set no required size). */
cudaError_t cudaOccupancyMaxActiveClusters(int* num, const void* func, const cudaLaunchConfig_t* cfg) {
  if (!num || !cfg) return fail(cudaErrorInvalidValue);
  if (!func) return fail(cudaErrorInvalidDeviceFunction);
  const cudaLaunchAttribute* cl = nullptr;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs && cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) cl = &cfg->attrs[i];
  if (!cl) return fail(cudaErrorInvalidClusterSize);
  const uint64_t csize = (uint64_t)cl->val.clusterDim.x * cl->val.clusterDim.y * cl->val.clusterDim.z;
  if (csize == 0 || csize > 8) return fail(cudaErrorInvalidClusterSize);
  const dim3 b = cfg->blockDim;
  const uint64_t threads = (uint64_t)b.x * b.y * b.z;
  if (threads == 0 || threads > 1024) return fail(cudaErrorInvalidValue);
  size_t limit = kSmemDefault;
  {
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    auto it = g_max_dyn_smem.find(func);
    if (it != g_max_dyn_smem.end()) limit = (size_t)it->second;
  }
  if (cfg->dynamicSmemBytes > limit) return fail(cudaErrorInvalidValue);
  const uint64_t by_smem = kSmemPerSm / (cfg->dynamicSmemBytes + 1024), by_threads = 2048 / threads;
  const uint64_t per_sm = std::min<uint64_t>(std::min(by_smem, by_threads), 32);
  long n = (long)((uint64_t)kSmCount * per_sm / csize);
  const long cap = max_clusters_cap();
  if (cap >= 0 && csize > 1) n = std::min(n, cap);
  *num = (int)n;
  return cudaSuccess;
}

/* ---- memory ---- */

cudaError_t cudaMalloc(void** p, size_t size) {
  if (!p) return fail(cudaErrorInvalidValue);
  *p = nullptr;
  if (size == 0) return cudaSuccess;
  /* 256-byte aligned like cudaMalloc, exact size so ASan sees a read one past the end. */
  if (posix_memalign(p, 256, size) != 0) {
    *p = nullptr;
    return fail(cudaErrorMemoryAllocation);
  }
  std::memset(*p, 0xff, size); /* all-ones: NaN in fp32, fp16 and bf16 */
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMallocAsync(void** p, size_t size, cudaStream_t) { return cudaMalloc(p, size); }
cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
cudaError_t cudaMallocHost(void** p, size_t size) { return cudaMalloc(p, size); }
cudaError_t cudaFreeHost(void* p) { return cudaFree(p); }

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind) {
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault) return fail(cudaErrorInvalidMemcpyDirection);
  if (count == 0) return cudaSuccess;
  if (!dst || !src) return fail(cudaErrorInvalidValue);
  std::memcpy(dst, src, count); /* overlapping ranges are an error for cudaMemcpy too: ASan reports it */
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, count, kind);
}
cudaError_t cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                         enum cudaMemcpyKind kind) {
  if (width > dpitch || width > spitch) return fail(cudaErrorInvalidValue);
  for (size_t r = 0; r < height; ++r) {
    cudaError_t e = cudaMemcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width, kind);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              enum cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy2D(dst, dpitch, src, spitch, width, height, kind);
}
cudaError_t cudaMemset(void* p, int value, size_t count) {
  if (count == 0) return cudaSuccess;
  if (!p) return fail(cudaErrorInvalidValue);
  std::memset(p, value, count);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) { return cudaMemset(p, value, count); }

/* ---- streams and events ---- */

cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int flags) {
  if (!s) return fail(cudaErrorInvalidValue);
  *s = new CUstream_st{flags};
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamQuery(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t e, unsigned int) {
  return e ? cudaSuccess : fail(cudaErrorInvalidResourceHandle);
}

cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned int) {
  if (!e) return fail(cudaErrorInvalidValue);
  *e = reinterpret_cast<cudaEvent_t>(new EmuEvent{std::chrono::steady_clock::now(), false});
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<EmuEvent*>(e);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
  if (!e) return fail(cudaErrorInvalidResourceHandle);
  EmuEvent* ev = reinterpret_cast<EmuEvent*>(e);
  ev->t = std::chrono::steady_clock::now();
  ev->recorded = true;
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) { return e ? cudaSuccess : fail(cudaErrorInvalidResourceHandle); }
cudaError_t cudaEventQuery(cudaEvent_t e) { return e ? cudaSuccess : fail(cudaErrorInvalidResourceHandle); }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (!ms || !start || !end) return fail(cudaErrorInvalidValue);
  EmuEvent* a = reinterpret_cast<EmuEvent*>(start);
  EmuEvent* b = reinterpret_cast<EmuEvent*>(end);
  if (!a->recorded || !b->recorded) return fail(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
  return cudaSuccess;
}
