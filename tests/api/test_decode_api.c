/* Validation of fh_decode_* and fh_topk_*: every user error returns FH_ERR_INVALID_ARGUMENT (or
 * the documented status) with a message naming the function and the argument; B = 0 succeeds
 * without touching outputs; the workspace queries report 0 bytes on the CPU backend. */
#include <criterion/criterion.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "fusedhead.h"

#define NB 2
#define NV 5

typedef struct fx {
  fh_context_t* ctx;
  float z[NB * NV];
  fh_tensor_t t;
  fh_decode_options_t o;
  int64_t tok[NB];
  float lp[NB];
  fh_decode_outputs_t out;
} fx_t;

static void fx_init(fx_t* f) {
  memset(f, 0, sizeof *f);
  cr_assert_eq(fh_context_create(&f->ctx, FH_BACKEND_CPU, 0), FH_SUCCESS);
  for (int i = 0; i < NB * NV; ++i) f->z[i] = (float)(i % NV);
  f->t = fh_tensor_2d(f->z, FH_DTYPE_F32, NB, NV);
  fh_decode_options_init(&f->o);
  f->out.tokens = f->tok;
  f->out.logprob = f->lp;
}

/* Run from_logits and expect `want` with a message containing both the function and `needle`. */
static void expect_err(fx_t* f, fh_status_t want, const char* needle) {
  fh_status_t st = fh_decode_from_logits(f->ctx, &f->o, &f->t, &f->out, NULL, 0);
  cr_expect_eq(st, want, "status %d (%s), want %d for '%s'", (int)st, fh_last_error(), (int)want, needle);
  cr_expect(strstr(fh_last_error(), "fh_decode_from_logits: ") == fh_last_error(), "message '%s'", fh_last_error());
  cr_expect(strstr(fh_last_error(), needle) != NULL, "message '%s' should name '%s'", fh_last_error(), needle);
}

Test(api_decode, success_and_clear_error) {
  fx_t f;
  fx_init(&f);
  cr_expect_eq(fh_decode_from_logits(f.ctx, &f.o, &f.t, &f.out, NULL, 0), FH_SUCCESS);
  cr_expect_str_eq(fh_last_error(), "");
  size_t bytes = 123;
  cr_expect_eq(fh_decode_workspace_size(f.ctx, &f.o, NB, NV, 0, FH_DTYPE_F32, &bytes), FH_SUCCESS);
  cr_expect_eq(bytes, 0);
  bytes = 7;
  cr_expect_eq(fh_topk_workspace_size(f.ctx, NB, NV, 3, 2, FH_DTYPE_BF16, &bytes), FH_SUCCESS);
  cr_expect_eq(bytes, 0);
  fh_context_destroy(f.ctx);
}

Test(api_decode, null_arguments) {
  fx_t f;
  fx_init(&f);
  cr_expect_eq(fh_decode_from_logits(NULL, &f.o, &f.t, &f.out, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "ctx is NULL"));
  cr_expect_eq(fh_decode_from_logits(f.ctx, NULL, &f.t, &f.out, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "opts is NULL"));
  cr_expect_eq(fh_decode_from_logits(f.ctx, &f.o, NULL, &f.out, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "logits is NULL"));
  cr_expect_eq(fh_decode_from_logits(f.ctx, &f.o, &f.t, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "out is NULL"));
  f.out.tokens = NULL;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "out->tokens is NULL");
  f.out.tokens = f.tok;
  f.t.data = NULL;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "logits->data is NULL");
  fh_decode_options_init(NULL); /* no crash */
  fh_context_destroy(f.ctx);
}

Test(api_decode, option_ranges) {
  fx_t f;
  fx_init(&f);
  f.o.struct_size = 8;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->struct_size");
  fh_decode_options_init(&f.o);
  f.o.sampler = FH_DECODE_SAMPLER_COUNT;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->sampler");
  fh_decode_options_init(&f.o);
  f.o.temperature = -1.0f;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->temperature");
  f.o.temperature = NAN;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->temperature");
  f.o.temperature = INFINITY;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->temperature");
  fh_decode_options_init(&f.o);
  f.o.top_p = 0.0f;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->top_p");
  f.o.top_p = 1.5f;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->top_p");
  fh_decode_options_init(&f.o);
  f.o.min_p = 1.01f;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->min_p");
  fh_decode_options_init(&f.o);
  f.o.top_n_sigma = NAN;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->top_n_sigma");
  fh_decode_options_init(&f.o);
  f.o.epsilon = 1.0f;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->epsilon");
  fh_decode_options_init(&f.o);
  f.o.top_h_alpha = 0.0f;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->top_h_alpha");
  fh_decode_options_init(&f.o);
  f.o.top_h_candidates = 0;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->top_h_candidates");
  fh_decode_options_init(&f.o);
  f.o.bregman_lambda = -0.1f;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->bregman_lambda");
  fh_decode_options_init(&f.o);
  f.o.bregman_alpha = 0.0f;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->bregman_alpha");
  fh_decode_options_init(&f.o);
  f.o.num_logprobs = NV + 1;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->num_logprobs");
  f.o.num_logprobs = -1;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->num_logprobs");
  fh_decode_options_init(&f.o);
  f.o.degenerate_token = NV;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->degenerate_token");
  f.o.degenerate_token = -2;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->degenerate_token");
  fh_context_destroy(f.ctx);
}

