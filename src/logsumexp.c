/* fh_rows_logsumexp: validation, dispatch, and its CPU reference (small enough to live here). */
#include <math.h>

#include "cuda_backend.h"
#include "dtype.h"
#include "fh_internal.h"
#include "ref/ref_common.h"

static void ref_rows_logsumexp(const fh_tensor_t* x, float* lse) {
#ifdef FH_HAVE_OPENMP
#pragma omp parallel for schedule(static) num_threads(fh_ref_threads())
#endif
  for (int64_t i = 0; i < x->rows; ++i) {
    fh_ref_softmax_stats_t st;
    fh_ref_stats_init(&st);
    int has_nan = 0, has_pinf = 0;
    for (int64_t j = 0; j < x->cols; ++j) {
      double z = fh_tensor_get(x, i, j);
      has_nan |= isnan(z);
      has_pinf |= z == INFINITY;
      fh_ref_stats_add(&st, z);
    }
    /* The documented special values: NaN wins, then +inf; all -inf (or V = 0) gives -inf. */
    lse[i] = has_nan ? NAN : has_pinf ? INFINITY : (float)fh_ref_stats_lse(&st);
  }
}

fh_status_t fh_rows_logsumexp(fh_context_t* ctx, const fh_tensor_t* logits, float* lse) {
  static const char fn[] = "fh_rows_logsumexp";
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  FH_TRY(fh_check_tensor(fn, "logits", logits, -1, -1, FH_DTYPE_COUNT));
  FH_TRY(fh_check_backend_dtype(fn, "logits->dtype", ctx, logits->dtype));
  FH_TRY(fh_check_ptr(fn, "lse", lse, logits->rows));
  if (logits->rows == 0) return FH_SUCCESS;
#ifdef FH_HAVE_CUDA
  if (ctx->backend == FH_BACKEND_CUDA) return fh_cuda_rows_logsumexp(ctx->cuda, ctx->stream, logits, lse);
#endif
  ref_rows_logsumexp(logits, lse);
  return FH_SUCCESS;
}
