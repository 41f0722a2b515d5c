/* Vocabulary-parallel heads (fusedhead_shard.h, docs/distributed.md): argument validation and
 * dispatch. The per-shard passes are the CPU reference's own, run over the shard's classes with
 * their global ids (src/ref/linear_ce.c, src/ref/distill.c); the merges are in
 * src/ref/linear_ce.c (fh_ref_lce_finish) and src/ref/distill_shard.c. The CUDA backend has no
 * shard kernels in this version. */
#include <string.h>

#include "decode.h"
#include "distill.h"
#include "fh_internal.h"
#include "linear_ce.h"
#include "ref/decode_ref.h"
#include "ref/distill_ref.h"
#include "ref/linear_ce_ref.h"

fh_status_t fh_check_shard(const char* fn, const fh_shard_t* shard, int64_t v_local) {
  if (!shard) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "shard is NULL");
  if (shard->class_start < 0 || shard->V_local < 0 || shard->V_global < 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn,
                        "shard is {class_start %lld, V_local %lld, V_global %lld} (must be >= 0)",
                        (long long)shard->class_start, (long long)shard->V_local, (long long)shard->V_global);
  if (shard->V_local != v_local)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "shard->V_local is %lld but C has %lld rows",
                        (long long)shard->V_local, (long long)v_local);
  if (shard->class_start > shard->V_global - shard->V_local)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn,
                        "shard classes [%lld, %lld) lie outside [0, V_global = %lld)", (long long)shard->class_start,
                        (long long)(shard->class_start + shard->V_local), (long long)shard->V_global);
  return FH_SUCCESS;
}

fh_status_t fh_shard_unsupported(const char* fn) {
  return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                      "vocabulary shards run on FH_BACKEND_CPU only in fusedhead %s (no CUDA shard kernels yet)",
                      fh_version());
}

/* The arguments every merge step checks: the context (CPU), nranks >= 1 and the gathered buffer. */
static fh_status_t check_merge(const char* fn, fh_context_t* ctx, int64_t N, int64_t nranks, const char* name,
                               const double* gathered) {
  FH_TRY(fh_check_context(fn, ctx));
  if (N < 0) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "N is %lld (must be >= 0)", (long long)N);
  if (nranks < 1) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "nranks is %lld (must be >= 1)", (long long)nranks);
  FH_TRY(fh_check_ptr(fn, name, gathered, N));
  if (ctx->backend != FH_BACKEND_CPU) return fh_shard_unsupported(fn);
  return FH_SUCCESS;
}

/* ---- linear cross-entropy ---- */

fh_status_t fh_linear_ce_shard_forward(fh_context_t* ctx, const fh_linear_ce_options_t* opts, const fh_shard_t* shard,
                                       const fh_tensor_t* E, const fh_tensor_t* C, const fh_tensor_t* bias,
                                       const int64_t* targets, const float* class_weights,
                                       const float* token_weights, double* partials) {
  static const char fn[] = "fh_linear_ce_shard_forward";
  fh_clear_error();
  fh_lce_problem_t p;
  if (!shard) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "shard is NULL");
  FH_TRY(fh_lce_check_problem(fn, ctx, opts, shard, E, C, bias, targets, class_weights, token_weights, &p));
  FH_TRY(fh_check_ptr(fn, "partials", partials, p.N));
  if (ctx->backend != FH_BACKEND_CPU) return fh_shard_unsupported(fn);
  return fh_ref_lce_partials(&p, partials);
}

fh_status_t fh_linear_ce_shard_combine(fh_context_t* ctx, const fh_linear_ce_options_t* opts, fh_dtype_t dtype,
                                       int64_t N, int64_t V_global, int64_t nranks, const double* gathered,
                                       const int64_t* targets, const float* class_weights,
                                       const float* token_weights, const fh_linear_ce_outputs_t* out) {
  static const char fn[] = "fh_linear_ce_shard_combine";
  fh_clear_error();
  fh_lce_problem_t p;
  memset(&p, 0, sizeof p);
  FH_TRY(check_merge(fn, ctx, N, nranks, "gathered", gathered));
  FH_TRY(fh_lce_check_options(fn, opts, &p.opt));
  FH_TRY(fh_check_enum(fn, "dtype", (int)dtype, FH_DTYPE_COUNT));
  if (V_global < 0 || (V_global == 0 && N > 0))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "V_global is %lld (must be >= 1 when N > 0)",
                        (long long)V_global);
  FH_TRY(fh_check_ptr(fn, "targets", targets, N));
  FH_TRY(fh_check_targets_host(fn, targets, N, V_global, p.opt.ignore_index));
  const int f64 = dtype == FH_DTYPE_F64;
  FH_TRY(fh_check_weights_host_any(fn, "class_weights", class_weights, V_global, f64));
  FH_TRY(fh_check_weights_host_any(fn, "token_weights", token_weights, N, f64));
  if (!out) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "out is NULL");
  FH_TRY(fh_check_reduced_ptr(fn, "out->loss", out->loss, p.opt.reduction, N));
  p.N = N;
  p.V = p.V_total = V_global;
  p.dtype = dtype;
  p.targets = targets;
  p.class_weights = class_weights;
  p.token_weights = token_weights;
  return fh_ref_lce_forward_out(&p, nranks, gathered, out);
}

