/* Internal helpers shared by the host C code: errors, the context, argument validation.
 * Nothing here is part of the public API. */
#ifndef FH_INTERNAL_H
#define FH_INTERNAL_H

#include <stdarg.h>
#include <stdint.h>

#include "fusedhead.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define FH_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define FH_PRINTF(a, b)
#endif

/* Record "fn: <message>" as this thread's last error and return `status`. */
fh_status_t fh_set_error(fh_status_t status, const char* fn, const char* fmt, ...) FH_PRINTF(3, 4);
/* Reset the thread's last error to "" (every public entry point does this first). */
void fh_clear_error(void);

#define FH_TRY(expr)                     \
  do {                                   \
    fh_status_t fh_try_st_ = (expr);     \
    if (fh_try_st_ != FH_SUCCESS) return fh_try_st_; \
  } while (0)

struct fh_cuda_state;

struct fh_context {
  fh_backend_t backend;
  int device;
  struct CUstream_st* stream;
  struct fh_cuda_state* cuda; /* NULL for the CPU backend */
  int num_threads;            /* CPU backend's OpenMP threads; 0: OpenMP's default */
};

/* ---- validation (each returns FH_SUCCESS or sets the error naming fn and the argument) ---- */

/* ctx non-NULL and of a known backend. */
fh_status_t fh_check_context(const char* fn, const fh_context_t* ctx);
/* An options struct pointer and its struct_size (at least `min_size`, the size of the first
 * published version of that struct). */
fh_status_t fh_check_options(const char* fn, const char* name, const void* opts, size_t struct_size,
                             size_t min_size);
/* A tensor: non-NULL, dtype in range, rows/cols >= 0 (and equal to `rows`/`cols` when those are
 * >= 0), row_stride >= cols, data non-NULL unless empty, and `dtype` equal to `want_dtype` when
 * that is < FH_DTYPE_COUNT. */
fh_status_t fh_check_tensor(const char* fn, const char* name, const fh_tensor_t* t, int64_t rows,
                            int64_t cols, fh_dtype_t want_dtype);
/* A pointer that must not be NULL when n > 0. */
fh_status_t fh_check_ptr(const char* fn, const char* name, const void* p, int64_t n);
/* Host-side range check of targets (CPU backend only: device memory cannot be read here). */
fh_status_t fh_check_targets_host(const char* fn, const int64_t* targets, int64_t n, int64_t V,
                                  int64_t ignore_index);
/* Host-side check that n weights are finite and >= 0 (CPU backend only). */
fh_status_t fh_check_weights_host(const char* fn, const char* name, const float* w, int64_t n);
/* FH_ERR_UNSUPPORTED for a dtype the context's backend cannot compute (fp64 on CUDA). */
fh_status_t fh_check_backend_dtype(const char* fn, const char* name, const fh_context_t* ctx, fh_dtype_t dtype);
/* Host-side check of n weights stored as fp32, or fp64 when `f64` (CPU backend only). */
fh_status_t fh_check_weights_host_any(const char* fn, const char* name, const void* w, int64_t n, int f64);
/* A float option that must be finite and lie in [lo, hi]. */
fh_status_t fh_check_float_range(const char* fn, const char* name, double v, double lo, double hi);
/* An enum value in [0, count). */
fh_status_t fh_check_enum(const char* fn, const char* name, int v, int count);
/* An optional gradient output (NULL or data NULL: not wanted) shaped and typed like `like` (NULL:
 * the input does not exist, e.g. no bias) and not aliasing any of the n inputs. */
fh_status_t fh_check_grad_tensor(const char* fn, const char* name, const fh_tensor_t* g, const fh_tensor_t* like,
                                 const fh_tensor_t* const* inputs, int n_inputs);
/* A loss-shaped array: [n] for FH_REDUCTION_NONE (may be NULL when n == 0), else [1]. */
fh_status_t fh_check_reduced_ptr(const char* fn, const char* name, const void* p, fh_reduction_t reduction,
                                 int64_t n);
/* A vocabulary shard (fusedhead_shard.h): non-NULL, 0 <= class_start, V_local == v_local (the
 * rows of C), class_start + V_local <= V_global. */
fh_status_t fh_check_shard(const char* fn, const fh_shard_t* shard, int64_t v_local);
/* FH_ERR_UNSUPPORTED for a shard call on a backend other than the CPU reference. */
fh_status_t fh_shard_unsupported(const char* fn);
/* Workspace: at least `need` bytes; when workspace_bytes > 0, non-NULL and
 * FH_WORKSPACE_ALIGNMENT-aligned (every backend). */
fh_status_t fh_check_workspace(const char* fn, const void* ws, size_t bytes, size_t need);

#ifdef __cplusplus
}
#endif

#endif
