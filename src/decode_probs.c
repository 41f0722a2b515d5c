/* Sampling from probabilities, filtered distributions and speculative acceptance: option
 * defaults, argument validation and backend dispatch for fh_decode_from_probs,
 * fh_decode_renorm_probs, fh_decode_mask_logits and fh_spec_accept. Semantics: fusedhead_decode.h
 * and docs/decoding.md ("From probabilities", "Speculative sampling"); the CPU reference is
 * src/ref/decode_probs.c and src/ref/spec.c. The CUDA backend (kernels/decode_probs.cu) runs
 * fh_spec_accept and fh_decode_from_probs with every filter off; the rest is FH_ERR_UNSUPPORTED. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "decode.h"
#include "fh_internal.h"
#ifdef FH_HAVE_CUDA
#include "cuda_backend.h"
#endif

#define FILTER_MIN_SIZE (offsetof(fh_filter_options_t, indices_i32) + sizeof(const int32_t*))
#define SPEC_MIN_SIZE (offsetof(fh_spec_options_t, offset_per_row) + sizeof(const uint64_t*))

void fh_filter_options_init(fh_filter_options_t* o) {
  if (!o) return;
  memset(o, 0, sizeof *o); /* per-row arrays and indices NULL */
  o->struct_size = sizeof *o;
  o->top_k = 0;
  o->top_p = 1.0f;
  o->min_p = 0.0f;
  o->sum_tolerance = 1e-3f;
  o->strict_rows = 0;
  o->degenerate_token = -1;
}

void fh_spec_options_init(fh_spec_options_t* o) {
  if (!o) return;
  memset(o, 0, sizeof *o);
  o->struct_size = sizeof *o;
  o->sum_tolerance = 1e-3f;
}

/* A CUDA path without kernels (docs/decoding.md, "From probabilities": what CUDA runs). */
static fh_status_t no_cuda(const char* fn, const char* what) {
  return fh_set_error(FH_ERR_UNSUPPORTED, fn, "has no CUDA kernels %s (docs/decoding.md, \"From probabilities\"); "
                      "use FH_BACKEND_CPU", what);
}

#ifdef FH_HAVE_CUDA
/* The CUDA kernel samples with every filter off and no top-n: the per-row filter arrays (device
 * memory) must be absent, so this is decided on the host without reading them. */
static int filters_off(const fh_filter_options_t* o, int64_t V) {
  return (o->top_k <= 0 || o->top_k >= V) && o->top_p == 1.0f && o->min_p == 0.0f && !o->top_k_per_row &&
         !o->top_p_per_row && !o->min_p_per_row && o->num_logprobs == 0 && !o->strict_rows;
}
#endif

static fh_status_t check_tolerance(const char* fn, const char* name, double tol) {
  if (!(tol >= 0.0))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s is %g (must be >= 0; +inf checks only sum > 0)", name, tol);
  return FH_SUCCESS;
}

static fh_status_t check_filter_options(const char* fn, const fh_filter_options_t* user, fh_filter_options_t* o) {
  FH_TRY(fh_check_options(fn, "opts", user, user ? user->struct_size : 0, FILTER_MIN_SIZE));
  fh_filter_options_init(o);
  memcpy(o, user, user->struct_size < sizeof *o ? user->struct_size : sizeof *o);
  o->struct_size = sizeof *o;
  FH_TRY(fh_decode_check_top_p(fn, "opts->top_p", o->top_p));
  FH_TRY(fh_decode_check_min_p(fn, "opts->min_p", o->min_p));
  FH_TRY(check_tolerance(fn, "opts->sum_tolerance", o->sum_tolerance));
  if (o->strict_rows != 0 && o->strict_rows != 1)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->strict_rows is %d (must be 0 or 1)", o->strict_rows);
  if (o->num_logprobs < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->num_logprobs is %lld (must be >= 0)",
                        (long long)o->num_logprobs);
  if (o->indices && o->indices_i32)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->indices and opts->indices_i32 are both given (pass one)");
  if ((o->indices || o->indices_i32) && o->num_indices < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->num_indices is %lld (must be >= 0)",
                        (long long)o->num_indices);
  return FH_SUCCESS;
}

