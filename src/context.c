/* Context lifetime and backend selection. */
#include <stdlib.h>
#ifdef FH_HAVE_OPENMP
#include <omp.h>
#endif

#include "cuda_backend.h"
#include "fh_internal.h"
#include "ref/ref_common.h"

static _Thread_local int fh_tls_threads;

void fh_ref_set_threads(int n) { fh_tls_threads = n; }

int fh_ref_threads(void) {
#ifdef FH_HAVE_OPENMP
  return fh_tls_threads > 0 ? fh_tls_threads : omp_get_max_threads();
#else
  return 1;
#endif
}

fh_status_t fh_context_set_num_threads(fh_context_t* ctx, int num_threads) {
  static const char fn[] = "fh_context_set_num_threads";
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  if (num_threads < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "num_threads is %d (must be >= 0; 0 is OpenMP's default)",
                        num_threads);
  ctx->num_threads = num_threads;
  return FH_SUCCESS;
}

fh_status_t fh_context_get_num_threads(const fh_context_t* ctx, int* num_threads) {
  static const char fn[] = "fh_context_get_num_threads";
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  if (!num_threads) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "num_threads is NULL");
  *num_threads = ctx->num_threads;
  return FH_SUCCESS;
}

int fh_backend_available(fh_backend_t backend) {
  switch (backend) {
    case FH_BACKEND_CPU: return 1;
#ifdef FH_HAVE_CUDA
    case FH_BACKEND_CUDA: return 1;
#endif
    default: return 0;
  }
}

fh_status_t fh_context_create(fh_context_t** ctx, fh_backend_t backend, int device) {
  static const char fn[] = "fh_context_create";
  fh_clear_error();
  if (!ctx) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "ctx is NULL");
  *ctx = NULL;
  FH_TRY(fh_check_enum(fn, "backend", (int)backend, FH_BACKEND_COUNT));
  if (device < 0) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "device is %d (must be >= 0)", device);
  if (!fh_backend_available(backend))
    return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                        "backend CUDA is not available: fusedhead was built without CUDA "
                        "(configure with FH_ENABLE_CUDA=ON and a CUDA toolkit)");
  fh_context_t* c = (fh_context_t*)calloc(1, sizeof *c);
  if (!c) return fh_set_error(FH_ERR_OUT_OF_MEMORY, fn, "cannot allocate the context");
  c->backend = backend;
  c->device = device;
  c->stream = NULL;
#ifdef FH_HAVE_CUDA
  if (backend == FH_BACKEND_CUDA) {
    fh_status_t st = fh_cuda_state_create(device, &c->cuda);
    if (st != FH_SUCCESS) {
      free(c);
      return st;
    }
  }
#endif
  *ctx = c;
  return FH_SUCCESS;
}

void fh_context_destroy(fh_context_t* ctx) {
  if (!ctx) return;
#ifdef FH_HAVE_CUDA
  if (ctx->cuda) fh_cuda_state_destroy(ctx->cuda);
#endif
  free(ctx);
}

fh_status_t fh_context_set_stream(fh_context_t* ctx, struct CUstream_st* stream) {
  static const char fn[] = "fh_context_set_stream";
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  if (ctx->backend == FH_BACKEND_CPU && stream != NULL)
    return fh_set_error(FH_ERR_INVALID_USAGE, fn, "stream must be NULL for the CPU backend");
  ctx->stream = stream;
  return FH_SUCCESS;
}

fh_status_t fh_context_get_backend(const fh_context_t* ctx, fh_backend_t* backend) {
  static const char fn[] = "fh_context_get_backend";
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  if (!backend) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "backend is NULL");
  *backend = ctx->backend;
  return FH_SUCCESS;
}

fh_status_t fh_context_check(fh_context_t* ctx) {
  static const char fn[] = "fh_context_check";
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
#ifdef FH_HAVE_CUDA
  if (ctx->backend == FH_BACKEND_CUDA) return fh_cuda_check(ctx->cuda, ctx->stream);
#endif
  return FH_SUCCESS;
}
