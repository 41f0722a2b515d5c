/* Suite kernel_decode_fused: kernels/decode_fused.cu end to end through fh_decode_fused with an
 * FH_BACKEND_CUDA context on the SIMT emulator, against the FH_BACKEND_CPU reference on the same
 * H, C and bias (docs/decoding.md, "Fused decoding on CUDA").
 *
 * Inputs are exact: H and C hold multiples of 1/2 in [-1, 1] (some rows scaled by 4: peaked),
 * the bias multiples of 1/4 with a few -inf (masked classes), so every fp32 tensor-core logit
 * equals the reference's fp64 dot product and the comparison rules of kernel_decode apply
 * unchanged (test_decode_cuda.c): tokens, ranks, allowed counts, flags and top-n ids exactly,
 * floats within one fp32 ulp of the reference plus the fp64 reordering term. Rows include a zero
 * row of H (every logit equal to the bias: long ties), a NaN in H (degenerate) and, with lists,
 * bias and bans. D = 40 crosses the fp32 and 16-bit k-stage edges; V crosses the 128-id tile and
 * the split edges; B = 300 spans three row blocks. The exact fallback is counted per case
 * (FH_DECODE_FLAG_SECOND_PASS, masked before the flag comparison) and the cases that must
 * exercise it (top-p alone at high entropy, ties across the whole vocabulary) check that it ran. */
#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <string.h>

#include "fusedhead.h"
#include "test_decode_common.h"
#include "test_dev_util.h"

static double h_value(tu_rng_t* rng, int64_t r, int64_t j) {
  if (r % 7 == 3) return 0.0;                 /* logits = bias: ties across the vocabulary */
  if (r % 9 == 5 && j == 3) return NAN;       /* degenerate */
  const double x = 0.5 * (double)(tu_randint(rng, 5) - 2);
  return r % 5 == 1 ? 4.0 * x : x;            /* peaked rows */
}

/* Runs one case; returns the rows decoded by the fallback. */
static int64_t run_fused(const cfg_t* c, fh_dtype_t dtype, int64_t B, int64_t V, int64_t D, int with_bias) {
  fh_context_t *gpu = NULL, *cpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_create(&cpu, FH_BACKEND_CPU, 0), FH_SUCCESS);
  tu_rng_t rng = {(uint64_t)(B * 1000003 + V * 7919 + dtype * 31 + 29) ^ (uint64_t)strlen(c->name) << 40};
  const size_t es = fh_dtype_size(dtype);
  void* hh = malloc((size_t)(B * D) * es + 1);
  void* hc = malloc((size_t)(V * D) * es + 1);
  void* hb = malloc((size_t)V * es + 1);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t j = 0; j < D; ++j) fh_store(hh, dtype, r * D + j, h_value(&rng, r, j));
  for (int64_t v = 0; v < V; ++v)
    for (int64_t j = 0; j < D; ++j) fh_store(hc, dtype, v * D + j, 0.5 * (double)(tu_randint(&rng, 5) - 2));
  for (int64_t v = 0; v < V; ++v)
    fh_store(hb, dtype, v, v % 97 == 13 && V > 1 ? -INFINITY : 0.25 * (double)(tu_randint(&rng, 9) - 4));
  void *dh = to_device(hh, (size_t)(B * D) * es), *dc = to_device(hc, (size_t)(V * D) * es);
  void* db = to_device(hb, (size_t)V * es);
  const fh_tensor_t tH = {hh, dtype, B, D, D}, tC = {hc, dtype, V, D, D}, tb = {hb, dtype, 1, V, V};
  const fh_tensor_t dH = {dh, dtype, B, D, D}, dC = {dc, dtype, V, D, D}, dbt = {db, dtype, 1, V, V};
  rows_t rw;
  rows_make(&rw, B, V, &rng);
  fh_decode_options_t oh, od;
  options_of(c, V, &oh);
  options_of(c, V, &od);
  void* keep[32] = {0};
  options_rows(&oh, c, &rw, B, 0, NULL);
  options_rows(&od, c, &rw, B, 1, keep);
  const int64_t n = oh.num_logprobs;
  outs_t ro, dvo, go;
  outs_alloc(&ro, B, n, 0);
  outs_alloc(&dvo, B, n, 1);
  size_t wsb = 0;
  cr_assert_eq(fh_decode_workspace_size(gpu, &od, B, V, D, dtype, &wsb), FH_SUCCESS, "%s", fh_last_error());
  void* ws = NULL;
  if (wsb) cr_assert_eq(cudaMalloc(&ws, wsb), cudaSuccess);
  const fh_decode_outputs_t oc = outs_view(&ro), og = outs_view(&dvo);
  cr_assert_eq(fh_decode_fused(cpu, &oh, &tH, &tC, with_bias ? &tb : NULL, &oc, NULL, 0), FH_SUCCESS, "%s",
               fh_last_error());
  cr_assert_eq(fh_decode_fused(gpu, &od, &dH, &dC, with_bias ? &dbt : NULL, &og, ws, wsb), FH_SUCCESS, "%s",
               fh_last_error());
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "%s", fh_last_error());
  outs_fetch(&go, &dvo, B, n);
  const int64_t second = compare_outs(c, &go, &ro, B, V, n, dtype, NULL, &oh, FH_DECODE_FLAG_SECOND_PASS);
  for (int i = 0; i < 32; ++i) cudaFree(keep[i]);
  cudaFree(ws), cudaFree(dh), cudaFree(dc), cudaFree(db), free(hh), free(hc), free(hb);
  outs_free(&ro, 0), outs_free(&dvo, 1), outs_free(&go, 0);
  rows_free(&rw);
  fh_context_destroy(gpu), fh_context_destroy(cpu);
  return second;
}

