/* Decoding: option defaults, argument validation and backend dispatch for fh_decode_* and
 * fh_topk_*. The semantics are documented in fusedhead.h; the CPU reference is src/ref/decode*.c.
 * The CUDA backend runs top-k (kernels/topk.cu), decoding from logits (kernels/decode.cu) and
 * fused decoding (kernels/decode_fused.cu). */
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "decode.h"
#include "fh_internal.h"
#ifdef FH_HAVE_CUDA
#include "cuda_backend.h"
#endif

/* The size of the first published fh_decode_options_t; later fields keep their defaults when an
 * older caller passes a smaller struct. */
#define FH_DECODE_OPTIONS_MIN_SIZE (offsetof(fh_decode_options_t, banned_count) + sizeof(const int64_t*))

void fh_decode_options_init(fh_decode_options_t* o) {
  if (!o) return;
  memset(o, 0, sizeof *o); /* every per-row array NULL, bias and bans off */
  o->struct_size = sizeof *o;
  o->sampler = FH_DECODE_STANDARD;
  o->temperature = 1.0f;
  o->top_k = 0;
  o->top_p = 1.0f;
  o->min_p = 0.0f;
  o->top_n_sigma = 1.0f;
  o->epsilon = 3e-4f;
  o->top_h_alpha = 0.4f;
  o->top_h_candidates = 100;
  o->bregman_lambda = 0.1f;
  o->bregman_alpha = 1.0f;
  o->seed = 0;
  o->offset = 0;
  o->num_logprobs = 0;
  o->degenerate_token = -1;
  o->top_k_top_p_order = FH_DECODE_TOP_K_FIRST;
}

/* A CUDA context in a build without the CUDA backend (every CUDA path returns before this). */
static fh_status_t cuda_unavailable(const char* fn) {
  return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                      "decoding has no CUDA kernels in this build of fusedhead %s; use FH_BACKEND_CPU", fh_version());
}

/* Ranges shared by the scalar options and the per-row arrays. `name` names the argument. */
static fh_status_t check_temperature(const char* fn, const char* name, double t) {
  if (!(t >= 0.0) || isinf(t))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is %g (must be finite and >= 0; 0 is greedy)", name, t);
  return FH_SUCCESS;
}
fh_status_t fh_decode_check_top_p(const char* fn, const char* name, double v) {
  if (!(v > 0.0 && v <= 1.0))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is %g (must be in (0, 1]; 1 is off)", name, v);
  return FH_SUCCESS;
}
static fh_status_t check_epsilon(const char* fn, const char* name, double v) {
  if (!(v >= 0.0 && v < 1.0))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is %g (must be in [0, 1); 0 is off)", name, v);
  return FH_SUCCESS;
}
static fh_status_t check_top_h_alpha(const char* fn, const char* name, double v) {
  if (!(v > 0.0 && v <= 1.0))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is %g (must be in (0, 1])", name, v);
  return FH_SUCCESS;
}

static fh_status_t check_options(const char* fn, const fh_decode_options_t* user, fh_decode_options_t* o) {
  FH_TRY(fh_check_options(fn, "opts", user, user ? user->struct_size : 0, FH_DECODE_OPTIONS_MIN_SIZE));
  fh_decode_options_init(o);
  memcpy(o, user, user->struct_size < sizeof *o ? user->struct_size : sizeof *o);
  o->struct_size = sizeof *o;
  FH_TRY(fh_check_enum(fn, "opts->sampler", (int)o->sampler, FH_DECODE_SAMPLER_COUNT));
  if ((int)o->top_k_top_p_order < 0 || (int)o->top_k_top_p_order >= (int)FH_DECODE_TOP_K_TOP_P_ORDER_COUNT)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn,
                        "opts->top_k_top_p_order is %d (must be FH_DECODE_TOP_K_FIRST = 0 or "
                        "FH_DECODE_TOP_K_TOP_P_JOINT = 1)",
                        (int)o->top_k_top_p_order);
  FH_TRY(check_temperature(fn, "opts->temperature", o->temperature));
  FH_TRY(fh_decode_check_top_p(fn, "opts->top_p", o->top_p));
  FH_TRY(fh_check_float_range(fn, "opts->min_p", o->min_p, 0.0, 1.0));
  FH_TRY(fh_check_float_range(fn, "opts->top_n_sigma", o->top_n_sigma, -INFINITY, INFINITY));
  FH_TRY(check_epsilon(fn, "opts->epsilon", o->epsilon));
  FH_TRY(check_top_h_alpha(fn, "opts->top_h_alpha", o->top_h_alpha));
  if (o->top_h_candidates < 1)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->top_h_candidates is %lld (must be >= 1)",
                        (long long)o->top_h_candidates);
  FH_TRY(fh_check_float_range(fn, "opts->bregman_lambda", o->bregman_lambda, 0.0, INFINITY));
  if (!(o->bregman_alpha > 0.0f) || isinf(o->bregman_alpha))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->bregman_alpha is %g (must be finite and > 0)",
                        (double)o->bregman_alpha);
  if (o->num_logprobs < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->num_logprobs is %lld (must be >= 0)",
                        (long long)o->num_logprobs);
  if (o->bias_width < 0 || o->banned_width < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->%s is negative",
                        o->bias_width < 0 ? "bias_width" : "banned_width");
  return FH_SUCCESS;
}

