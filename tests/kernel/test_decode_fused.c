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
 * exercise it (top-p alone at high entropy, ties across the whole vocabulary) check that it ran.
 * Every case also counts the bytes of C the kernels read (the emulator's watched range): one
 * pass of V x D per row block, plus one per row block holding a fallback row. The emulator is
 * a compute capability 9.0 device, so 16-bit cases take the sm_90a mainloop unless FH_ENGINE=sm80
 * (ctests kernel_sm90 and kernel); sm90_and_sm80_mainloops_agree_bitwise compares the two. */
#define _POSIX_C_SOURCE 200809L /* setenv, unsetenv */
#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <string.h>

#include "fh_emu.h"
#include "fusedhead.h"
#include "test_decode_common.h"
#include "test_dev_util.h"

/* The emulator's watched range (fh_emu.h) as run_fused's probe. */
static void probe_watch(const void* base, uint64_t bytes) {
  fh_emu_reset_counters();
  fh_emu_watch_global(base, bytes);
}
static uint64_t probe_read(void) {
  const uint64_t b = fh_emu_total_counters().bytes_g2s_watched;
  fh_emu_watch_global(NULL, 0);
  return b;
}
static const fused_probe_t PROBE = {probe_watch, probe_read};

/* Runs one case; returns the rows decoded by the fallback. */
static int64_t run_fused_emu(const cfg_t* c, fh_dtype_t dtype, int64_t B, int64_t V, int64_t D, int with_bias) {
  return run_fused(c, dtype, B, V, D, with_bias, 0, &PROBE);
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
        second += run_fused_emu(c, dts[d], Bs[i], Vs[j], 40, (d + i + j) % 2);
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
  const int64_t B = 10, second = run_fused_emu(&c, FH_DTYPE_F32, B, 4099, 40, 1);
  cr_log_info("p_less_cert: %lld of %lld rows by the exact fallback", (long long)second, (long long)B);
  cr_assert(second <= B - 3, "p-less rows must be decided without the fallback (%lld of %lld were not)",
            (long long)second, (long long)B);
}

/* Top-p alone at T = 3 keeps most of a 4099-id vocabulary, far past the candidates: the
 * certificate must fail and the fallback decide, exactly. */
Test(kernel_decode_fused, fallback_runs_and_is_exact) {
  const cfg_t c = {CFG("fallback_top_p", FH_DECODE_STANDARD), .T = 3.0f, .top_p = 0.95f, .nlp = 2};
  const int64_t second = run_fused_emu(&c, FH_DTYPE_BF16, 5, 4099, 40, 1);
  cr_log_info("fallback_top_p: %lld of 5 rows by the exact fallback", (long long)second);
  cr_assert(second >= 3, "the high-entropy top-p rows must need the fallback (%lld did)", (long long)second);
}

/* Three row blocks (B = 300) and a vocabulary of many splits (V = 50000, 196 splits of 2 tiles). */
Test(kernel_decode_fused, row_blocks_and_splits) {
  const cfg_t a = {CFG("rows300", FH_DECODE_STANDARD), .top_k = 20, .top_p = 0.9f, .per_row = 1, .lists = 1};
  run_fused_emu(&a, FH_DTYPE_F16, 300, 101, 40, 1);
  const cfg_t b = {CFG("vocab50000", FH_DECODE_STANDARD), .min_p = 0.05f, .nlp = 6};
  run_fused_emu(&b, FH_DTYPE_BF16, 3, 50000, 24, 1);
}

/* The sm_90a mainloop (docs/hopper.md: C by cp.async as the A operand, H by TMA) against the
 * sm_80 one: every output bitwise equal, the fallback's recompute included (top-p at T = 3 sends
 * most rows there). Which path ran comes from the tensor-core FLOPs: the sm_90a tiles are whole
 * 128 x 128 x 64k blocks, one per (row block, class tile) and pass. */
static void fused_paths(const cfg_t* c, fh_dtype_t dtype, int64_t B, int64_t V, int64_t D) {
  fh_context_t* gpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  const size_t es = fh_dtype_size(dtype);
  tu_rng_t rng = {(uint64_t)(B * 131 + V * 17 + dtype)};
  void *hh = malloc((size_t)(B * D) * es), *hc = malloc((size_t)(V * D) * es), *hb = malloc((size_t)V * es);
  for (int64_t i = 0; i < B * D; ++i) fh_store(hh, dtype, i, fused_h_value(&rng, i / D, i % D));
  for (int64_t i = 0; i < V * D; ++i) fh_store(hc, dtype, i, 0.5 * (double)(tu_randint(&rng, 5) - 2));
  for (int64_t v = 0; v < V; ++v) fh_store(hb, dtype, v, 0.25 * (double)(tu_randint(&rng, 9) - 4));
  void *dh = to_device(hh, (size_t)(B * D) * es), *dc = to_device(hc, (size_t)(V * D) * es);
  void* db = to_device(hb, (size_t)V * es);
  const fh_tensor_t dH = {dh, dtype, B, D, D}, dC = {dc, dtype, V, D, D}, dbt = {db, dtype, 1, V, V};
  dec_setup_t u;
  setup_begin(&u, gpu, c, B, V, D, dtype, &rng);
  outs_t dv2, go2;
  outs_alloc(&dv2, B, u.n, 1);
  uint64_t flops[2];
  for (int sm90 = 0; sm90 < 2; ++sm90) {
    if (sm90) unsetenv("FH_ENGINE");
    else setenv("FH_ENGINE", "sm80", 1);
    fh_emu_reset_counters();
    const fh_decode_outputs_t og = sm90 ? outs_view(&dv2) : u.og;
    cr_assert_eq(fh_decode_fused(gpu, &u.od, &dH, &dC, &dbt, &og, u.ws, u.wsb), FH_SUCCESS, "%s", fh_last_error());
    flops[sm90] = fh_emu_total_counters().mma_flops;
    unsetenv("FH_ENGINE");
  }
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "%s", fh_last_error());
  outs_fetch(&u.go, &u.dvo, B, u.n);
  outs_fetch(&go2, &dv2, B, u.n);
  int64_t passes = 0, second = 0;
  for (int64_t r0 = 0; r0 < B; r0 += 128) {
    int again = 0;
    for (int64_t b = r0; b < B && b < r0 + 128; ++b) again |= (go2.flags[b] & FH_DECODE_FLAG_SECOND_PASS) != 0;
    passes += 1 + again;
  }
  for (int64_t b = 0; b < B; ++b) second += (go2.flags[b] & FH_DECODE_FLAG_SECOND_PASS) != 0;
  const uint64_t m90 = (uint64_t)passes * (uint64_t)((V + 127) / 128) * 2u * 128u * 128u * (uint64_t)((D + 63) / 64 * 64);
  cr_log_info("%s dtype=%d B=%lld V=%lld D=%lld: %lld fallback rows; FLOPs sm_90a %llu (model %llu), sm_80 %llu",
              c->name, (int)dtype, (long long)B, (long long)V, (long long)D, (long long)second,
              (unsigned long long)flops[1], (unsigned long long)m90, (unsigned long long)flops[0]);
  cr_expect_eq(flops[1], m90, "%s: the default path did not run the sm_90a tiles", c->name);
  cr_expect_neq(flops[0], flops[1], "%s: FH_ENGINE=sm80 ran the same tiles", c->name);
  const size_t b8 = (size_t)B * 8, b4 = (size_t)B * 4, n8 = (size_t)(B * u.n) * 8, n4 = (size_t)(B * u.n) * 4;
  cr_expect(!memcmp(u.go.tok, go2.tok, b8) && !memcmp(u.go.rank, go2.rank, b8) && !memcmp(u.go.cnt, go2.cnt, b8) &&
                !memcmp(u.go.tid, go2.tid, n8),
            "%s: tokens, ranks, counts or top ids differ between the mainloops", c->name);
  cr_expect(!memcmp(u.go.lp, go2.lp, b4) && !memcmp(u.go.flp, go2.flp, b4) && !memcmp(u.go.lse, go2.lse, b4) &&
                !memcmp(u.go.ent, go2.ent, b4) && !memcmp(u.go.tlp, go2.tlp, n4) && !memcmp(u.go.flags, go2.flags, b4),
            "%s: log-probabilities, lse, entropy or flags differ between the mainloops", c->name);
  outs_free(&dv2, 1), outs_free(&go2, 0);
  setup_end(&u);
  cudaFree(dh), cudaFree(dc), cudaFree(db), free(hh), free(hc), free(hb);
  fh_context_destroy(gpu);
}

Test(kernel_decode_fused, sm90_and_sm80_mainloops_agree_bitwise) {
  const cfg_t a = {CFG("paths_temperature", FH_DECODE_STANDARD), .T = 0.7f, .nlp = 5};
  const cfg_t b = {CFG("paths_fallback", FH_DECODE_STANDARD), .T = 3.0f, .top_p = 0.95f, .nlp = 2};
  fused_paths(&a, FH_DTYPE_BF16, 130, 1000, 72);
  fused_paths(&b, FH_DTYPE_F16, 37, 4099, 40);
}
