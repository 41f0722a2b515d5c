/* Suite kernel_decode_probs: kernels/decode_probs.cu end to end through fh_spec_accept and
 * fh_decode_from_probs (every filter off) with an FH_BACKEND_CUDA context on the SIMT emulator,
 * against the FH_BACKEND_CPU reference on the same stored probabilities (padded row stride with
 * NaN padding, guard words after every output).
 *
 * Rows: random distributions with scattered exact zeros, one-hot rows, rows equal between draft
 * and target (acceptance 1), draft tokens with p_d = 0 (with p_t > 0 and p_t = 0, the second
 * with an all-zero residual), and invalid rows (a NaN, a negative entry, a sum off 1, no mass);
 * V in {1, 7, 257, 3001} (below, at and above the block's stride), K in {0, 1, 4}, B up to 40,
 * per-row seeds and offsets in device memory.
 *
 * What must match. Speculative outputs (tokens, counts, flags) and sampled tokens, ranks,
 * allowed counts and flags: exactly (every decision is the same fp64 expression of stored
 * values and Philox words on both backends, with the host libm under the emulator; the
 * validity sums are in another order, but no test row sits within ulps of 1 ± tol). Floats
 * (logprob, full_logprob, lse, entropy): one fp64 value rounded to fp32 whose sums differ in
 * order only: |x − ref| <= 2^-23·|ref| + 2^-40. docs/decoding.md, "From probabilities". */
#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fusedhead.h"
#include "test_dev_util.h"
#include "test_util.h"

#define PAD 3 /* extra columns of NaN after each row */

/* A random distribution over V ids with some exact zeros (kind 0), one-hot (1), or uniform (2). */
static void make_dist(float* row, int64_t V, int kind, tu_rng_t* g) {
  double w[4096], s = 0;
  const int64_t hot = tu_randint(g, V);
  for (int64_t v = 0; v < V; ++v) {
    w[v] = kind == 1 ? (v == hot) : kind == 2 ? 1.0 : (tu_uniform(g) < 0.25 ? 0.0 : exp(2.0 * tu_normal(g)));
    s += w[v];
  }
  if (!(s > 0)) w[hot] = s = 1.0;
  for (int64_t v = 0; v < V; ++v) row[v] = (float)(w[v] / s);
  for (int64_t v = V; v < V + PAD; ++v) row[v] = NAN;
}

static void check_float(const char* what, float got, float ref, int64_t b) {
  if (isnan(ref)) {
    cr_expect(isnan(got), "%s row %lld: %g, reference NaN", what, (long long)b, (double)got);
    return;
  }
  const double tol = ldexp(fabs((double)ref), -23) + ldexp(1.0, -40);
  cr_expect(fabs((double)got - (double)ref) <= tol, "%s row %lld: %.9g vs %.9g", what, (long long)b, (double)got,
            (double)ref);
}