/* Checks that need B and V (pointers of the sparse lists, sizes tied to V). */
static fh_status_t check_options_shape(const char* fn, const fh_decode_options_t* o, int64_t B, int64_t V) {
  if (o->num_logprobs > V)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->num_logprobs is %lld (more than V = %lld)",
                        (long long)o->num_logprobs, (long long)V);
  if (o->degenerate_token < -1 || (o->degenerate_token >= V && B > 0))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->degenerate_token is %lld (must be -1 or in [0, %lld))",
                        (long long)o->degenerate_token, (long long)V);
  if (o->bias_width > 0) {
    FH_TRY(fh_check_ptr(fn, "opts->bias_ids", o->bias_ids, B));
    FH_TRY(fh_check_ptr(fn, "opts->bias_values", o->bias_values, B));
    FH_TRY(fh_check_ptr(fn, "opts->bias_count", o->bias_count, B));
  }
  if (o->banned_width > 0) {
    FH_TRY(fh_check_ptr(fn, "opts->banned_ids", o->banned_ids, B));
    FH_TRY(fh_check_ptr(fn, "opts->banned_count", o->banned_count, B));
  }
  return FH_SUCCESS;
}

/* A sparse id list [B x width] with counts: counts in [0, width], ids in [0, V). */
static fh_status_t check_id_lists(const char* fn, const char* what, const int64_t* ids, const int64_t* count,
                                  int64_t width, int64_t B, int64_t V) {
  for (int64_t b = 0; b < B; ++b) {
    if (count[b] < 0 || count[b] > width)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->%s_count[%lld] is %lld (must be in [0, %lld])", what,
                          (long long)b, (long long)count[b], (long long)width);
    for (int64_t i = 0; i < count[b]; ++i) {
      const int64_t id = ids[b * width + i];
      if (id < 0 || id >= V)
        return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->%s_ids[%lld] (row %lld) is %lld (must be in [0, %lld))",
                            what, (long long)(b * width + i), (long long)b, (long long)id, (long long)V);
    }
  }
  return FH_SUCCESS;
}