fh_status_t fh_linear_ce_shard_backward(fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                        const fh_shard_t* shard, const fh_tensor_t* E, const fh_tensor_t* C,
                                        const fh_tensor_t* bias, const int64_t* targets, const float* class_weights,
                                        const float* token_weights, int64_t nranks, const double* gathered,
                                        const fh_linear_ce_grad_inputs_t* in, const fh_linear_ce_grads_t* grads) {
  static const char fn[] = "fh_linear_ce_shard_backward";
  fh_clear_error();
  if (!shard) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "shard is NULL");
  return fh_lce_backward_impl(fn, ctx, opts, shard, nranks, gathered, E, C, bias, targets, class_weights,
                              token_weights, in, grads, NULL, 0);
}

/* ---- distillation ---- */

/* The checks of steps 1 and 2: a dense teacher on a shard, CPU backend. */
static fh_status_t distill_problem(const char* fn, fh_context_t* ctx, const fh_distill_options_t* opts,
                                   const fh_shard_t* shard, const fh_distill_head_t* student,
                                   const fh_distill_head_t* teacher, const int64_t* targets, fh_distill_problem_t* p) {
  if (!shard) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "shard is NULL");
  if (!teacher) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher is NULL");
  FH_TRY(fh_distill_check_problem(fn, ctx, opts, shard, student, teacher, NULL, targets, p));
  if (ctx->backend != FH_BACKEND_CPU) return fh_shard_unsupported(fn);
  return FH_SUCCESS;
}

fh_status_t fh_distill_shard_stats(fh_context_t* ctx, const fh_distill_options_t* opts, const fh_shard_t* shard,
                                   const fh_distill_head_t* student, const fh_distill_head_t* teacher,
                                   const int64_t* targets, double* stats) {
  static const char fn[] = "fh_distill_shard_stats";
  fh_clear_error();
  fh_distill_problem_t p;
  FH_TRY(distill_problem(fn, ctx, opts, shard, student, teacher, targets, &p));
  FH_TRY(fh_check_ptr(fn, "stats", stats, p.N));
  return fh_ref_distill_shard_stats(&p, stats);
}

fh_status_t fh_distill_shard_divergence(fh_context_t* ctx, const fh_distill_options_t* opts, const fh_shard_t* shard,
                                        const fh_distill_head_t* student, const fh_distill_head_t* teacher,
                                        const int64_t* targets, int64_t nranks, const double* gathered_stats,
                                        double* div) {
  static const char fn[] = "fh_distill_shard_divergence";
  fh_clear_error();
  fh_distill_problem_t p;
  FH_TRY(distill_problem(fn, ctx, opts, shard, student, teacher, targets, &p));
  FH_TRY(check_merge(fn, ctx, p.N, nranks, "gathered_stats", gathered_stats));
  FH_TRY(fh_check_ptr(fn, "div", div, p.N));
  return fh_ref_distill_shard_div(&p, nranks, gathered_stats, div);
}

fh_status_t fh_distill_shard_combine(fh_context_t* ctx, const fh_distill_options_t* opts, fh_dtype_t dtype, int64_t N,
                                     int64_t nranks, const double* gathered_stats, const double* gathered_div,
                                     const int64_t* targets, const fh_distill_outputs_t* out) {
  static const char fn[] = "fh_distill_shard_combine";
  fh_clear_error();
  fh_distill_problem_t p;
  memset(&p, 0, sizeof p);
  p.fn = fn;
  FH_TRY(check_merge(fn, ctx, N, nranks, "gathered_stats", gathered_stats));
  FH_TRY(fh_check_ptr(fn, "gathered_div", gathered_div, N));
  FH_TRY(fh_distill_check_options(fn, opts, &p.opt));
  FH_TRY(fh_check_enum(fn, "dtype", (int)dtype, FH_DTYPE_COUNT));
  if (p.opt.hard_weight != 0.0f && !targets && N > 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "targets is NULL but opts->hard_weight is %g (needs targets)",
                        (double)p.opt.hard_weight);
  if (!out) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "out is NULL");
  FH_TRY(fh_check_reduced_ptr(fn, "out->loss", out->loss, p.opt.reduction, N));
  /* The merge reads no head; Es carries the dtype (whether the float outputs hold doubles). */
  fh_tensor_t es = fh_tensor_2d(NULL, dtype, N, 0);
  p.N = N;
  p.Es = &es;
  p.targets = targets;
  return fh_ref_distill_shard_combine(&p, nranks, gathered_stats, gathered_div, out);
}