/* The input: `name` [B_in x V] (fp32 only for probabilities); B from the indices or B_in. */
static fh_status_t check_filter_input(const char* fn, const char* name, const fh_tensor_t* in, int probs,
                                      fh_filter_problem_t* p) {
  FH_TRY(fh_check_tensor(fn, name, in, -1, -1, FH_DTYPE_COUNT));
  if (probs && in->dtype != FH_DTYPE_F32)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn, "%s->dtype is not fp32 (probabilities are read as fp32 only)", name);
  const fh_filter_options_t* o = &p->opt;
  p->in = in;
  p->V = in->cols;
  p->B = (o->indices || o->indices_i32) ? o->num_indices : in->rows;
  if (p->V == 0 && p->B > 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s->cols (V) is 0 with B > 0 (nothing to filter)", name);
  if (o->num_logprobs > p->V)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->num_logprobs is %lld (more than V = %lld)",
                        (long long)o->num_logprobs, (long long)p->V);
  if (o->degenerate_token < -1 || (o->degenerate_token >= p->V && p->B > 0))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->degenerate_token is %lld (must be -1 or in [0, %lld))",
                        (long long)o->degenerate_token, (long long)p->V);
  return FH_SUCCESS;
}

/* Host checks of the per-row arrays and the indices (CPU backend: host memory). */
static fh_status_t check_filter_rows_host(const fh_filter_problem_t* p) {
  const char* fn = p->fn;
  const fh_filter_options_t* o = &p->opt;
  char name[64];
  for (int64_t i = 0; i < p->B; ++i) {
    if (o->top_p_per_row) {
      snprintf(name, sizeof name, "opts->top_p_per_row[%lld]", (long long)i);
      FH_TRY(fh_decode_check_top_p(fn, name, o->top_p_per_row[i]));
    }
    if (o->min_p_per_row) {
      snprintf(name, sizeof name, "opts->min_p_per_row[%lld]", (long long)i);
      FH_TRY(fh_decode_check_min_p(fn, name, o->min_p_per_row[i]));
    }
    const int64_t r = fh_filter_input_row(o, i);
    if (r < 0 || r >= p->in->rows)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->%s[%lld] is %lld (must be in [0, %lld), the input rows)",
                          o->indices ? "indices" : "indices_i32", (long long)i, (long long)r, (long long)p->in->rows);
  }
  return FH_SUCCESS;
}

static int64_t elem_size(fh_dtype_t d) { return d == FH_DTYPE_F64 ? 8 : d == FH_DTYPE_F32 ? 4 : 2; }

/* An output tensor [B x V] fp32 whose bytes do not overlap the input's. */
static fh_status_t check_out_tensor(const char* fn, const fh_tensor_t* out, const fh_filter_problem_t* p) {
  FH_TRY(fh_check_tensor(fn, "out", out, p->B, p->V, FH_DTYPE_F32));
  if (p->B == 0 || p->V == 0 || p->in->rows == 0) return FH_SUCCESS;
  const char* o0 = (const char*)out->data;
  const char* o1 = o0 + ((out->rows - 1) * out->row_stride + out->cols) * 4;
  const char* i0 = (const char*)p->in->data;
  const char* i1 = i0 + ((p->in->rows - 1) * p->in->row_stride + p->in->cols) * elem_size(p->in->dtype);
  if (o0 < i1 && i0 < o1) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "out overlaps the input");
  return FH_SUCCESS;
}

fh_status_t fh_filter_workspace_size(fh_context_t* ctx, const fh_filter_options_t* opts, int64_t B, int64_t V,
                                     size_t* bytes) {
  static const char fn[] = "fh_filter_workspace_size";
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  fh_filter_options_t o;
  FH_TRY(check_filter_options(fn, opts, &o));
  if (B < 0 || V < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "B, V are %lld, %lld (must be >= 0)", (long long)B, (long long)V);
  if (!bytes) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "bytes is NULL");
  *bytes = 0; /* none on either backend (the CUDA kernels of kernels/decode_probs.cu need none) */
  return FH_SUCCESS;
}

enum { CALL_SAMPLE, CALL_RENORM, CALL_MASK };