Test(api_decode, per_row_values_name_the_row) {
  fx_t f;
  fx_init(&f);
  const float temps[NB] = {1.0f, -2.0f}, tps[NB] = {0.5f, 0.0f}, eps[NB] = {0.1f, 2.0f};
  f.o.temperature_per_row = temps;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->temperature_per_row[1]");
  fh_decode_options_init(&f.o);
  f.o.top_p_per_row = tps;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->top_p_per_row[1]");
  fh_decode_options_init(&f.o);
  f.o.epsilon_per_row = eps;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->epsilon_per_row[1]");
  fh_context_destroy(f.ctx);
}

Test(api_decode, sparse_lists) {
  fx_t f;
  fx_init(&f);
  int64_t ids[NB * 2] = {0, 1, 2, NV}, cnt[NB] = {2, 2};
  float vals[NB * 2] = {1, 1, 1, 1};
  f.o.bias_width = 2;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->bias_ids is NULL");
  f.o.bias_ids = ids;
  f.o.bias_values = vals;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->bias_count is NULL");
  f.o.bias_count = cnt;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->bias_ids[3] (row 1) is 5");
  ids[3] = 4;
  vals[2] = INFINITY;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->bias_values[2]");
  vals[2] = 1;
  cnt[0] = 3;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->bias_count[0]");
  cnt[0] = 2;
  cr_expect_eq(fh_decode_from_logits(f.ctx, &f.o, &f.t, &f.out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  f.o.banned_width = 1;
  f.o.banned_ids = ids;
  f.o.banned_count = cnt;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->banned_count[0]");
  f.o.bias_width = -1;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "bias_width is negative");
  fh_context_destroy(f.ctx);
}

Test(api_decode, shapes_dtypes_aliasing) {
  fx_t f;
  fx_init(&f);
  f.t.dtype = FH_DTYPE_COUNT;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "logits->dtype");
  f.t = fh_tensor_2d(f.z, FH_DTYPE_F32, NB, 0);
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "logits->cols (V) is 0");
  f.t = fh_tensor_2d(f.z, FH_DTYPE_F32, NB, NV);
  f.t.row_stride = NV - 1;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "logits->row_stride");
  f.t.row_stride = NV;
  f.out.logprob = (float*)(void*)f.tok;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "out->logprob aliases out->tokens");
  f.out.logprob = f.z;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "out->logprob aliases an input");
  f.out.logprob = f.lp;
  _Alignas(FH_WORKSPACE_ALIGNMENT) char ws[16];
  cr_expect_eq(fh_decode_from_logits(f.ctx, &f.o, &f.t, &f.out, ws, sizeof ws), FH_SUCCESS); /* aligned extra is fine */
  /* fused: C's cols must match H's, dtypes must agree, bias must be 1 x V */
  float H[NB * 3] = {0}, C[NV * 3] = {0}, bias[NV] = {0};
  fh_tensor_t tH = fh_tensor_2d(H, FH_DTYPE_F32, NB, 3), tC = fh_tensor_2d(C, FH_DTYPE_F32, NV, 2);
  fh_tensor_t tb = fh_tensor_2d(bias, FH_DTYPE_F32, 1, NV);
  cr_expect_eq(fh_decode_fused(f.ctx, &f.o, &tH, &tC, &tb, &f.out, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "fh_decode_fused: C->cols"), "%s", fh_last_error());
  tC = fh_tensor_2d(C, FH_DTYPE_BF16, NV, 3);
  cr_expect_eq(fh_decode_fused(f.ctx, &f.o, &tH, &tC, &tb, &f.out, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "C->dtype"), "%s", fh_last_error());
  tC = fh_tensor_2d(C, FH_DTYPE_F32, NV, 3);
  tb = fh_tensor_2d(bias, FH_DTYPE_F32, 1, NV - 1);
  cr_expect_eq(fh_decode_fused(f.ctx, &f.o, &tH, &tC, &tb, &f.out, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "bias->cols"), "%s", fh_last_error());
  tb = fh_tensor_2d(bias, FH_DTYPE_F32, 1, NV);
  cr_expect_eq(fh_decode_fused(f.ctx, &f.o, &tH, &tC, &tb, &f.out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(fh_decode_fused(f.ctx, &f.o, &tH, &tC, NULL, &f.out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_context_destroy(f.ctx);
}

/* B = 0 is a no-op that writes nothing (tokens may be NULL); workspace queries reject negatives. */
Test(api_decode, empty_batch_and_workspace_query) {
  fx_t f;
  fx_init(&f);
  f.t = fh_tensor_2d(NULL, FH_DTYPE_F32, 0, NV);
  f.out.tokens = NULL;
  cr_expect_eq(fh_decode_from_logits(f.ctx, &f.o, &f.t, &f.out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  size_t bytes;
  cr_expect_eq(fh_decode_workspace_size(f.ctx, &f.o, -1, NV, 0, FH_DTYPE_F32, &bytes), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "fh_decode_workspace_size: B, V, D"));
  cr_expect_eq(fh_decode_workspace_size(f.ctx, &f.o, 1, NV, 0, FH_DTYPE_F32, NULL), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "bytes is NULL"));
  cr_expect_eq(fh_topk_workspace_size(f.ctx, 1, NV, 0, 1, FH_DTYPE_COUNT, &bytes), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "dtype"));
  fh_context_destroy(f.ctx);
}

Test(api_decode, topk_validation) {
  fx_t f;
  fx_init(&f);
  float val[NB * NV];
  int64_t id[NB * NV];
  cr_expect_eq(fh_topk_from_logits(f.ctx, &f.t, 0, val, id, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "fh_topk_from_logits: k is 0"), "%s", fh_last_error());
  cr_expect_eq(fh_topk_from_logits(f.ctx, &f.t, NV + 1, val, id, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "k is 6"), "%s", fh_last_error());
  cr_expect_eq(fh_topk_from_logits(f.ctx, &f.t, 2, NULL, id, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "values is NULL"), "%s", fh_last_error());
  cr_expect_eq(fh_topk_from_logits(f.ctx, &f.t, 2, val, NULL, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "ids is NULL"), "%s", fh_last_error());
  cr_expect_eq(fh_topk_from_logits(f.ctx, &f.t, 2, f.z, id, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "values aliases an input"), "%s", fh_last_error());
  cr_expect_eq(fh_topk_fused(f.ctx, NULL, NULL, NULL, 2, val, id, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "fh_topk_fused: H is NULL"), "%s", fh_last_error());
  cr_expect_eq(fh_topk_from_logits(f.ctx, &f.t, NV, val, id, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_expect(id[0] == 4 && id[4] == 0 && val[0] == 4.0f);
  fh_context_destroy(f.ctx);
}

/* The sampler added after the first release is accepted; top_k_top_p_order is range-checked
 * with a message naming its values, and a caller whose struct ends before it (an older
 * struct_size) gets the default, FH_DECODE_TOP_K_FIRST, whatever lies past its struct. */
Test(api_decode, p_less_and_top_k_top_p_order) {
  fx_t f;
  fx_init(&f);
  f.o.sampler = FH_DECODE_P_LESS;
  cr_expect_eq(fh_decode_from_logits(f.ctx, &f.o, &f.t, &f.out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_decode_options_init(&f.o);
  cr_expect_eq(f.o.top_k_top_p_order, FH_DECODE_TOP_K_FIRST);
  f.o.top_k_top_p_order = FH_DECODE_TOP_K_TOP_P_JOINT;
  f.o.top_k = 2;
  f.o.top_p = 0.5f;
  cr_expect_eq(fh_decode_from_logits(f.ctx, &f.o, &f.t, &f.out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  f.o.top_k_top_p_order = FH_DECODE_TOP_K_TOP_P_ORDER_COUNT;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->top_k_top_p_order is 2 (must be FH_DECODE_TOP_K_FIRST");
  f.o.top_k_top_p_order = (fh_decode_top_k_top_p_order_t)-1;
  expect_err(&f, FH_ERR_INVALID_ARGUMENT, "opts->top_k_top_p_order is -1");
  size_t bytes = 0;
  cr_expect_eq(fh_decode_workspace_size(f.ctx, &f.o, NB, NV, 0, FH_DTYPE_F32, &bytes), FH_ERR_INVALID_ARGUMENT);
  cr_expect(strstr(fh_last_error(), "opts->top_k_top_p_order") != NULL, "%s", fh_last_error());
  /* An older caller's struct: the bytes past its struct_size (here an out-of-range order) are
   * not read. */
  f.o.struct_size = offsetof(fh_decode_options_t, top_k_top_p_order);
  cr_expect_eq(fh_decode_from_logits(f.ctx, &f.o, &f.t, &f.out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_context_destroy(f.ctx);
}

/* The joint order changes the set where the sequential one does not: p ∝ (.30, .25, .24, .11,
 * .10), k = 3, top_p = .35 keeps 1 token sequentially and 2 jointly (docs/decoding.md). */
Test(api_decode, top_k_top_p_order_reaches_the_rule) {
  fx_t f;
  fx_init(&f);
  const double pr[NV] = {0.30, 0.25, 0.24, 0.11, 0.10};
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < NV; ++v) f.z[b * NV + v] = (float)log(pr[v]);
  int64_t cnt[NB];
  f.out.allowed_count = cnt;
  f.o.top_k = 3;
  f.o.top_p = 0.35f;
  cr_assert_eq(fh_decode_from_logits(f.ctx, &f.o, &f.t, &f.out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(cnt[0], 1);
  f.o.top_k_top_p_order = FH_DECODE_TOP_K_TOP_P_JOINT;
  cr_assert_eq(fh_decode_from_logits(f.ctx, &f.o, &f.t, &f.out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_expect_eq(cnt[0], 2);
  cr_expect_eq(cnt[1], 2);
  fh_context_destroy(f.ctx);
}