fh_status_t fh_distill_shard_backward(fh_context_t* ctx, const fh_distill_options_t* opts, const fh_shard_t* shard,
                                      const fh_distill_head_t* student, const fh_distill_head_t* teacher,
                                      const int64_t* targets, int64_t nranks, const double* gathered_stats,
                                      const double* gathered_div, const fh_distill_grad_inputs_t* in,
                                      const fh_distill_grads_t* grads) {
  static const char fn[] = "fh_distill_shard_backward";
  fh_clear_error();
  if (!shard) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "shard is NULL");
  if (!teacher) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "teacher is NULL");
  return fh_distill_backward_impl(fn, ctx, opts, shard, nranks, gathered_stats, gathered_div, student, teacher, NULL,
                                  targets, in, grads, NULL, 0);
}

/* ---- decoding ---- */

/* Step 1 of decoding from the logits [B x V_local] (fused == 0) or the head (fused == 1). */
static fh_status_t decode_candidates(const char* fn, fh_context_t* ctx, const fh_decode_options_t* opts,
                                     const fh_shard_t* shard, const fh_tensor_t* logits, const fh_tensor_t* H,
                                     const fh_tensor_t* C, const fh_tensor_t* bias, int fused, int64_t K,
                                     double* partials) {
  fh_clear_error();
  FH_TRY(fh_check_context(fn, ctx));
  if (!shard) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "shard is NULL");
  fh_decode_problem_t p;
  memset(&p, 0, sizeof p);
  p.fn = fn;
  if (fused) {
    FH_TRY(fh_check_tensor(fn, "H", H, -1, -1, FH_DTYPE_COUNT));
    FH_TRY(fh_check_tensor(fn, "C", C, -1, H->cols, H->dtype));
    if (bias) FH_TRY(fh_check_tensor(fn, "bias", bias, 1, C->rows, H->dtype));
    p.src.H = H, p.src.C = C, p.src.bias = bias;
    p.src.B = H->rows, p.src.V = C->rows, p.src.D = H->cols;
  } else {
    FH_TRY(fh_check_tensor(fn, "logits", logits, -1, -1, FH_DTYPE_COUNT));
    p.src.logits = logits;
    p.src.B = logits->rows, p.src.V = logits->cols;
  }
  FH_TRY(fh_check_shard(fn, shard, p.src.V));
  if (K < 1) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "K is %lld (must be >= 1)", (long long)K);
  if (shard->V_global == 0 && p.src.B > 0)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "shard->V_global is 0 with B > 0 (nothing to decode)");
  FH_TRY(fh_check_ptr(fn, "partials", partials, p.src.B));
  if (ctx->backend != FH_BACKEND_CPU) return fh_shard_unsupported(fn);
  FH_TRY(fh_decode_check_options_host(fn, opts, p.src.B, shard->V_global, &p.opt));
  return fh_ref_decode_shard_candidates(&p, shard->class_start, K, partials);
}

fh_status_t fh_decode_shard_candidates(fh_context_t* ctx, const fh_decode_options_t* opts, const fh_shard_t* shard,
                                       const fh_tensor_t* H, const fh_tensor_t* C, const fh_tensor_t* bias, int64_t K,
                                       double* partials) {
  return decode_candidates("fh_decode_shard_candidates", ctx, opts, shard, NULL, H, C, bias, 1, K, partials);
}

fh_status_t fh_decode_shard_candidates_from_logits(fh_context_t* ctx, const fh_decode_options_t* opts,
                                                   const fh_shard_t* shard, const fh_tensor_t* logits, int64_t K,
                                                   double* partials) {
  return decode_candidates("fh_decode_shard_candidates_from_logits", ctx, opts, shard, logits, NULL, NULL, NULL, 0,
                           K, partials);
}

fh_status_t fh_decode_shard_combine(fh_context_t* ctx, const fh_decode_options_t* opts, int64_t B, int64_t V_global,
                                    int64_t nranks, int64_t K, const double* gathered, const fh_decode_outputs_t* out) {
  static const char fn[] = "fh_decode_shard_combine";
  fh_clear_error();
  FH_TRY(check_merge(fn, ctx, B, nranks, "gathered", gathered));
  if (K < 1) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "K is %lld (must be >= 1)", (long long)K);
  if (V_global < 0 || (V_global == 0 && B > 0))
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "V_global is %lld (must be >= 1 when B > 0)",
                        (long long)V_global);
  fh_decode_options_t o;
  FH_TRY(fh_decode_check_options_host(fn, opts, B, V_global, &o));
  if (o.num_logprobs > K)
    return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "opts->num_logprobs is %lld (more than K = %lld candidates)",
                        (long long)o.num_logprobs, (long long)K);
  if (!out) return fh_set_error(FH_ERR_INVALID_ARGUMENT, fn, "out is NULL");
  FH_TRY(fh_check_ptr(fn, "out->tokens", out->tokens, B));
  if (out->rank)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn, "out->rank is not available on a shard (pass NULL)");
  return fh_ref_decode_shard_combine(fn, &o, B, V_global, nranks, K, gathered, out);
}
