/* Suite kernel_decode: kernels/decode.cu end to end through fh_decode_from_logits with an
 * FH_BACKEND_CUDA context on the SIMT emulator, against the FH_BACKEND_CPU reference on the same
 * stored logits: every sampler (greedy, temperature, min-p, top-k, top-p and their chain in
 * both top-k/top-p orders, top-nσ, ε, η, top-H, Bregman with α = 1 and α != 1, p-less),
 * per-row parameter arrays (device memory), sparse bias and bans, fp32/fp16/bf16 logits with a padded row stride (NaN padding),
 * B in {1, 5, 37}, V in {1, 101, 4099} (one case at V = 20011), and guard words after every
 * output.
 *
 * Rows: Gaussian logits, peaked rows (one class 12 above the rest), integer logits in [-3, 3]
 * with scattered -inf (long ties: top-k at a tie, equal Gumbel bases), and degenerate rows (a
 * NaN, a +inf, all -inf; bans that remove every class at V = 1).
 *
 * What must match. Tokens, ranks, allowed counts, flags and top-n ids: exactly (the token is a
 * keyed Gumbel-max whose keys s_v + g_v are the same fp64 numbers on both backends, the noise
 * from the same Philox words and, under the emulator, the same libm). Floats (logprob,
 * full_logprob, lse, entropy, top-n logprobs): both are one fp64 value rounded to fp32; the fp64
 * values differ only by the order of the sums (Z, F, the kept mass), a few units of 2^-53
 * relative of |lse| at these V, so |x - ref| <= 2^-23·|ref| (one fp32 ulp of the reference) +
 * 2^-40·(1 + |lse|) (the fp64 difference where ref is near 0 after the cancellation s - lse).
 * NaN must match NaN, infinities must be equal. docs/decoding.md, "CUDA backend". */
#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <string.h>

#include "fusedhead.h"
#include "test_decode_common.h"
#include "test_dev_util.h"

#define DECODE_TEST(tname, ...)          \
  Test(kernel_decode, tname) {           \
    const cfg_t c = {__VA_ARGS__};        \
    run_grid(&c);                        \
  }

DECODE_TEST(greedy, CFG("greedy", FH_DECODE_STANDARD), .T = 0.0f)
DECODE_TEST(temperature, CFG("temperature", FH_DECODE_STANDARD), .T = 0.7f, .nlp = 5)
DECODE_TEST(temperature_tiny, CFG("temperature_tiny", FH_DECODE_STANDARD), .T = 1e-3f)
DECODE_TEST(temperature_to_zero, CFG("temperature_to_zero", FH_DECODE_STANDARD), .T = 1e-20f, .top_p = 0.5f)
DECODE_TEST(min_p, CFG("min_p", FH_DECODE_STANDARD), .min_p = 0.1f)
DECODE_TEST(top_k1, CFG("top_k1", FH_DECODE_STANDARD), .top_k = 1)
DECODE_TEST(top_k5, CFG("top_k5", FH_DECODE_STANDARD), .top_k = 5, .T = 1.5f)
DECODE_TEST(top_k_V, CFG("top_k_V", FH_DECODE_STANDARD), .top_k = -1, .top_p = 1.0f)
DECODE_TEST(top_p, CFG("top_p", FH_DECODE_STANDARD), .top_p = 0.9f)
DECODE_TEST(chain, CFG("chain", FH_DECODE_STANDARD), .min_p = 0.02f, .top_k = 40, .top_p = 0.8f, .T = 1.3f)
DECODE_TEST(top_n_sigma, CFG("top_n_sigma", FH_DECODE_TOP_N_SIGMA), .nsig = 1.0f, .T = 0.8f)
DECODE_TEST(top_n_sigma_off, CFG("top_n_sigma_off", FH_DECODE_TOP_N_SIGMA), .nsig = 0.0f)
DECODE_TEST(epsilon, CFG("epsilon", FH_DECODE_EPSILON), .eps = 3e-4f)
DECODE_TEST(epsilon_fallback, CFG("epsilon_fallback", FH_DECODE_EPSILON), .eps = 0.6f)
DECODE_TEST(eta, CFG("eta", FH_DECODE_ETA), .eps = 4e-3f)
DECODE_TEST(top_h, CFG("top_h", FH_DECODE_TOP_H))
DECODE_TEST(top_h_alpha1, CFG("top_h_alpha1", FH_DECODE_TOP_H), .h_alpha = 1.0f, .cand = 7)
DECODE_TEST(bregman, CFG("bregman", FH_DECODE_BREGMAN))
DECODE_TEST(bregman_lambda0, CFG("bregman_lambda0", FH_DECODE_BREGMAN), .lambda = 0.0f)
DECODE_TEST(bregman_alpha_half, CFG("bregman_alpha_half", FH_DECODE_BREGMAN), .lambda = 0.02f, .b_alpha = 0.5f)
DECODE_TEST(bregman_alpha2, CFG("bregman_alpha2", FH_DECODE_BREGMAN), .lambda = 0.02f, .b_alpha = 2.0f)
DECODE_TEST(per_row_standard, CFG("per_row_standard", FH_DECODE_STANDARD), .per_row = 1, .lists = 1, .nlp = 4)
DECODE_TEST(per_row_sigma, CFG("per_row_sigma", FH_DECODE_TOP_N_SIGMA), .per_row = 1, .lists = 1)
DECODE_TEST(per_row_eta, CFG("per_row_eta", FH_DECODE_ETA), .per_row = 1, .lists = 1)
DECODE_TEST(per_row_top_h, CFG("per_row_top_h", FH_DECODE_TOP_H), .per_row = 1, .lists = 1)
DECODE_TEST(per_row_bregman, CFG("per_row_bregman", FH_DECODE_BREGMAN), .per_row = 1, .lists = 1, .b_alpha = 0.7f)
DECODE_TEST(p_less, CFG("p_less", FH_DECODE_P_LESS), .nlp = 4)
DECODE_TEST(p_less_hot, CFG("p_less_hot", FH_DECODE_P_LESS), .T = 2.5f)
DECODE_TEST(per_row_p_less, CFG("per_row_p_less", FH_DECODE_P_LESS), .per_row = 1, .lists = 1)
DECODE_TEST(joint, CFG("joint", FH_DECODE_STANDARD), .top_k = 5, .top_p = 0.6f, .order = FH_DECODE_TOP_K_TOP_P_JOINT)
DECODE_TEST(chain_joint, CFG("chain_joint", FH_DECODE_STANDARD), .min_p = 0.02f, .top_k = 40, .top_p = 0.8f, .T = 1.3f,
            .order = FH_DECODE_TOP_K_TOP_P_JOINT)
