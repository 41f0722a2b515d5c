/* Argument validation at the API boundary. Kernels and the reference trust what passes here. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "dtype.h"
#include "fh_internal.h"
#include "ref/ref_common.h"

fh_status_t fh_check_context(const char* fn, const fh_context_t* ctx) {
  if (!ctx) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "ctx is NULL");
  if ((int)ctx->backend < 0 || ctx->backend >= FH_BACKEND_COUNT)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "ctx is not a valid context");
  fh_ref_set_threads(ctx->num_threads); /* every call checks its context first */
  return FH_SUCCESS;
}

fh_status_t fh_check_options(const char* fn, const char* name, const void* opts, size_t struct_size,
                             size_t min_size) {
  if (!opts) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is NULL", name);
  if (struct_size < min_size)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn,
                        "%s->struct_size is %zu (at least %zu; call the *_options_init function)",
                        name, struct_size, min_size);
  return FH_SUCCESS;
}

fh_status_t fh_check_enum(const char* fn, const char* name, int v, int count) {
  if (v < 0 || v >= count)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is %d (must be in [0, %d))", name, v, count);
  return FH_SUCCESS;
}

fh_status_t fh_check_tensor(const char* fn, const char* name, const fh_tensor_t* t, int64_t rows,
                            int64_t cols, fh_dtype_t want_dtype) {
  if (!t) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is NULL", name);
  if ((int)t->dtype < 0 || t->dtype >= FH_DTYPE_COUNT)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn,
                        "%s->dtype is %d (not a dtype: FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16 or FH_DTYPE_F64)",
                        name, (int)t->dtype);
  if ((int)want_dtype >= 0 && want_dtype < FH_DTYPE_COUNT && t->dtype != want_dtype)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s->dtype is %s (must be %s, the dtype of the other inputs)",
                        name, fh_dtype_name(t->dtype), fh_dtype_name(want_dtype));
  if (t->rows < 0) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s->rows is %lld (negative)", name, (long long)t->rows);
  if (t->cols < 0) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s->cols is %lld (negative)", name, (long long)t->cols);
  if (rows >= 0 && t->rows != rows)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s->rows is %lld (expected %lld)", name,
                        (long long)t->rows, (long long)rows);
  if (cols >= 0 && t->cols != cols)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s->cols is %lld (expected %lld)", name,
                        (long long)t->cols, (long long)cols);
  if (t->row_stride < t->cols)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s->row_stride is %lld (smaller than cols %lld)", name,
                        (long long)t->row_stride, (long long)t->cols);
  /* The last element's offset must fit int64 with room to spare (index math is 64-bit). */
  if (t->rows > 0 && t->row_stride > 0 && t->rows > (INT64_MAX / 4) / t->row_stride)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is too large (rows * row_stride overflows)", name);
  if (!t->data && t->rows > 0 && t->cols > 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s->data is NULL", name);
  return FH_SUCCESS;
}

fh_status_t fh_check_ptr(const char* fn, const char* name, const void* p, int64_t n) {
  if (!p && n > 0) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is NULL", name);
  return FH_SUCCESS;
}

fh_status_t fh_check_targets_host(const char* fn, const int64_t* targets, int64_t n, int64_t V,
                                  int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t y = targets[i];
    if (y == ignore_index) continue;
    if (y < 0 || y >= V)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn,
                          "targets[%lld] is %lld (must be in [0, %lld) or ignore_index %lld)",
                          (long long)i, (long long)y, (long long)V, (long long)ignore_index);
  }
  return FH_SUCCESS;
}

fh_status_t fh_check_weights_host_any(const char* fn, const char* name, const void* w, int64_t n, int f64) {
  if (!w) return FH_SUCCESS;
  for (int64_t i = 0; i < n; ++i) {
    double v = f64 ? ((const double*)w)[i] : (double)((const float*)w)[i];
    if (!(isfinite(v) && v >= 0.0))
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s[%lld] is %g (must be finite and >= 0)", name,
                          (long long)i, v);
  }
  return FH_SUCCESS;
}

fh_status_t fh_check_weights_host(const char* fn, const char* name, const float* w, int64_t n) {
  return fh_check_weights_host_any(fn, name, w, n, 0);
}

fh_status_t fh_check_backend_dtype(const char* fn, const char* name, const fh_context_t* ctx, fh_dtype_t dtype) {
  if (ctx->backend == FH_BACKEND_CUDA && dtype == FH_DTYPE_F64)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn, "%s is fp64, which only the CPU backend computes", name);
  return FH_SUCCESS;
}

fh_status_t fh_check_float_range(const char* fn, const char* name, double v, double lo, double hi) {
  if (!(isfinite(v) && v >= lo && v <= hi))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is %g (must be finite and in [%g, %g])", name, v, lo,
                        hi);
  return FH_SUCCESS;
}

fh_status_t fh_check_workspace(const char* fn, const void* ws, size_t bytes, size_t need) {
  if (bytes < need)
    return fh_set_error(FH_ERR_INSUFFICIENT_WORKSPACE, fn, "workspace_bytes is %zu (need %zu)", bytes, need);
  /* One rule on every backend, whatever this backend needs (fusedhead.h): a non-empty
   * workspace is a valid, aligned pointer. Kernels carve it at 256-byte offsets from its base and
   * keep fp64 values there: a misaligned base would fault on the GPU (and poison the CUDA
   * context), and code tested on the CPU backend must not break when moved to CUDA. */
  if (bytes > 0 && !ws)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "workspace is NULL with workspace_bytes %zu (pass NULL, 0 or a "
                        "valid buffer)", bytes);
  if (bytes > 0 && (uintptr_t)ws % FH_WORKSPACE_ALIGNMENT != 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "workspace %p is not %d-byte aligned (FH_WORKSPACE_ALIGNMENT)",
                        ws, FH_WORKSPACE_ALIGNMENT);
  return FH_SUCCESS;
}

fh_status_t fh_check_grad_tensor(const char* fn, const char* name, const fh_tensor_t* g, const fh_tensor_t* like,
                                 const fh_tensor_t* const* inputs, int n_inputs) {
  if (!g || !g->data) return FH_SUCCESS;
  if (!like) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "grads->%s is given but there is no bias", name);
  char full[32];
  snprintf(full, sizeof full, "grads->%s", name);
  FH_TRY(fh_check_tensor(fn, full, g, like->rows, like->cols, like->dtype));
  for (int i = 0; i < n_inputs; ++i)
    if (inputs[i] && inputs[i]->data == g->data)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "grads->%s aliases an input", name);
  return FH_SUCCESS;
}

fh_status_t fh_check_reduced_ptr(const char* fn, const char* name, const void* p, fh_reduction_t reduction,
                                 int64_t n) {
  /* [n] for none (NULL is fine when n == 0, as an empty framework tensor's data pointer), [1]
   * otherwise. */
  return fh_check_ptr(fn, name, p, reduction == FH_REDUCTION_NONE ? n : 1);
}
