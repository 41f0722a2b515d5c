/* Rules a new user meets first (docs/conventions.md): dtype names in messages, the workspace
 * rule on the CPU backend (the same as on CUDA), and the CPU backend's thread count. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fusedhead.h"

static fh_context_t* cpu(void) {
  fh_context_t* c = NULL;
  cr_assert_eq(fh_context_create(&c, FH_BACKEND_CPU, 0), FH_SUCCESS);
  return c;
}

static void expect_msg(const char* what, const char* part) {
  const char* m = fh_last_error();
  cr_expect(strstr(m, part) != NULL, "%s: message \"%s\" lacks \"%s\"", what, m, part);
}

Test(api_hardening, dtype_mismatch_names_both_dtypes) {
  fh_context_t* ctx = cpu();
  float e[8] = {0};
  uint16_t c[12] = {0};
  int64_t y[2] = {0, 1};
  float loss;
  fh_tensor_t E = fh_tensor_2d(e, FH_DTYPE_F32, 2, 4), C = fh_tensor_2d(c, FH_DTYPE_BF16, 3, 4);
  fh_linear_ce_options_t o;
  fh_linear_ce_options_init(&o);
  fh_linear_ce_outputs_t out = {&loss, NULL, NULL, NULL, NULL, NULL};
  cr_expect_eq(fh_linear_ce_forward(ctx, &o, &E, &C, NULL, y, NULL, NULL, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  expect_msg("C bf16 vs E fp32", "fh_linear_ce_forward: C->dtype is bf16 (must be fp32");
  C.dtype = (fh_dtype_t)7;
  cr_expect_eq(fh_linear_ce_forward(ctx, &o, &E, &C, NULL, y, NULL, NULL, &out, NULL, 0), FH_ERR_INVALID_ARGUMENT);
  expect_msg("out-of-range dtype", "C->dtype is 7 (not a dtype");
  fh_context_destroy(ctx);
}

/* Every call that takes a workspace, on the CPU backend (which needs none): NULL with a nonzero
 * size and a misaligned pointer are rejected; NULL/0 and an aligned buffer are accepted. */
typedef fh_status_t (*ws_call_t)(fh_context_t*, void*, size_t);

static float E_[8] = {0.5f, -1, 2, 0.25f, 1, 0, -0.5f, 3}, C_[12] = {1, 2, 3, 4, -1, 0, 1, 0, 0.5f, 0.5f, 0.5f, 0.5f};
static int64_t Y_[2] = {0, 2};