/* Every dtype x B in {1, 5, 37} x V in {1, 101, 4099}, bias on odd cases; returns fallback rows. */
static int64_t run_fused_grid(const cfg_t* c) {
  static const int64_t Bs[] = {1, 5, 37}, Vs[] = {1, 101, 4099};
  static const fh_dtype_t dts[] = {FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
  int64_t second = 0, rows = 0;
  worst_share = 0.0;
  for (int d = 0; d < 3; ++d)
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) {
        second += run_fused(c, dts[d], Bs[i], Vs[j], 40, (d + i + j) % 2);
        rows += Bs[i];
      }
  cr_log_info("%s: %lld of %lld rows by the exact fallback; largest share of a float tolerance used %.3f", c->name,
              (long long)second, (long long)rows, worst_share);
  return second;
}

#define FUSED_TEST(tname, ...)           \
  Test(kernel_decode_fused, tname) {     \
    const cfg_t c = {__VA_ARGS__};        \
    run_fused_grid(&c);                  \
  }

FUSED_TEST(greedy, CFG("greedy", FH_DECODE_STANDARD), .T = 0.0f)
FUSED_TEST(temperature, CFG("temperature", FH_DECODE_STANDARD), .T = 0.7f, .nlp = 5)
FUSED_TEST(temperature_to_zero, CFG("temperature_to_zero", FH_DECODE_STANDARD), .T = 1e-20f, .top_p = 0.5f)
FUSED_TEST(min_p, CFG("min_p", FH_DECODE_STANDARD), .min_p = 0.1f)
FUSED_TEST(top_k1, CFG("top_k1", FH_DECODE_STANDARD), .top_k = 1)
FUSED_TEST(top_k5, CFG("top_k5", FH_DECODE_STANDARD), .top_k = 5, .T = 1.5f)
FUSED_TEST(top_k_V, CFG("top_k_V", FH_DECODE_STANDARD), .top_k = -1)
FUSED_TEST(chain, CFG("chain", FH_DECODE_STANDARD), .min_p = 0.02f, .top_k = 40, .top_p = 0.8f, .T = 1.3f)
FUSED_TEST(top_n_sigma, CFG("top_n_sigma", FH_DECODE_TOP_N_SIGMA), .nsig = 1.0f, .T = 0.8f)
FUSED_TEST(top_n_sigma_off, CFG("top_n_sigma_off", FH_DECODE_TOP_N_SIGMA), .nsig = 0.0f)
FUSED_TEST(epsilon, CFG("epsilon", FH_DECODE_EPSILON), .eps = 3e-4f)
FUSED_TEST(eta, CFG("eta", FH_DECODE_ETA), .eps = 4e-3f)
FUSED_TEST(top_h, CFG("top_h", FH_DECODE_TOP_H))
FUSED_TEST(bregman, CFG("bregman", FH_DECODE_BREGMAN))
FUSED_TEST(bregman_alpha_half, CFG("bregman_alpha_half", FH_DECODE_BREGMAN), .lambda = 0.02f, .b_alpha = 0.5f)
FUSED_TEST(per_row_standard, CFG("per_row_standard", FH_DECODE_STANDARD), .per_row = 1, .lists = 1, .nlp = 4)
FUSED_TEST(per_row_sigma, CFG("per_row_sigma", FH_DECODE_TOP_N_SIGMA), .per_row = 1, .lists = 1)
FUSED_TEST(per_row_bregman, CFG("per_row_bregman", FH_DECODE_BREGMAN), .per_row = 1, .lists = 1, .b_alpha = 0.7f)