DECODE_TEST(per_row_joint, CFG("per_row_joint", FH_DECODE_STANDARD), .per_row = 1, .lists = 1, .nlp = 4,
            .order = FH_DECODE_TOP_K_TOP_P_JOINT)
DECODE_TEST(lists_only, CFG("lists_only", FH_DECODE_STANDARD), .lists = 1, .top_k = 3)

/* A vocabulary of several scan tiles and more than 2^14 ids (fp32 only). */
Test(kernel_decode, large_vocab) {
  const cfg_t cs[] = {{CFG("large_top_p", FH_DECODE_STANDARD), .top_p = 0.95f, .nlp = 8},
                      {CFG("large_bregman", FH_DECODE_BREGMAN), .lambda = 0.0f},
                      {CFG("large_p_less", FH_DECODE_P_LESS), .T = 1.5f},
                      {CFG("large_joint", FH_DECODE_STANDARD), .top_k = 3000, .top_p = 0.9f,
                       .order = FH_DECODE_TOP_K_TOP_P_JOINT}};
  for (int i = 0; i < 4; ++i) run_case(&cs[i], FH_DTYPE_F32, 3, 20011, 0);
}

/* A per-row value out of range is found on the device: the call succeeds (no host sync), the row
 * reports as degenerate, and fh_context_check returns FH_ERR_INVALID_ARGUMENT once. */
Test(kernel_decode, device_checks_per_row_values) {
  fh_context_t* gpu = NULL;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  const int64_t B = 3, V = 50;
  float z[3 * 50];
  for (int i = 0; i < B * V; ++i) z[i] = (float)(i % 7);
  const float T[3] = {1.0f, -1.0f, 0.5f};
  void *dz = to_device(z, sizeof z), *dT = to_device(T, sizeof T);
  int64_t* dtok = alloc_out(B * 8);
  uint32_t* dfl = alloc_out(B * 4);
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  o.temperature_per_row = dT;
  o.degenerate_token = 7;
  const fh_tensor_t t = {dz, FH_DTYPE_F32, B, V, V};
  fh_decode_outputs_t out = {0};
  out.tokens = dtok, out.flags = dfl;
  size_t wsb = 0;
  cr_assert_eq(fh_decode_workspace_size(gpu, &o, B, V, 0, FH_DTYPE_F32, &wsb), FH_SUCCESS, "%s", fh_last_error());
  void* ws = NULL;
  cr_assert_eq(cudaMalloc(&ws, wsb), cudaSuccess);
  cr_assert_eq(fh_decode_from_logits(gpu, &o, &t, &out, ws, wsb), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(gpu), FH_ERR_INVALID_ARGUMENT);
  cr_assert(strstr(fh_last_error(), "decoding per-row parameter") != NULL, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "reported once");
  int64_t* tok = fetch(dtok, B * 8);
  uint32_t* fl = fetch(dfl, B * 4);
  cr_assert_eq(tok[1], 7);
  cr_assert_eq(fl[1], FH_DECODE_FLAG_DEGENERATE);
  cr_assert(tok[0] >= 0 && tok[0] < V && tok[2] >= 0 && tok[2] < V && fl[0] == 0 && fl[2] == 0);
  free(tok), free(fl);
  cudaFree(ws), cudaFree(dz), cudaFree(dT), cudaFree(dtok), cudaFree(dfl);
  fh_context_destroy(gpu);
}

/* The GPU suite's near-tie allowance must not accept an ordinary wrong token: on a row with a
 * clear winner every other token is refused. */
Test(kernel_decode, near_tie_refuses_wrong_tokens) {
  const int64_t V = 64;
  float z[64];
  for (int v = 0; v < V; ++v) z[v] = (float)(v % 9) * 0.25f;
  const fh_tensor_t t = {z, FH_DTYPE_F32, 1, V, V};
  fh_decode_options_t o;
  fh_decode_options_init(&o);
  fh_context_t* cpu = NULL;
  cr_assert_eq(fh_context_create(&cpu, FH_BACKEND_CPU, 0), FH_SUCCESS);
  int64_t tok = -1;
  fh_decode_outputs_t out = {0};
  out.tokens = &tok;
  cr_assert_eq(fh_decode_from_logits(cpu, &o, &t, &out, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  for (int64_t v = 0; v < V; ++v)
    if (v != tok) cr_assert(!near_tie(&t, &o, 0, v), "token %lld accepted against %lld", (long long)v, (long long)tok);
  fh_context_destroy(cpu);
}