static fh_status_t lce_fwd(fh_context_t* ctx, void* ws, size_t n) {
  fh_tensor_t E = fh_tensor_2d(E_, FH_DTYPE_F32, 2, 4), C = fh_tensor_2d(C_, FH_DTYPE_F32, 3, 4);
  fh_linear_ce_options_t o;
  fh_linear_ce_options_init(&o);
  float loss;
  fh_linear_ce_outputs_t out = {&loss, NULL, NULL, NULL, NULL, NULL};
  return fh_linear_ce_forward(ctx, &o, &E, &C, NULL, Y_, NULL, NULL, &out, ws, n);
}
static fh_status_t lce_bwd(fh_context_t* ctx, void* ws, size_t n) {
  fh_tensor_t E = fh_tensor_2d(E_, FH_DTYPE_F32, 2, 4), C = fh_tensor_2d(C_, FH_DTYPE_F32, 3, 4);
  fh_linear_ce_options_t o;
  fh_linear_ce_options_init(&o);
  float lse[2] = {1, 1}, one = 1, de[8];
  fh_tensor_t dE = fh_tensor_2d(de, FH_DTYPE_F32, 2, 4);
  fh_linear_ce_grad_inputs_t in = {lse, NULL, &one, NULL};
  fh_linear_ce_grads_t g = {&dE, NULL, NULL};
  return fh_linear_ce_backward(ctx, &o, &E, &C, NULL, Y_, NULL, NULL, &in, &g, ws, n);
}
static fh_status_t dist_fwd(fh_context_t* ctx, void* ws, size_t n) {
  fh_tensor_t E = fh_tensor_2d(E_, FH_DTYPE_F32, 2, 4), C = fh_tensor_2d(C_, FH_DTYPE_F32, 3, 4);
  fh_distill_head_t h = {&E, &C, NULL};
  fh_distill_options_t o;
  fh_distill_options_init(&o);
  float loss;
  fh_distill_outputs_t out = {&loss, NULL, NULL, NULL};
  return fh_distill_forward(ctx, &o, &h, &h, NULL, &out, ws, n);
}
static fh_status_t decode(fh_context_t* ctx, void* ws, size_t n) {
  fh_tensor_t L = fh_tensor_2d(C_, FH_DTYPE_F32, 3, 4);
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  int64_t tok[3];
  fh_decode_outputs_t out = {tok, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
  return fh_decode_from_logits(ctx, &o, &L, &out, ws, n);
}
static fh_status_t topk(fh_context_t* ctx, void* ws, size_t n) {
  fh_tensor_t L = fh_tensor_2d(C_, FH_DTYPE_F32, 3, 4);
  float v[6];
  int64_t id[6];
  return fh_topk_from_logits(ctx, &L, 2, v, id, ws, n);
}

Test(api_hardening, workspace_rule_on_the_cpu_backend) {
  const struct {
    const char* fn;
    ws_call_t call;
  } calls[] = {{"fh_linear_ce_forward", lce_fwd}, {"fh_linear_ce_backward", lce_bwd},
               {"fh_distill_forward", dist_fwd},  {"fh_decode_from_logits", decode},
               {"fh_topk_from_logits", topk}};
  unsigned char* buf = aligned_alloc(64, 256);
  fh_context_t* ctx = cpu();
  for (size_t k = 0; k < sizeof calls / sizeof calls[0]; ++k) {
    cr_expect_eq(calls[k].call(ctx, NULL, 0), FH_SUCCESS, "%s: NULL, 0: %s", calls[k].fn, fh_last_error());
    cr_expect_eq(calls[k].call(ctx, buf, 64), FH_SUCCESS, "%s: aligned: %s", calls[k].fn, fh_last_error());
    cr_expect_eq(calls[k].call(ctx, NULL, 64), FH_ERR_INVALID_ARGUMENT, "%s: NULL with 64 bytes", calls[k].fn);
    expect_msg(calls[k].fn, "workspace is NULL");
    cr_expect_eq(calls[k].call(ctx, buf + 4, 64), FH_ERR_INVALID_ARGUMENT, "%s: misaligned", calls[k].fn);
    expect_msg(calls[k].fn, "not 16-byte aligned");
  }
  fh_context_destroy(ctx);
  free(buf);
}

Test(api_hardening, num_threads_set_get_and_results_independent_of_it) {
  fh_context_t* ctx = cpu();
  int n = -1;
  cr_expect_eq(fh_context_get_num_threads(ctx, &n), FH_SUCCESS);
  cr_expect_eq(n, 0, "default 0 (OpenMP's default)");
  cr_expect_eq(fh_context_set_num_threads(ctx, -1), FH_ERR_INVALID_ARGUMENT);
  expect_msg("negative", "fh_context_set_num_threads: num_threads is -1");
  cr_expect_eq(fh_context_get_num_threads(ctx, NULL), FH_ERR_INVALID_ARGUMENT);
  cr_expect_eq(fh_context_set_num_threads(NULL, 1), FH_ERR_INVALID_ARGUMENT);
  /* a problem large enough for the parallel passes (N·V·D > 2e6) */
  enum { N = 48, V = 1500, D = 32 };
  float* e = malloc(sizeof(float) * N * D);
  float* c = malloc(sizeof(float) * V * D);
  int64_t y[N];
  for (int k = 0; k < N * D; ++k) e[k] = (float)sin(0.37 * k);
  for (int k = 0; k < V * D; ++k) c[k] = (float)cos(0.11 * k);
  for (int i = 0; i < N; ++i) y[i] = (i * 37) % V;
  fh_tensor_t E = fh_tensor_2d(e, FH_DTYPE_F32, N, D), C = fh_tensor_2d(c, FH_DTYPE_F32, V, D);
  fh_linear_ce_options_t o;
  fh_linear_ce_options_init(&o);
  float loss[2], lse[2][N], one = 1.0f;
  float* de[2] = {malloc(sizeof(float) * N * D), malloc(sizeof(float) * N * D)};
  for (int t = 0; t < 2; ++t) {
    cr_assert_eq(fh_context_set_num_threads(ctx, t + 1), FH_SUCCESS);
    cr_assert_eq(fh_context_get_num_threads(ctx, &n), FH_SUCCESS);
    cr_expect_eq(n, t + 1);
    fh_linear_ce_outputs_t out = {&loss[t], lse[t], NULL, NULL, NULL, NULL};
    cr_assert_eq(fh_linear_ce_forward(ctx, &o, &E, &C, NULL, y, NULL, NULL, &out, NULL, 0), FH_SUCCESS);
    fh_tensor_t dE = fh_tensor_2d(de[t], FH_DTYPE_F32, N, D);
    fh_linear_ce_grad_inputs_t in = {lse[t], NULL, &one, NULL};
    fh_linear_ce_grads_t g = {&dE, NULL, NULL};
    cr_assert_eq(fh_linear_ce_backward(ctx, &o, &E, &C, NULL, y, NULL, NULL, &in, &g, NULL, 0), FH_SUCCESS);
  }
  cr_expect(loss[0] == loss[1] && memcmp(de[0], de[1], sizeof(float) * N * D) == 0,
            "1 and 2 threads must give identical results");
  free(e), free(c), free(de[0]), free(de[1]);
  fh_context_destroy(ctx);
}
