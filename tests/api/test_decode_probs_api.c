/* Validation of fh_decode_from_probs, fh_decode_renorm_probs, fh_decode_mask_logits,
 * fh_filter_workspace_size and fh_spec_accept: every user error returns the documented status
 * with a message naming the function and the argument; B = 0 succeeds; CUDA has no kernels yet. */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "fusedhead.h"

#define NB 2
#define NV 4

typedef struct fx {
  fh_context_t* ctx;
  float p[NB * NV];
  float o[NB * NV];
  fh_tensor_t t, ot;
  fh_filter_options_t f;
  int64_t tok[NB];
  fh_decode_outputs_t out;
} fx_t;

static void fx_init(fx_t* x) {
  memset(x, 0, sizeof *x);
  cr_assert_eq(fh_context_create(&x->ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  for (int i = 0; i < NB * NV; ++i) x->p[i] = 0.25f;
  x->t = fh_tensor_2d(x->p, FH_DTYPE_F32, NB, NV);
  x->ot = fh_tensor_2d(x->o, FH_DTYPE_F32, NB, NV);
  fh_filter_options_init(&x->f);
  x->out.tokens = x->tok;
}

static void expect_msg(fh_status_t st, fh_status_t want, const char* fn, const char* needle) {
  cr_expect_eq(st, want, "status %d (%s), want %d for '%s'", (int)st, fh_last_error(), (int)want, needle);
  cr_expect(strstr(fh_last_error(), fn) == fh_last_error(), "message '%s' should start with %s", fh_last_error(), fn);
  cr_expect(strstr(fh_last_error(), needle) != NULL, "message '%s' should name '%s'", fh_last_error(), needle);
}

static void sample_err(fx_t* x, fh_status_t want, const char* needle) {
  expect_msg(fh_decode_from_probs(x->ctx, &x->f, &x->t, &x->out, NULL, NULL, 0), want, "fh_decode_from_probs: ",
             needle);
}
static void renorm_err(fx_t* x, fh_status_t want, const char* needle) {
  expect_msg(fh_decode_renorm_probs(x->ctx, &x->f, &x->t, &x->ot, NULL, NULL, 0), want, "fh_decode_renorm_probs: ",
             needle);
}

Test(api_decode_probs, defaults_and_success) {
  fx_t x;
  fx_init(&x);
  cr_expect(x.f.top_k == 0 && x.f.top_p == 1.0f && x.f.min_p == 0.0f && x.f.sum_tolerance == 1e-3f);
  cr_expect(x.f.degenerate_token == -1 && x.f.strict_rows == 0 && !x.f.indices && !x.f.indices_i32);
  fh_spec_options_t s;
  fh_spec_options_init(&s);
  cr_expect(s.struct_size == sizeof s && s.sum_tolerance == 1e-3f && s.seed == 0 && !s.offset_per_row);
  fh_filter_options_init(NULL);
  fh_spec_options_init(NULL);
  cr_expect_eq(fh_decode_from_probs(x.ctx, &x.f, &x.t, &x.out, NULL, NULL, 0), FH_SUCCESS);
  cr_expect_str_eq(fh_last_error(), "");
  cr_expect_eq(fh_decode_renorm_probs(x.ctx, &x.f, &x.t, &x.ot, NULL, NULL, 0), FH_SUCCESS);
  cr_expect_eq(fh_decode_mask_logits(x.ctx, &x.f, &x.t, &x.ot, NULL, NULL, 0), FH_SUCCESS);
  size_t bytes = 9;
  cr_expect_eq(fh_filter_workspace_size(x.ctx, &x.f, NB, NV, &bytes), FH_SUCCESS);
  cr_expect_eq(bytes, 0);
  /* B = 0: nothing read or written */
  fh_tensor_t empty = fh_tensor_2d(NULL, FH_DTYPE_F32, 0, NV);
  fh_decode_outputs_t none;
  memset(&none, 0, sizeof none);
  cr_expect_eq(fh_decode_from_probs(x.ctx, &x.f, &empty, &none, NULL, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_context_destroy(x.ctx);
}

Test(api_decode_probs, null_and_shapes) {
  fx_t x;
  fx_init(&x);
  expect_msg(fh_decode_from_probs(NULL, &x.f, &x.t, &x.out, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT,
             "fh_decode_from_probs: ", "ctx is NULL");
  expect_msg(fh_decode_from_probs(x.ctx, NULL, &x.t, &x.out, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT,
             "fh_decode_from_probs: ", "opts is NULL");
  expect_msg(fh_decode_from_probs(x.ctx, &x.f, NULL, &x.out, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT,
             "fh_decode_from_probs: ", "probs is NULL");
  expect_msg(fh_decode_from_probs(x.ctx, &x.f, &x.t, NULL, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT,
             "fh_decode_from_probs: ", "out is NULL");
  x.out.tokens = NULL;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "out->tokens and tokens_i32 are both NULL");
  int32_t t32[NB];
  cr_expect_eq(fh_decode_from_probs(x.ctx, &x.f, &x.t, &x.out, t32, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  x.out.tokens = x.tok;
  x.t.dtype = FH_DTYPE_BF16;
  sample_err(&x, FH_ERR_UNSUPPORTED, "probs->dtype is not fp32");
  x.t.dtype = FH_DTYPE_F32;
  x.t.cols = 0;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "V) is 0");
  x.t.cols = NV;
  x.f.num_logprobs = NV + 1;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->num_logprobs");
  x.f.num_logprobs = 0;
  x.f.degenerate_token = NV;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->degenerate_token");
  x.f.degenerate_token = -1;
  x.out.logprob = (float*)x.p;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "out->logprob aliases an input");
  x.out.logprob = NULL;
  x.out.flags = (uint32_t*)x.tok;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "out->flags aliases out->tokens");
  x.out.flags = NULL;
  /* renorm / mask outputs */
  x.ot.rows = NB + 1;
  renorm_err(&x, FH_ERR_INVALID_ARGUMENT, "out->rows");
  x.ot = fh_tensor_2d(x.o, FH_DTYPE_BF16, NB, NV);
  renorm_err(&x, FH_ERR_INVALID_ARGUMENT, "out->dtype");
  x.ot = fh_tensor_2d(x.p + 2, FH_DTYPE_F32, NB - 1, NV);
  x.f.num_indices = NB - 1;
  const int64_t one[1] = {0};
  x.f.indices = one;
  renorm_err(&x, FH_ERR_INVALID_ARGUMENT, "out overlaps the input");
  x.f.indices = NULL;
  x.ot = fh_tensor_2d(x.o, FH_DTYPE_F32, NB, NV);
  expect_msg(fh_decode_mask_logits(x.ctx, &x.f, &x.t, NULL, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT,
             "fh_decode_mask_logits: ", "out is NULL");
  fh_context_destroy(x.ctx);
}

Test(api_decode_probs, option_ranges) {
  fx_t x;
  fx_init(&x);
  x.f.struct_size = 8;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->struct_size");
  fh_filter_options_init(&x.f);
  x.f.top_p = 0.0f;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->top_p");
  x.f.top_p = 1.0f;
  x.f.min_p = 1.5f;
  renorm_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->min_p");
  x.f.min_p = 0.0f;
  x.f.sum_tolerance = -1.0f;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->sum_tolerance");
  x.f.sum_tolerance = NAN;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->sum_tolerance");
  x.f.sum_tolerance = INFINITY;
  cr_expect_eq(fh_decode_from_probs(x.ctx, &x.f, &x.t, &x.out, NULL, NULL, 0), FH_SUCCESS);
  x.f.strict_rows = 2;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->strict_rows");
  x.f.strict_rows = 0;
  x.f.num_logprobs = -1;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->num_logprobs");
  x.f.num_logprobs = 0;
  const float tp[NB] = {0.5f, 1.5f};
  x.f.top_p_per_row = tp;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->top_p_per_row[1]");
  x.f.top_p_per_row = NULL;
  const float mp[NB] = {-0.5f, 0.5f};
  x.f.min_p_per_row = mp;
  renorm_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->min_p_per_row[0]");
  x.f.min_p_per_row = NULL;
  /* indices */
  const int64_t idx[3] = {1, 0, 2};
  const int32_t idx32[3] = {1, -1, 0};
  x.f.indices = idx;
  x.f.indices_i32 = idx32;
  x.f.num_indices = 3;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "both given");
  x.f.indices_i32 = NULL;
  int64_t tok3[3];
  x.out.tokens = tok3;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->indices[2] is 2");
  x.f.indices = NULL;
  x.f.indices_i32 = idx32;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->indices_i32[1] is -1");
  x.f.num_indices = -1;
  sample_err(&x, FH_ERR_INVALID_ARGUMENT, "opts->num_indices");
  x.f.num_indices = 1;
  cr_expect_eq(fh_decode_from_probs(x.ctx, &x.f, &x.t, &x.out, NULL, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  x.f.indices_i32 = NULL;
  /* workspace: none needed, but a non-empty one must be valid */
  expect_msg(fh_decode_from_probs(x.ctx, &x.f, &x.t, &x.out, NULL, NULL, 64), FH_ERR_INVALID_ARGUMENT,
             "fh_decode_from_probs: ", "workspace is NULL");
  size_t bytes;
  expect_msg(fh_filter_workspace_size(x.ctx, &x.f, -1, NV, &bytes), FH_ERR_INVALID_ARGUMENT,
             "fh_filter_workspace_size: ", "must be >= 0");
  expect_msg(fh_filter_workspace_size(x.ctx, &x.f, 1, NV, NULL), FH_ERR_INVALID_ARGUMENT,
             "fh_filter_workspace_size: ", "bytes is NULL");
  fh_context_destroy(x.ctx);
}

/* fh_spec_accept: shapes, K, draft ids, options, aliasing. */
Test(api_spec_accept, validation) {
  fh_context_t* ctx;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  enum { B = 2, K = 2, V = 3 };
  float pd[B * K * V], pt[B * (K + 1) * V];
  for (int i = 0; i < B * K * V; ++i) pd[i] = 1.0f / 3;
  for (int i = 0; i < B * (K + 1) * V; ++i) pt[i] = 1.0f / 3;
  int64_t d[B * K] = {0, 1, 2, 0}, tok[B * (K + 1)], acc[B], emi[B];
  fh_tensor_t td = fh_tensor_2d(pd, FH_DTYPE_F32, B * K, V), tt = fh_tensor_2d(pt, FH_DTYPE_F32, B * (K + 1), V);
  fh_spec_options_t o;
  fh_spec_options_init(&o);
  fh_spec_outputs_t out = {tok, acc, emi, NULL, NULL};
  const char* fn = "fh_spec_accept: ";
  cr_expect_eq(fh_spec_accept(ctx, &o, d, &td, &tt, K, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  expect_msg(fh_spec_accept(ctx, NULL, d, &td, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn, "opts is NULL");
  expect_msg(fh_spec_accept(ctx, &o, NULL, &td, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "draft_tokens is NULL");
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, -1, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn, "K is -1");
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, 4, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "target_probs->rows is 6");
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, 1, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "draft_probs->rows is 4 (must be B·K = 3)");
  expect_msg(fh_spec_accept(ctx, &o, d, &td, NULL, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "target_probs is NULL");
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, K, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn, "out is NULL");
  fh_tensor_t bad = td;
  bad.cols = V - 1;
  bad.row_stride = V;
  expect_msg(fh_spec_accept(ctx, &o, d, &bad, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "draft_probs->cols");
  bad = tt;
  bad.dtype = FH_DTYPE_F16;
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &bad, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "draft_probs->dtype");
  fh_tensor_t td16 = td;
  td16.dtype = FH_DTYPE_F16;
  expect_msg(fh_spec_accept(ctx, &o, d, &td16, &bad, K, &out, NULL, 0), FH_ERR_UNSUPPORTED, fn, "not fp32");
  d[3] = V;
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "draft_tokens[3] is 3");
  d[3] = -1;
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "draft_tokens[3] is -1");
  d[3] = 0;
  out.emitted = acc;
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "out->emitted aliases out->accepted");
  out.emitted = d;
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "out->emitted aliases draft_tokens");
  out.emitted = (int64_t*)pt;
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "out->emitted aliases an input");
  out.emitted = emi;
  out.output_tokens = NULL;
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "out->output_tokens is NULL");
  out.output_tokens = tok;
  o.sum_tolerance = -1;
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "opts->sum_tolerance");
  o.sum_tolerance = 1e-3f;
  o.strict_rows = -1;
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "opts->strict_rows");
  o.strict_rows = 0;
  o.struct_size = 4;
  expect_msg(fh_spec_accept(ctx, &o, d, &td, &tt, K, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT, fn,
             "opts->struct_size");
  fh_context_destroy(ctx);
}

/* A CUDA context: FH_ERR_UNSUPPORTED for a filtered draw (no kernel yet). */
Test(api_decode_probs, cuda_unsupported) {
  fh_context_t* ctx = NULL;
  if (fh_context_create(&ctx, FH_BACKEND_CUDA, 0) != FH_SUCCESS) {
    cr_skip_test("no CUDA backend or device");
  }
  float p[NV] = {0.25f, 0.25f, 0.25f, 0.25f};
  fh_tensor_t t = fh_tensor_2d(p, FH_DTYPE_F32, 1, NV);
  fh_filter_options_t f;
  fh_filter_options_init(&f);
  f.top_k = 2; /* a filter: no CUDA kernel yet */
  int64_t tok;
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  out.tokens = &tok;
  expect_msg(fh_decode_from_probs(ctx, &f, &t, &out, NULL, NULL, 0), FH_ERR_UNSUPPORTED, "fh_decode_from_probs: ",
             "no CUDA kernels for top-k");
  fh_context_destroy(ctx);
}