static fh_status_t filter_call(const char* fn, int call, fh_context_t* ctx, const fh_filter_options_t* opts,
                               const fh_tensor_t* in, const fh_decode_outputs_t* out, int32_t* tok32,
                               const fh_tensor_t* tout, uint32_t* flags, void* workspace, size_t workspace_bytes) {
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  fh_filter_problem_t p;
  memset(&p, 0, sizeof p);
  p.fn = fn;
  FH_TRY(check_filter_options(fn, opts, &p.opt));
  const int probs = call != CALL_MASK;
  FH_TRY(check_filter_input(fn, probs ? "probs" : "logits", in, probs, &p));
  const fh_decode_source_t src = {in, NULL, NULL, NULL, p.B, p.V, 0};
  if (call == CALL_SAMPLE) {
    if (!out) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "out is NULL");
    if (!out->tokens && !tok32 && p.B > 0)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "out->tokens and tokens_i32 are both NULL (pass one)");
    if (tok32 && p.V > INT32_MAX)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "tokens_i32 is given but V = %lld does not fit int32",
                          (long long)p.V);
    const void* outs[11] = {out->tokens, out->logprob, out->full_logprob, out->rank, out->lse, out->entropy,
                            out->allowed_count, out->topn_ids, out->topn_logprobs, out->flags, tok32};
    static const char* const names[11] = {"out->tokens", "out->logprob", "out->full_logprob", "out->rank",
                                          "out->lse", "out->entropy", "out->allowed_count", "out->topn_ids",
                                          "out->topn_logprobs", "out->flags", "tokens_i32"};
    FH_TRY(fh_decode_check_aliasing(fn, outs, names, 11, &src));
  } else {
    FH_TRY(check_out_tensor(fn, tout, &p));
    const void* outs[2] = {tout->data, flags};
    static const char* const names[2] = {"out", "flags"};
    FH_TRY(fh_decode_check_aliasing(fn, outs, names, 2, &src));
  }
  FH_TRY(fh_check_workspace(fn, workspace, workspace_bytes, 0));
  if (ctx->backend == FH_BACKEND_CUDA) { /* before reading any device memory */
#ifdef FH_HAVE_CUDA
    if (call == CALL_SAMPLE && filters_off(&p.opt, p.V)) return fh_cuda_from_probs(ctx->cuda, ctx->stream, &p, out, tok32);
#endif
    return no_cuda(fn, call == CALL_SAMPLE ? "for top-k, top-p, min-p, top-n or strict_rows yet" : "yet");
  }
  FH_TRY(check_filter_rows_host(&p));
  if (p.B == 0) return FH_SUCCESS;
  if (probs && p.opt.strict_rows) FH_TRY(fh_ref_probs_strict(fn, "probs", in, p.B, &p.opt, p.opt.sum_tolerance));
  if (call == CALL_SAMPLE) return fh_ref_from_probs(&p, out, tok32);
  if (call == CALL_RENORM) return fh_ref_renorm_probs(&p, tout, flags);
  return fh_ref_mask_logits(&p, tout, flags);
}

fh_status_t fh_decode_from_probs(fh_context_t* ctx, const fh_filter_options_t* opts, const fh_tensor_t* probs,
                                 const fh_decode_outputs_t* out, int32_t* tokens_i32, void* workspace,
                                 size_t workspace_bytes) {
  return filter_call("fh_decode_from_probs", CALL_SAMPLE, ctx, opts, probs, out, tokens_i32, NULL, NULL, workspace,
                     workspace_bytes);
}

fh_status_t fh_decode_renorm_probs(fh_context_t* ctx, const fh_filter_options_t* opts, const fh_tensor_t* probs,
                                   const fh_tensor_t* out, uint32_t* flags, void* workspace, size_t workspace_bytes) {
  return filter_call("fh_decode_renorm_probs", CALL_RENORM, ctx, opts, probs, NULL, NULL, out, flags, workspace,
                     workspace_bytes);
}

fh_status_t fh_decode_mask_logits(fh_context_t* ctx, const fh_filter_options_t* opts, const fh_tensor_t* logits,
                                  const fh_tensor_t* out, uint32_t* flags, void* workspace, size_t workspace_bytes) {
  return filter_call("fh_decode_mask_logits", CALL_MASK, ctx, opts, logits, NULL, NULL, out, flags, workspace,
                     workspace_bytes);
}