#define CHECK_ROWS(arr, check)                                          \
  if (o->arr) {                                                         \
    for (int64_t b = 0; b < B; ++b) {                                   \
      snprintf(name, sizeof name, "opts->" #arr "[%lld]", (long long)b); \
      FH_TRY(check(fn, name, (double)o->arr[b]));                       \
    }                                                                   \
  }

fh_status_t fh_decode_check_min_p(const char* fn, const char* name, double v) {
  return fh_check_float_range(fn, name, v, 0.0, 1.0);
}
static fh_status_t check_finite(const char* fn, const char* name, double v) {
  return fh_check_float_range(fn, name, v, -INFINITY, INFINITY);
}
static fh_status_t check_lambda(const char* fn, const char* name, double v) {
  return fh_check_float_range(fn, name, v, 0.0, INFINITY);
}

/* Host-side checks of the per-row arrays and sparse lists (CPU backend: host memory). */
static fh_status_t check_rows_host(const char* fn, const fh_decode_options_t* o, int64_t B, int64_t V) {
  char name[64];
  CHECK_ROWS(temperature_per_row, check_temperature)
  CHECK_ROWS(top_p_per_row, fh_decode_check_top_p)
  CHECK_ROWS(min_p_per_row, fh_decode_check_min_p)
  CHECK_ROWS(top_n_sigma_per_row, check_finite)
  CHECK_ROWS(epsilon_per_row, check_epsilon)
  CHECK_ROWS(top_h_alpha_per_row, check_top_h_alpha)
  CHECK_ROWS(bregman_lambda_per_row, check_lambda)
  if (o->bias_width > 0) {
    FH_TRY(check_id_lists(fn, "bias", o->bias_ids, o->bias_count, o->bias_width, B, V));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < o->bias_count[b]; ++i) {
        snprintf(name, sizeof name, "opts->bias_values[%lld]", (long long)(b * o->bias_width + i));
        FH_TRY(check_finite(fn, name, o->bias_values[b * o->bias_width + i]));
      }
  }
  if (o->banned_width > 0) FH_TRY(check_id_lists(fn, "banned", o->banned_ids, o->banned_count, o->banned_width, B, V));
  return FH_SUCCESS;
}

/* The logits source: a logits tensor, or the head H [B x D], C [V x D], bias [1 x V]. */
static fh_status_t check_source(const char* fn, const fh_tensor_t* logits, const fh_tensor_t* H,
                                const fh_tensor_t* C, const fh_tensor_t* bias, int fused, fh_decode_source_t* s) {
  memset(s, 0, sizeof *s);
  if (!fused) {
    FH_TRY(fh_check_tensor(fn, "logits", logits, -1, -1, FH_DTYPE_COUNT));
    s->logits = logits;
    s->B = logits->rows;
    s->V = logits->cols;
    s->D = 0;
  } else {
    FH_TRY(fh_check_tensor(fn, "H", H, -1, -1, FH_DTYPE_COUNT));
    FH_TRY(fh_check_tensor(fn, "C", C, -1, H->cols, H->dtype));
    if (bias) FH_TRY(fh_check_tensor(fn, "bias", bias, 1, C->rows, H->dtype));
    s->H = H;
    s->C = C;
    s->bias = bias;
    s->B = H->rows;
    s->V = C->rows;
    s->D = H->cols;
  }
  if (s->V == 0 && s->B > 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is 0 with B > 0 (nothing to decode)",
                        fused ? "C->rows (V)" : "logits->cols (V)");
  return FH_SUCCESS;
}

/* Output pointers must be distinct from each other and from the inputs' data. */
fh_status_t fh_decode_check_aliasing(const char* fn, const void* const* outs, const char* const* names, int n,
                                     const fh_decode_source_t* s) {
  const void* ins[4] = {s->logits ? s->logits->data : NULL, s->H ? s->H->data : NULL, s->C ? s->C->data : NULL,
                        s->bias ? s->bias->data : NULL};
  for (int i = 0; i < n; ++i) {
    if (!outs[i]) continue;
    for (int j = 0; j < 4; ++j)
      if (outs[i] == ins[j]) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s aliases an input", names[i]);
    for (int j = 0; j < i; ++j)
      if (outs[i] == outs[j])
        return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s aliases %s", names[i], names[j]);
  }
  return FH_SUCCESS;
}

fh_status_t fh_decode_check_options_host(const char* fn, const fh_decode_options_t* opts, int64_t B, int64_t V,
                                        fh_decode_options_t* o) {
  FH_TRY(check_options(fn, opts, o));
  FH_TRY(check_options_shape(fn, o, B, V));
  return check_rows_host(fn, o, B, V);
}

fh_status_t fh_decode_workspace_size(fh_context_t* ctx, const fh_decode_options_t* opts, int64_t B, int64_t V,
                                     int64_t D, fh_dtype_t dtype, size_t* bytes) {
  static const char fn[] = "fh_decode_workspace_size";
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  fh_decode_options_t o;
  FH_TRY(check_options(fn, opts, &o));
  if (B < 0 || V < 0 || D < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "B, V, D are %lld, %lld, %lld (must be >= 0)", (long long)B,
                        (long long)V, (long long)D);
  FH_TRY(fh_check_enum(fn, "dtype", (int)dtype, FH_DTYPE_COUNT));
  if (!bytes) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "bytes is NULL");
  *bytes = 0;
