/* runtime.cu: the CUDA state a context holds, and turning device-raised data errors into
 * statuses.
 *
 * Formula: none (host glue). Shapes: one int on the device, the error flag.
 * Thread mapping: none; no kernels here. The flag is written by kernels with atomicExch when they
 * find invalid data (a target out of range) and read back, then cleared, by fh_cuda_check, which
 * is the only place that synchronizes the host with the stream (docs/conventions.md).
 * Numerics: none. */
#include <stdlib.h>

#include "blas.cuh"
#include "common.cuh"

static const char* device_error_text(int code) {
  switch (code) {
    case FH_DEVERR_TARGET_OUT_OF_RANGE: return "a target is outside [0, V) and is not ignore_index";
    case FH_DEVERR_BAD_WEIGHT: return "a weight is negative or not finite";
    case FH_DEVERR_BAD_SPARSE_TEACHER:
      return "a sparse teacher row has an id outside [0, V) or repeated, a NaN or +inf log-probability, no finite "
             "one, or (remainder) total probability above 1 + 1e-3";
    case FH_DEVERR_DECODE_PARAM:
      return "a decoding per-row parameter, bias, banned-id, draft-token or row-index entry is out of range (the row "
             "was reported degenerate)";
    default: return "a kernel reported invalid input data";
  }
}

extern "C" fh_status_t fh_cuda_state_create(int device, fh_cuda_state_t** out) {
  static const char fn[] = "fh_context_create";
  *out = NULL;
  int count = 0;
  FH_TRY(fh_cuda_status(cudaGetDeviceCount(&count), fn, "cudaGetDeviceCount"));
  if (device < 0 || device >= count)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "device %d is not in [0, %d)", device, count);
  FH_TRY(fh_cuda_status(cudaSetDevice(device), fn, "cudaSetDevice"));
  fh_cuda_state_t* st = (fh_cuda_state_t*)calloc(1, sizeof *st);
  if (!st) return fh_set_error(FH_ERR_OUT_OF_MEMORY, fn, "cannot allocate the CUDA state");
  st->device = device;
  int v[6];
  const cudaDeviceAttr attrs[6] = {cudaDevAttrMultiProcessorCount, cudaDevAttrComputeCapabilityMajor,
                                   cudaDevAttrComputeCapabilityMinor, cudaDevAttrMaxSharedMemoryPerBlock,
                                   cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrMaxSharedMemoryPerMultiprocessor};
  fh_status_t s = FH_SUCCESS;
  for (int i = 0; i < 6 && s == FH_SUCCESS; ++i) s = fh_cuda_status(cudaDeviceGetAttribute(&v[i], attrs[i], device), fn, "cudaDeviceGetAttribute");
  if (s == FH_SUCCESS) {
    st->sm_count = v[0];
    st->cc_major = v[1];
    st->cc_minor = v[2];
    st->smem_per_block = (size_t)v[3];
    st->smem_per_block_optin = (size_t)v[4];
    st->smem_per_sm = (size_t)v[5];
    cudaError_t e = cudaMalloc((void**)&st->d_error, sizeof(int));
    if (e == cudaErrorMemoryAllocation) s = fh_set_error(FH_ERR_OUT_OF_MEMORY, fn, "cudaMalloc of the error flag failed");
    else s = fh_cuda_status(e, fn, "cudaMalloc");
  }
  if (s == FH_SUCCESS) s = fh_cuda_status(cudaMemset(st->d_error, 0, sizeof(int)), fn, "cudaMemset");
  /* cudaMemset is asynchronous on the legacy stream, which a cudaStreamNonBlocking user stream does
   * not wait for: finish it before any kernel can raise the flag. */
  if (s == FH_SUCCESS) s = fh_cuda_status(cudaDeviceSynchronize(), fn, "cudaDeviceSynchronize");
  if (s == FH_SUCCESS) s = fh_blas_create(&st->blas, fn);
  if (s != FH_SUCCESS) {
    fh_cuda_state_destroy(st);
    return s;
  }
  *out = st;
  return FH_SUCCESS;
}

extern "C" void fh_cuda_state_destroy(fh_cuda_state_t* st) {
  if (!st) return;
  fh_blas_destroy(st->blas);
  if (st->d_error) (void)cudaFree(st->d_error);
  free(st);
}

extern "C" int* fh_cuda_error_flag(fh_cuda_state_t* st) { return st->d_error; }

extern "C" fh_status_t fh_cuda_check(fh_cuda_state_t* st, struct CUstream_st* stream) {
  static const char fn[] = "fh_context_check";
  FH_TRY(fh_cuda_status(cudaStreamSynchronize(stream), fn, "cudaStreamSynchronize"));
  int code = 0;
  FH_TRY(fh_cuda_status(cudaMemcpy(&code, st->d_error, sizeof code, cudaMemcpyDeviceToHost), fn, "cudaMemcpy"));
  if (code == FH_DEVERR_NONE) return FH_SUCCESS;
  /* Clear before returning, so one bad call is reported once. On the context's stream: a legacy-
   * stream cudaMemset is not ordered before the next kernels of a non-blocking stream and could
   * erase the error one of them raises. */
  FH_TRY(fh_cuda_status(cudaMemsetAsync(st->d_error, 0, sizeof(int), stream), fn, "cudaMemsetAsync"));
  return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s (device error code %d)", device_error_text(code), code);
}