/* Copy back an output allocated by alloc_out and check its guard words. */
static void* fetch_out(const void* d, size_t bytes) {
  void* h = malloc(bytes + TU_GUARD_WORDS * 4);
  cr_assert(h);
  cr_assert_eq(cudaMemcpy(h, d, bytes + TU_GUARD_WORDS * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  cr_expect(tu_guards_intact(h, bytes), "guard words after an output were overwritten");
  return h;
}

static void spec_case(int64_t B, int64_t K, int64_t V, uint64_t salt) {
  tu_rng_t g = {0x5bec0000ull + salt};
  const int64_t ld = V + PAD, W = K + 1;
  float* pd = (float*)malloc(sizeof(float) * (size_t)(B * K > 0 ? B * K : 1) * ld);
  float* pt = (float*)malloc(sizeof(float) * (size_t)(B * W) * ld);
  int64_t* d = (int64_t*)malloc(sizeof(int64_t) * (size_t)(B * K > 0 ? B * K : 1));
  uint64_t* seeds = (uint64_t*)malloc(sizeof(uint64_t) * B);
  uint64_t* offs = (uint64_t*)malloc(sizeof(uint64_t) * B);
  cr_assert(pd && pt && d && seeds && offs);
  for (int64_t b = 0; b < B; ++b) {
    const int kind = (int)(b % 5);  /* 0, 3, 4: random; 1: one-hot; 2: uniform */
    for (int64_t i = 0; i < W; ++i) make_dist(pt + (b * W + i) * ld, V, kind == 1 || kind == 2 ? kind : 0, &g);
    for (int64_t i = 0; i < K; ++i) {
      float* rd = pd + (b * K + i) * ld;
      if (b % 7 == 3) memcpy(rd, pt + (b * W + i) * ld, sizeof(float) * ld); /* equal models */
      else make_dist(rd, V, b % 4 == 1 ? 1 : 0, &g);
      /* mostly a draft the draft model could draw; sometimes one with p_d = 0 */
      int64_t x = tu_randint(&g, V);
      if (b % 6 != 5)
        for (int64_t tries = 0; tries < 4 * V && !(rd[x] > 0); ++tries) x = tu_randint(&g, V);
      d[b * K + i] = x;
    }
    seeds[b] = 1000 + (uint64_t)b % 3;
    offs[b] = 77 + (uint64_t)b;
  }
  if (B > 8 && V > 1) { /* invalid rows: a NaN, a negative entry, a sum off 1, no mass */
    pt[(1 * W) * ld] = NAN;
    if (K > 0) pd[(2 * K) * ld + V - 1] = -0.5f;
    pt[(4 * W + K) * ld] += 0.25f;
    for (int64_t v = 0; v < V; ++v) pt[(6 * W) * ld + v] = 0.0f;
  }
  fh_tensor_t hd = {pd, FH_DTYPE_F32, B * K, V, ld}, ht = {pt, FH_DTYPE_F32, B * W, V, ld};
  fh_spec_options_t o;
  fh_spec_options_init(&o);
  o.seed_per_row = seeds;
  o.offset_per_row = offs;
  const size_t nt = sizeof(int64_t) * (size_t)(B * W), nb = sizeof(int64_t) * (size_t)B;
  int64_t* rt = (int64_t*)malloc(nt);
  int64_t *ra = (int64_t*)malloc(nb), *re = (int64_t*)malloc(nb), *ri = (int64_t*)malloc(nb);
  uint32_t* rf = (uint32_t*)malloc(sizeof(uint32_t) * (size_t)B);
  fh_context_t *cpu, *gpu;
  cr_assert_eq(fh_context_create(&cpu, FH_BACKEND_CPU, 0), FH_SUCCESS);
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_spec_outputs_t ro = {rt, ra, re, ri, rf};
  cr_assert_eq(fh_spec_accept(cpu, &o, d, &hd, &ht, K, &ro, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  /* device copies */
  fh_tensor_t dd = hd, dt = ht;
  dd.data = to_device(pd, sizeof(float) * (size_t)(B * K) * ld);
  dt.data = to_device(pt, sizeof(float) * (size_t)(B * W) * ld);
  int64_t* d_d = (int64_t*)to_device(d, sizeof(int64_t) * (size_t)(B * K));
  fh_spec_options_t od = o;
  uint64_t* d_seeds = (uint64_t*)to_device(seeds, sizeof(uint64_t) * B);
  uint64_t* d_offs = (uint64_t*)to_device(offs, sizeof(uint64_t) * B);
  od.seed_per_row = d_seeds;
  od.offset_per_row = d_offs;
  fh_spec_outputs_t go = {(int64_t*)alloc_out(nt), (int64_t*)alloc_out(nb), (int64_t*)alloc_out(nb),
                          (int64_t*)alloc_out(nb), (uint32_t*)alloc_out(sizeof(uint32_t) * B)};
  cr_assert_eq(fh_spec_accept(gpu, &od, d_d, &dd, &dt, K, &go, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "%s", fh_last_error());
  int64_t* gt = (int64_t*)fetch_out(go.output_tokens, nt);
  int64_t *ga = (int64_t*)fetch_out(go.accepted, nb), *ge = (int64_t*)fetch_out(go.emitted, nb);
  int64_t* gi = (int64_t*)fetch_out(go.accepted_independent, nb);
  uint32_t* gf = (uint32_t*)fetch_out(go.flags, sizeof(uint32_t) * B);
  int64_t rejected = 0, degenerate = 0;
  for (int64_t b = 0; b < B; ++b) {
    cr_expect(ga[b] == ra[b] && ge[b] == re[b] && gi[b] == ri[b] && gf[b] == rf[b],
              "row %lld: accepted %lld/%lld emitted %lld/%lld independent %lld/%lld flags %u/%u", (long long)b,
              (long long)ga[b], (long long)ra[b], (long long)ge[b], (long long)re[b], (long long)gi[b],
              (long long)ri[b], gf[b], rf[b]);
    for (int64_t i = 0; i < W; ++i)
      cr_expect_eq(gt[b * W + i], rt[b * W + i], "row %lld position %lld", (long long)b, (long long)i);
    rejected += ra[b] < K;
    degenerate += (rf[b] & FH_SPEC_FLAG_DEGENERATE) != 0;
  }
  if (K > 0 && B > 8 && V > 1) cr_expect(rejected > 0 && degenerate == 4, "rejected %lld, degenerate %lld",
                                         (long long)rejected, (long long)degenerate);
  /* an out-of-range draft id on the device: a degenerate row and the device error flag */
  if (K > 0) {
    const int64_t bad = V;
    cr_assert_eq(cudaMemcpy(d_d, &bad, sizeof bad, cudaMemcpyHostToDevice), cudaSuccess);
    cr_assert_eq(fh_spec_accept(gpu, &od, d_d, &dd, &dt, K, &go, NULL, 0), FH_SUCCESS);
    cr_expect_eq(fh_context_check(gpu), FH_ERR_INVALID_ARGUMENT);
    uint32_t f0;
    cr_assert_eq(cudaMemcpy(&f0, go.flags, sizeof f0, cudaMemcpyDeviceToHost), cudaSuccess);
    cr_expect_eq(f0, FH_SPEC_FLAG_DEGENERATE);
  }
  free(gt), free(ga), free(ge), free(gi), free(gf);
  cudaFree(dd.data), cudaFree(dt.data), cudaFree(d_d), cudaFree(d_seeds), cudaFree(d_offs);
  cudaFree(go.output_tokens), cudaFree(go.accepted), cudaFree(go.emitted), cudaFree(go.accepted_independent);
  cudaFree(go.flags);
  free(pd), free(pt), free(d), free(seeds), free(offs), free(rt), free(ra), free(re), free(ri), free(rf);
  fh_context_destroy(cpu);
  fh_context_destroy(gpu);
}

Test(kernel_decode_probs, spec_v1) { spec_case(5, 1, 1, 1); }
Test(kernel_decode_probs, spec_k0) { spec_case(12, 0, 257, 2); }
Test(kernel_decode_probs, spec_small) { spec_case(40, 4, 7, 3); }
Test(kernel_decode_probs, spec_stride) { spec_case(23, 1, 257, 4); }
Test(kernel_decode_probs, spec_large, .timeout = 300) { spec_case(12, 4, 3001, 5); }

/* fh_decode_from_probs with every filter off, int32 indices and tokens, per-row keys. */
static void probs_case(int64_t Bin, int64_t B, int64_t V, uint64_t salt) {
  tu_rng_t g = {0x9b0b5000ull + salt};
  const int64_t ld = V + PAD;
  float* p = (float*)malloc(sizeof(float) * (size_t)Bin * ld);
  int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * (size_t)B);
  uint64_t* offs = (uint64_t*)malloc(sizeof(uint64_t) * (size_t)B);
  cr_assert(p && idx && offs);
  for (int64_t r = 0; r < Bin; ++r) make_dist(p + r * ld, V, r % 4 == 1 ? 1 : r % 4 == 2 ? 2 : 0, &g);
  if (Bin > 3 && V > 1) {
    p[1 * ld + V - 1] = NAN;
    p[3 * ld] += 0.01f; /* outside the default tolerance */
  }
  for (int64_t i = 0; i < B; ++i) {
    idx[i] = (int32_t)tu_randint(&g, Bin);
    offs[i] = 5 + (uint64_t)i % 4;
  }
  fh_filter_options_t o;
  fh_filter_options_init(&o);
  o.seed = 31337;
  o.offset_per_row = offs;
  o.indices_i32 = idx;
  o.num_indices = B;
  o.degenerate_token = V > 2 ? 2 : -1;
  fh_tensor_t hp = {p, FH_DTYPE_F32, Bin, V, ld};
  const size_t n8 = sizeof(int64_t) * (size_t)B, n4 = sizeof(float) * (size_t)B;
  int64_t *rt = (int64_t*)malloc(n8), *rr = (int64_t*)malloc(n8), *rc = (int64_t*)malloc(n8);
  float *rl = (float*)malloc(n4), *rfl = (float*)malloc(n4), *rs = (float*)malloc(n4), *re = (float*)malloc(n4);
  uint32_t* rf = (uint32_t*)malloc(n4);
  int32_t* rt32 = (int32_t*)malloc(n4);
  fh_decode_outputs_t ro = {rt, rl, rfl, rr, rs, re, rc, NULL, NULL, rf};
  fh_context_t *cpu, *gpu;
  cr_assert_eq(fh_context_create(&cpu, FH_BACKEND_CPU, 0), FH_SUCCESS);
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_decode_from_probs(cpu, &o, &hp, &ro, rt32, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  fh_tensor_t dp = hp;
  dp.data = to_device(p, sizeof(float) * (size_t)Bin * ld);
  fh_filter_options_t od = o;
  int32_t* d_idx = (int32_t*)to_device(idx, sizeof(int32_t) * (size_t)B);
  uint64_t* d_offs = (uint64_t*)to_device(offs, n8);
  od.indices_i32 = d_idx;
  od.offset_per_row = d_offs;
  fh_decode_outputs_t go = {(int64_t*)alloc_out(n8), (float*)alloc_out(n4), (float*)alloc_out(n4),
                            (int64_t*)alloc_out(n8), (float*)alloc_out(n4), (float*)alloc_out(n4),
                            (int64_t*)alloc_out(n8), NULL, NULL, (uint32_t*)alloc_out(n4)};
  int32_t* g32 = (int32_t*)alloc_out(n4);
  cr_assert_eq(fh_decode_from_probs(gpu, &od, &dp, &go, g32, NULL, 0), FH_SUCCESS, "%s", fh_last_error());
  cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "%s", fh_last_error());
  int64_t *gt = (int64_t*)fetch_out(go.tokens, n8), *gr = (int64_t*)fetch_out(go.rank, n8);
  int64_t* gc = (int64_t*)fetch_out(go.allowed_count, n8);
  float *gl = (float*)fetch_out(go.logprob, n4), *gfl = (float*)fetch_out(go.full_logprob, n4);
  float *gs = (float*)fetch_out(go.lse, n4), *ge = (float*)fetch_out(go.entropy, n4);
  uint32_t* gf = (uint32_t*)fetch_out(go.flags, n4);
  int32_t* gt32 = (int32_t*)fetch_out(g32, n4);
  int64_t bad = 0;
  for (int64_t i = 0; i < B; ++i) {
    cr_expect(gt[i] == rt[i] && gt32[i] == rt32[i] && gr[i] == rr[i] && gc[i] == rc[i] && gf[i] == rf[i],
              "row %lld: token %lld/%lld rank %lld/%lld count %lld/%lld flags %u/%u", (long long)i, (long long)gt[i],
              (long long)rt[i], (long long)gr[i], (long long)rr[i], (long long)gc[i], (long long)rc[i], gf[i], rf[i]);
    check_float("logprob", gl[i], rl[i], i);
    check_float("full_logprob", gfl[i], rfl[i], i);
    check_float("lse", gs[i], rs[i], i);
    check_float("entropy", ge[i], re[i], i);
    bad += rf[i] != 0;
  }
  if (Bin > 3 && V > 1) cr_expect(bad > 0, "the invalid rows were drawn");
  /* an index outside the input rows, on the device */
  const int32_t out_of_range = (int32_t)Bin;
  cr_assert_eq(cudaMemcpy(d_idx, &out_of_range, sizeof out_of_range, cudaMemcpyHostToDevice),
               cudaSuccess);
  cr_assert_eq(fh_decode_from_probs(gpu, &od, &dp, &go, NULL, NULL, 0), FH_SUCCESS);
  cr_expect_eq(fh_context_check(gpu), FH_ERR_INVALID_ARGUMENT);
  free(gt), free(gr), free(gc), free(gl), free(gfl), free(gs), free(ge), free(gf), free(gt32);
  cudaFree(dp.data), cudaFree(d_idx), cudaFree(d_offs);
  cudaFree(go.tokens), cudaFree(go.logprob), cudaFree(go.full_logprob), cudaFree(go.rank), cudaFree(go.lse);
  cudaFree(go.entropy), cudaFree(go.allowed_count), cudaFree(go.flags), cudaFree(g32);
  free(p), free(idx), free(offs), free(rt), free(rr), free(rc), free(rl), free(rfl), free(rs), free(re), free(rf);
  free(rt32);
  fh_context_destroy(cpu);
  fh_context_destroy(gpu);
}

Test(kernel_decode_probs, from_probs_v1) { probs_case(3, 4, 1, 1); }
Test(kernel_decode_probs, from_probs_small) { probs_case(9, 30, 7, 2); }
Test(kernel_decode_probs, from_probs_large, .timeout = 300) { probs_case(8, 20, 3001, 3); }

/* The filters have no CUDA kernel yet: FH_ERR_UNSUPPORTED, nothing launched. */
Test(kernel_decode_probs, filters_unsupported) {
  fh_context_t* gpu;
  cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS, "%s", fh_last_error());
  float h[4] = {0.25f, 0.25f, 0.25f, 0.25f};
  fh_tensor_t t = fh_tensor_2d(to_device(h, sizeof h), FH_DTYPE_F32, 1, 4);
  fh_tensor_t ot = fh_tensor_2d(alloc_out(sizeof h), FH_DTYPE_F32, 1, 4);
  fh_filter_options_t o;
  fh_filter_options_init(&o);
  o.top_p = 0.5f;
  int64_t* tok = (int64_t*)alloc_out(8);
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  out.tokens = tok;
  cr_expect_eq(fh_decode_from_probs(gpu, &o, &t, &out, NULL, NULL, 0), FH_ERR_UNSUPPORTED);
  cr_expect(strstr(fh_last_error(), "no CUDA kernels for top-k, top-p"), "%s", fh_last_error());
  cr_expect_eq(fh_decode_renorm_probs(gpu, &o, &t, &ot, NULL, NULL, 0), FH_ERR_UNSUPPORTED);
  cr_expect_eq(fh_decode_mask_logits(gpu, &o, &t, &ot, NULL, NULL, 0), FH_ERR_UNSUPPORTED);
  size_t bytes = 1;
  cr_expect_eq(fh_filter_workspace_size(gpu, &o, 1, 4, &bytes), FH_SUCCESS);
  cr_expect_eq(bytes, 0);
  cudaFree(t.data), cudaFree(ot.data), cudaFree(tok);
  fh_context_destroy(gpu);
}