#ifdef FH_HAVE_CUDA
  if (ctx->backend == FH_BACKEND_CUDA) {
    FH_TRY(fh_check_backend_dtype(fn, "dtype", ctx, dtype));
    if (D == 0) return fh_cuda_decode_workspace(B, V, fn, bytes);
    return fh_cuda_decode_fused_workspace(B, V, D, o.bias_width > 0 || o.banned_width > 0, fn, bytes);
  }
#endif
  if (ctx->backend == FH_BACKEND_CUDA) return cuda_unavailable(fn);
  return FH_SUCCESS;
}

static fh_status_t decode(const char* fn, fh_context_t* ctx, const fh_decode_options_t* opts, const fh_tensor_t* logits,
                          const fh_tensor_t* H, const fh_tensor_t* C, const fh_tensor_t* bias, int fused,
                          const fh_decode_outputs_t* out, void* workspace, size_t workspace_bytes) {
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  fh_decode_problem_t p;
  memset(&p, 0, sizeof p);
  p.fn = fn;
  FH_TRY(check_options(fn, opts, &p.opt));
  FH_TRY(check_source(fn, logits, H, C, bias, fused, &p.src));
  const int64_t B = p.src.B, V = p.src.V;
  FH_TRY(check_options_shape(fn, &p.opt, B, V));
  if (!out) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "out is NULL");
  FH_TRY(fh_check_ptr(fn, "out->tokens", out->tokens, B));
  const void* outs[10] = {out->tokens, out->logprob, out->full_logprob, out->rank, out->lse,
                          out->entropy, out->allowed_count, out->topn_ids, out->topn_logprobs, out->flags};
  static const char* const names[10] = {"out->tokens", "out->logprob", "out->full_logprob", "out->rank",
                                        "out->lse", "out->entropy", "out->allowed_count", "out->topn_ids",
                                        "out->topn_logprobs", "out->flags"};
  FH_TRY(fh_decode_check_aliasing(fn, outs, names, 10, &p.src));
#ifdef FH_HAVE_CUDA
  if (ctx->backend == FH_BACKEND_CUDA && !fused) {
    /* Per-row arrays and lists are device memory: the kernels check them (FH_DEVERR_DECODE_PARAM). */
    FH_TRY(fh_check_backend_dtype(fn, "logits->dtype", ctx, logits->dtype));
    size_t need = 0;
    FH_TRY(fh_cuda_decode_workspace(B, V, fn, &need));
    FH_TRY(fh_check_workspace(fn, workspace, workspace_bytes, need));
    return fh_cuda_decode(ctx->cuda, ctx->stream, &p, out, workspace);
  }
  if (ctx->backend == FH_BACKEND_CUDA) {
    FH_TRY(fh_check_backend_dtype(fn, "H->dtype", ctx, H->dtype));
    size_t need = 0;
    FH_TRY(fh_cuda_decode_fused_workspace(B, V, p.src.D, p.opt.bias_width > 0 || p.opt.banned_width > 0, fn, &need));
    FH_TRY(fh_check_workspace(fn, workspace, workspace_bytes, need));
    return fh_cuda_decode_fused(ctx->cuda, ctx->stream, &p, out, workspace);
  }
#endif
  FH_TRY(fh_check_workspace(fn, workspace, workspace_bytes, 0));
  if (ctx->backend == FH_BACKEND_CUDA) return cuda_unavailable(fn);
  FH_TRY(check_rows_host(fn, &p.opt, B, V));
  if (B == 0) return FH_SUCCESS;
  return fh_ref_decode(&p, out);
}

fh_status_t fh_decode_from_logits(fh_context_t* ctx, const fh_decode_options_t* opts, const fh_tensor_t* logits,
                                  const fh_decode_outputs_t* out, void* workspace, size_t workspace_bytes) {
  return decode("fh_decode_from_logits", ctx, opts, logits, NULL, NULL, NULL, 0, out, workspace, workspace_bytes);
}