/* The rules added later: p-less (its Σ p² streamed, so rows whose kept set lies inside the
 * candidates are decided without the fallback) and the joint top-k/top-p order (top-p's mass over
 * the min-p survivors: the streamed Z when min-p is off). The counts are logged; the peaked rows
 * must be decided in the fused pass. */
FUSED_TEST(p_less, CFG("p_less", FH_DECODE_P_LESS), .nlp = 4)
FUSED_TEST(per_row_p_less, CFG("per_row_p_less", FH_DECODE_P_LESS), .per_row = 1, .lists = 1)
FUSED_TEST(joint, CFG("joint", FH_DECODE_STANDARD), .top_k = 5, .top_p = 0.6f, .order = FH_DECODE_TOP_K_TOP_P_JOINT)
FUSED_TEST(chain_joint, CFG("chain_joint", FH_DECODE_STANDARD), .min_p = 0.02f, .top_k = 40, .top_p = 0.8f, .T = 1.3f,
           .order = FH_DECODE_TOP_K_TOP_P_JOINT)
FUSED_TEST(per_row_joint, CFG("per_row_joint", FH_DECODE_STANDARD), .per_row = 1, .lists = 1, .nlp = 4,
           .order = FH_DECODE_TOP_K_TOP_P_JOINT)

/* p-less decided in the fused pass: at T = 0.5 the rows keep few tokens (peaked rows, every 5th
 * row of H scaled by 4, a handful), inside the candidates, so the streamed Σ p² decides them.
 * Row 5 is degenerate (NaN in H), so a p-less that always fell back would flag 9 of 10 rows;
 * at least two must be decided in the fused pass (the comparison with the CPU is exact either
 * way). */
Test(kernel_decode_fused, p_less_certificate) {
  const cfg_t c = {CFG("p_less_cert", FH_DECODE_P_LESS), .T = 0.5f};
  const int64_t B = 10, second = run_fused(&c, FH_DTYPE_F32, B, 4099, 40, 1);
  cr_log_info("p_less_cert: %lld of %lld rows by the exact fallback", (long long)second, (long long)B);
  cr_assert(second <= B - 3, "p-less rows must be decided without the fallback (%lld of %lld were not)",
            (long long)second, (long long)B);
}

/* Top-p alone at T = 3 keeps most of a 4099-id vocabulary, far past the candidates: the
 * certificate must fail and the fallback decide, exactly. */
Test(kernel_decode_fused, fallback_runs_and_is_exact) {
  const cfg_t c = {CFG("fallback_top_p", FH_DECODE_STANDARD), .T = 3.0f, .top_p = 0.95f, .nlp = 2};
  const int64_t second = run_fused(&c, FH_DTYPE_BF16, 5, 4099, 40, 1);
  cr_log_info("fallback_top_p: %lld of 5 rows by the exact fallback", (long long)second);
  cr_assert(second >= 3, "the high-entropy top-p rows must need the fallback (%lld did)", (long long)second);
}

/* Three row blocks (B = 300) and a vocabulary of many splits (V = 50000, 196 splits of 2 tiles). */
Test(kernel_decode_fused, row_blocks_and_splits) {
  const cfg_t a = {CFG("rows300", FH_DECODE_STANDARD), .top_k = 20, .top_p = 0.9f, .per_row = 1, .lists = 1};
  run_fused(&a, FH_DTYPE_F16, 300, 101, 40, 1);
  const cfg_t b = {CFG("vocab50000", FH_DECODE_STANDARD), .min_p = 0.05f, .nlp = 6};
  run_fused(&b, FH_DTYPE_BF16, 3, 50000, 24, 1);
}