fh_status_t fh_spec_accept(fh_context_t* ctx, const fh_spec_options_t* opts, const int64_t* draft_tokens,
                           const fh_tensor_t* draft_probs, const fh_tensor_t* target_probs, int64_t K,
                           const fh_spec_outputs_t* out, void* workspace, size_t workspace_bytes) {
  static const char fn[] = "fh_spec_accept";
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  fh_spec_problem_t p;
  memset(&p, 0, sizeof p);
  p.fn = fn;
  FH_TRY(fh_check_options(fn, "opts", opts, opts ? opts->struct_size : 0, SPEC_MIN_SIZE));
  fh_spec_options_init(&p.opt);
  memcpy(&p.opt, opts, opts->struct_size < sizeof p.opt ? opts->struct_size : sizeof p.opt);
  p.opt.struct_size = sizeof p.opt;
  FH_TRY(check_tolerance(fn, "opts->sum_tolerance", p.opt.sum_tolerance));
  if (p.opt.strict_rows != 0 && p.opt.strict_rows != 1)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->strict_rows is %d (must be 0 or 1)", p.opt.strict_rows);
  if (K < 0) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "K is %lld (must be >= 0)", (long long)K);
  FH_TRY(fh_check_tensor(fn, "target_probs", target_probs, -1, -1, FH_DTYPE_COUNT));
  FH_TRY(fh_check_tensor(fn, "draft_probs", draft_probs, -1, target_probs->cols, target_probs->dtype));
  if (target_probs->dtype != FH_DTYPE_F32)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn, "target_probs->dtype is not fp32 (probabilities are read as fp32 only)");
  if (target_probs->rows % (K + 1) != 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "target_probs->rows is %lld (must be B·(K+1), K = %lld)",
                        (long long)target_probs->rows, (long long)K);
  p.B = target_probs->rows / (K + 1);
  p.K = K;
  p.V = target_probs->cols;
  if (draft_probs->rows != p.B * K)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "draft_probs->rows is %lld (must be B·K = %lld)",
                        (long long)draft_probs->rows, (long long)(p.B * K));
  if (p.V == 0 && p.B > 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "target_probs->cols (V) is 0 with B > 0");
  FH_TRY(fh_check_ptr(fn, "draft_tokens", draft_tokens, p.B * K));
  if (!out) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "out is NULL");
  FH_TRY(fh_check_ptr(fn, "out->output_tokens", out->output_tokens, p.B));
  p.draft = draft_tokens;
  p.pd = draft_probs;
  p.pt = target_probs;
  const void* outs[5] = {out->output_tokens, out->accepted, out->emitted, out->accepted_independent, out->flags};
  static const char* const names[5] = {"out->output_tokens", "out->accepted", "out->emitted",
                                       "out->accepted_independent", "out->flags"};
  const fh_decode_source_t src = {target_probs, draft_probs, NULL, NULL, p.B, p.V, 0};
  FH_TRY(fh_decode_check_aliasing(fn, outs, names, 5, &src));
  for (int i = 0; i < 5; ++i)
    if (outs[i] && outs[i] == (const void*)draft_tokens)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "%s aliases draft_tokens", names[i]);
  FH_TRY(fh_check_workspace(fn, workspace, workspace_bytes, 0));
  if (ctx->backend == FH_BACKEND_CUDA) {
    if (p.opt.strict_rows) return no_cuda(fn, "for strict_rows (the rows are device memory)");
#ifdef FH_HAVE_CUDA
    return fh_cuda_spec_accept(ctx->cuda, ctx->stream, &p, out);
#else
    return no_cuda(fn, "in this build");
#endif
  }
  for (int64_t j = 0; j < p.B * K; ++j)
    if (draft_tokens[j] < 0 || draft_tokens[j] >= p.V)
      return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "draft_tokens[%lld] is %lld (must be in [0, %lld))",
                          (long long)j, (long long)draft_tokens[j], (long long)p.V);
  if (p.B == 0) return FH_SUCCESS;
  if (p.opt.strict_rows) {
    FH_TRY(fh_ref_probs_strict(fn, "draft_probs", draft_probs, draft_probs->rows, NULL, p.opt.sum_tolerance));
    FH_TRY(fh_ref_probs_strict(fn, "target_probs", target_probs, target_probs->rows, NULL, p.opt.sum_tolerance));
  }
  return fh_ref_spec_accept(&p, out);
}
