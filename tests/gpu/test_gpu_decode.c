/* gpu_decode: fh_decode_from_logits and fh_decode_fused on a real device, through the public API
 * with device buffers, against the CPU backend with the rules of tests/kernel/test_decode_cuda.c:
 * a compact selection of the kernel_decode and kernel_decode_fused cases (every sampler family,
 * per-row arrays with bias and bans, every dtype) plus one large vocabulary. On hardware the Gumbel noise comes from CUDA's fp64
 * libm, so a token may differ from the CPU's only at a near-tie of the two best keys (accepted and
 * counted, docs/decoding.md "CUDA backend"). Every test skips when no CUDA device is present; the
 * same file runs on the emulator as part of test_gpu_emu, where near-ties cannot occur. */
#include <criterion/criterion.h>

#include "test_decode_common.h"

static void gpu_setup(void) {
  fh_context_t* ctx = NULL;
  if (fh_context_create(&ctx, FH_BACKEND_CUDA, 0) != FH_SUCCESS) cr_skip_test("no CUDA device: %s", fh_last_error());
  fh_context_destroy(ctx);
  near_ties_seen = 0;
  worst_share = 0.0;
}

Test(gpu_decode, samplers_every_dtype, .timeout = 1200) {
  gpu_setup();
  const cfg_t cs[] = {
      {CFG("greedy", FH_DECODE_STANDARD), .T = 0.0f},
      {CFG("chain", FH_DECODE_STANDARD), .min_p = 0.02f, .top_k = 40, .top_p = 0.8f, .T = 1.3f},
      {CFG("top_n_sigma", FH_DECODE_TOP_N_SIGMA), .T = 0.8f},
      {CFG("eta", FH_DECODE_ETA), .eps = 4e-3f},
      {CFG("top_h", FH_DECODE_TOP_H)},
      {CFG("bregman_alpha_half", FH_DECODE_BREGMAN), .lambda = 0.02f, .b_alpha = 0.5f},
      {CFG("per_row_standard", FH_DECODE_STANDARD), .per_row = 1, .lists = 1, .nlp = 4},
      {CFG("chain_joint", FH_DECODE_STANDARD), .min_p = 0.02f, .top_k = 40, .top_p = 0.8f, .T = 1.3f,
       .order = FH_DECODE_TOP_K_TOP_P_JOINT},
      {CFG("p_less", FH_DECODE_P_LESS), .nlp = 4},
  };
  static const fh_dtype_t dts[] = {FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
  for (size_t i = 0; i < sizeof cs / sizeof cs[0]; ++i)
    for (int d = 0; d < 3; ++d) {
      run_case(&cs[i], dts[d], 37, 4099, 1);
      run_case(&cs[i], dts[d], 5, 101, 1);
    }
  cr_log_info("gpu_decode: %d tokens at near-ties, largest share of a float tolerance %.3f", near_ties_seen,
              worst_share);
}

Test(gpu_decode, large_vocab, .timeout = 1200) {
  gpu_setup();
  const cfg_t cs[] = {{CFG("large_top_p", FH_DECODE_STANDARD), .top_p = 0.95f, .nlp = 8},
                      {CFG("large_temperature", FH_DECODE_STANDARD), .T = 0.9f}};
  for (int i = 0; i < 2; ++i) run_case(&cs[i], FH_DTYPE_BF16, 4, 65539, 1);
  cr_log_info("gpu_decode: %d tokens at near-ties", near_ties_seen);
}

/* The fused path (kernels/decode_fused.cu) on exact inputs (run_fused): the certificate, the
 * fallback (top-p at high entropy), each dtype, and two row blocks (B = 130). */
Test(gpu_decode, fused, .timeout = 1200) {
  gpu_setup();
  const cfg_t cs[] = {
      {CFG("temperature", FH_DECODE_STANDARD), .T = 0.7f, .nlp = 5},
      {CFG("chain", FH_DECODE_STANDARD), .min_p = 0.02f, .top_k = 40, .top_p = 0.8f, .T = 1.3f},
      {CFG("top_n_sigma", FH_DECODE_TOP_N_SIGMA), .nsig = 1.0f, .T = 0.8f},
      {CFG("eta", FH_DECODE_ETA), .eps = 4e-3f},
      {CFG("per_row_bregman", FH_DECODE_BREGMAN), .per_row = 1, .lists = 1, .b_alpha = 0.7f},
      {CFG("fallback_top_p", FH_DECODE_STANDARD), .T = 3.0f, .top_p = 0.95f, .nlp = 2},
  };
  static const fh_dtype_t dts[] = {FH_DTYPE_F32, FH_DTYPE_F16, FH_DTYPE_BF16};
  int64_t second = 0;
  for (size_t i = 0; i < sizeof cs / sizeof cs[0]; ++i)
    second += run_fused(&cs[i], dts[i % 3], 37, 4099, 40, (int)(i % 2), 1, NULL);
  const cfg_t big = {CFG("rows130", FH_DECODE_STANDARD), .min_p = 0.05f, .per_row = 1, .lists = 1};
  second += run_fused(&big, FH_DTYPE_BF16, 130, 1031, 72, 1, 1, NULL);
  cr_log_info("gpu_decode fused: %lld rows by the exact fallback, %d tokens at near-ties", (long long)second,
              near_ties_seen);
}