fh_status_t fh_decode_fused(fh_context_t* ctx, const fh_decode_options_t* opts, const fh_tensor_t* H,
                            const fh_tensor_t* C, const fh_tensor_t* bias, const fh_decode_outputs_t* out,
                            void* workspace, size_t workspace_bytes) {
  return decode("fh_decode_fused", ctx, opts, NULL, H, C, bias, 1, out, workspace, workspace_bytes);
}

fh_status_t fh_topk_workspace_size(fh_context_t* ctx, int64_t B, int64_t V, int64_t D, int64_t k, fh_dtype_t dtype,
                                   size_t* bytes) {
  static const char fn[] = "fh_topk_workspace_size";
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  if (B < 0 || V < 0 || D < 0 || k < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "B, V, D, k are %lld, %lld, %lld, %lld (must be >= 0)",
                        (long long)B, (long long)V, (long long)D, (long long)k);
  FH_TRY(fh_check_enum(fn, "dtype", (int)dtype, FH_DTYPE_COUNT));
  if (!bytes) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "bytes is NULL");
  *bytes = 0;
#ifdef FH_HAVE_CUDA
  if (ctx->backend == FH_BACKEND_CUDA) {
    FH_TRY(fh_check_backend_dtype(fn, "dtype", ctx, dtype));
    *bytes = fh_cuda_topk_workspace(B, V, D, k);
  }
#else
  if (ctx->backend == FH_BACKEND_CUDA) return cuda_unavailable(fn);
#endif
  return FH_SUCCESS;
}

static fh_status_t topk(const char* fn, fh_context_t* ctx, const fh_tensor_t* logits, const fh_tensor_t* H,
                        const fh_tensor_t* C, const fh_tensor_t* bias, int fused, int64_t k, float* values,
                        int64_t* ids, void* workspace, size_t workspace_bytes) {
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  fh_decode_source_t s;
  FH_TRY(check_source(fn, logits, H, C, bias, fused, &s));
  if (k < 1 || k > s.V)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "k is %lld (must be in [1, V = %lld])", (long long)k,
                        (long long)s.V);
  FH_TRY(fh_check_ptr(fn, "values", values, s.B));
  FH_TRY(fh_check_ptr(fn, "ids", ids, s.B));
  const void* outs[2] = {values, ids};
  static const char* const names[2] = {"values", "ids"};
  FH_TRY(fh_decode_check_aliasing(fn, outs, names, 2, &s));
#ifdef FH_HAVE_CUDA
  if (ctx->backend == FH_BACKEND_CUDA) {
    FH_TRY(fh_check_backend_dtype(fn, "the inputs' dtype", ctx, s.logits ? s.logits->dtype : s.H->dtype));
    FH_TRY(fh_check_workspace(fn, workspace, workspace_bytes, fh_cuda_topk_workspace(s.B, s.V, s.D, k)));
    return fh_cuda_topk(ctx->cuda, ctx->stream, fn, s.logits, s.H, s.C, s.bias, k, values, ids, workspace);
  }
#endif
  FH_TRY(fh_check_workspace(fn, workspace, workspace_bytes, 0));
  if (ctx->backend == FH_BACKEND_CUDA) return cuda_unavailable(fn);
  if (s.B == 0) return FH_SUCCESS;
  return fh_ref_topk(fn, &s, k, values, ids);
}

fh_status_t fh_topk_from_logits(fh_context_t* ctx, const fh_tensor_t* logits, int64_t k, float* values, int64_t* ids,
                                void* workspace, size_t workspace_bytes) {
  return topk("fh_topk_from_logits", ctx, logits, NULL, NULL, NULL, 0, k, values, ids, workspace, workspace_bytes);
}

fh_status_t fh_topk_fused(fh_context_t* ctx, const fh_tensor_t* H, const fh_tensor_t* C, const fh_tensor_t* bias,
                          int64_t k, float* values, int64_t* ids, void* workspace, size_t workspace_bytes) {
  return topk("fh_topk_fused", ctx, NULL, H, C, bias, 1, k, values, ids, workspace, workspace_bytes);
}
