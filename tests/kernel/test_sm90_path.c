/* kernel_sm90: the sm_90a mainloop (kernels/engine/sm90.cuh, docs/hopper.md) against the sm_80
 * one, on the emulator (compute capability 9.0, FH_HAVE_SM90A: 16-bit operands with 16-byte rows
 * take the sm_90a path unless FH_ENGINE=sm80).
 *
 * - The two mainloops add the same products in the same order (k16 steps in k order, products
 *   onto the accumulator), so the linear CE forward (lse, entropy, per-row loss, argmax), the
 *   deterministic backward (dE, dC, dbias) and the fused top-k (values, ids) are bitwise equal
 *   between them, with gathered rows (ignored targets), a bias, a softcap, partial row blocks,
 *   partial class tiles and K not a multiple of the 64-element block.
 * - Which path ran is checked, not assumed: the emulator's tensor-core FLOPs equal each path's
 *   own tile model (lk_tile_gemm_flops), and they differ between the paths at these shapes.
 * - The classifier is read exactly once per 128-row block by either path (TMA on sm_90a,
 *   cp.async on sm_80), counted by the emulator over C's address range; by default the sm_90a
 *   linear CE forward runs in clusters of 2 CTAs that multicast halves of each classifier tile,
 *   and reads it once per cluster (FH_MULTICAST=0 runs one CTA per row block), with results
 *   bitwise equal to both others.
 * - The linear CE forward's and backward's default on sm_90a is the warp-specialized loop
 *   (engine/sm90_ws.cuh); FH_WS=0 keeps the tma90 loop. The two are bitwise equal, told apart by
 *   the producer warpgroup's 128 extra threads per tile CTA, and the warp-specialized one passes
 *   fewer __syncthreads (the emulator's counters).
 * - Distillation: both heads' tiles, forward and deterministic backward, bitwise likewise. */
#define _POSIX_C_SOURCE 200809L /* setenv, unsetenv */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "dtype.h"
#include "fh_emu.h"
#include "test_distill_common.h"
#include "test_linear_ce_common.h"
#include "test_util.h"

static const fh_dtype_t DT[2] = {FH_DTYPE_BF16, FH_DTYPE_F16};
static const char* DN[2] = {"bf16", "f16"};

/* sm90: 0 the sm_80 loop (FH_ENGINE=sm80), 1 the sm_90a loop one CTA per row block
 * (FH_MULTICAST=0), 2 the default: sm_90a, the linear CE forward and backward warp-specialized,
 * the forward in clusters of 2, 3 the same on the tma90 loop (FH_WS=0). */
static void use_engine(int sm90) {
  if (sm90) unsetenv("FH_ENGINE");
  else setenv("FH_ENGINE", "sm80", 1);
  if (sm90 == 1) setenv("FH_MULTICAST", "0", 1);
  else unsetenv("FH_MULTICAST");
  if (sm90 == 3) setenv("FH_WS", "0", 1);
  else unsetenv("FH_WS");
}

typedef struct path_out {
  lk_fwd_t f;
  lk_grads_t g;
  int64_t nv;         /* valid rows */
  uint64_t fwd_flops; /* tensor-core FLOPs of the forward */
  uint64_t c_bytes;   /* bytes of C read by the forward (cp.async or TMA) */
  /* per pass (0 forward, 1 backward): threads its launches ran (384 per tile CTA
   * warp-specialized), its completed __syncthreads and named-barrier phases */
  uint64_t threads[2], bars[2], named[2];
} path_out_t;

static void run_path(int64_t N, int64_t V, int64_t D, int dt, float softcap, int sm90, path_out_t* o) {
  use_engine(sm90);
  lk_spec_t s = lk_default(N, V, D, DT[dt]);
  s.bias = 1;
  lk_problem_t P;
  lk_init(&P, &s);
  P.f.opt.accum_mode = FH_ACCUM_DETERMINISTIC;
  P.f.opt.filter_eps = 0.0f;
  P.f.opt.softcap = softcap;
  o->nv = 0;
  for (int64_t i = 0; i < N; ++i) o->nv += P.f.targets[i] != P.f.opt.ignore_index;
  fh_context_t* ctx = NULL;
  cr_assert_eq(fh_context_create(&ctx, FH_BACKEND_CUDA, 0), FH_SUCCESS);
  float* lse = malloc(sizeof(float) * (size_t)N);
  float* ent = malloc(sizeof(float) * (size_t)N);
  lk_fwd_alloc(&o->f, N);
  lk_grads_alloc(&o->g, &P);
  fh_emu_watch_global(P.C, (uint64_t)(V * D) * fh_dtype_size(DT[dt]));
  fh_emu_reset_counters();
  cr_assert_eq(lk_run_forward(ctx, &P, &o->f, lse, ent), FH_SUCCESS);
  const fh_emu_counters_t c = fh_emu_total_counters();
  o->fwd_flops = c.mma_flops, o->c_bytes = c.bytes_g2s_watched;
  o->threads[0] = c.threads, o->bars[0] = c.barriers, o->named[0] = c.named_barriers;
  fh_emu_watch_global(NULL, 0);
  lk_bwd_in_t in;
  lk_bwd_in_make(&in, &P, 1, 7);
  fh_emu_reset_counters();
  cr_assert_eq(lk_run_backward(ctx, &P, &in, lse, ent, 7, NULL, &o->g), FH_SUCCESS);
  const fh_emu_counters_t cb = fh_emu_total_counters();
  o->threads[1] = cb.threads, o->bars[1] = cb.barriers, o->named[1] = cb.named_barriers;
  lk_bwd_in_free(&in);
  free(lse), free(ent);
  fh_context_destroy(ctx);
  lk_free(&P);
  unsetenv("FH_ENGINE");
  unsetenv("FH_MULTICAST");
  unsetenv("FH_WS");
}

static void free_path(path_out_t* o) {
  lk_fwd_free(&o->f);
  lk_grads_free(&o->g);
}

/* The default path (ws) against FH_WS=0 (nows) on one pass of the linear CE: 128 more threads per
 * tile CTA (ctas of them), and consumers that meet at no CTA barrier per k-block: the
 * warp-specialized pass's __syncthreads (only before the roles split: the ring's set-up and end,
 * the class-owner kernel's row range) do not grow with K or the tiles, the tma90 loop's do. */
static void check_ws_pass(const path_out_t* ws, const path_out_t* nows, int pass, uint64_t ctas, int dt, int64_t N,
                          int64_t V, int64_t D) {
  static const char* PASS[2] = {"forward", "backward"};
  cr_expect_eq(ws->threads[pass] - nows->threads[pass], ctas * 128u,
               "%s: the default %s is not the warp-specialized one (%llu threads against %llu)", DN[dt], PASS[pass],
               (unsigned long long)ws->threads[pass], (unsigned long long)nows->threads[pass]);
  printf("sm90 path %s N=%lld V=%lld D=%lld: %s __syncthreads %llu (tma90 loop) vs %llu (warp-specialized, "
         "+%llu named-barrier phases)\n", DN[dt], (long long)N, (long long)V, (long long)D, PASS[pass],
         (unsigned long long)nows->bars[pass], (unsigned long long)ws->bars[pass], (unsigned long long)ws->named[pass]);
  cr_expect_lt(ws->bars[pass], nows->bars[pass], "%s: the warp-specialized %s passes as many CTA barriers", DN[dt],
               PASS[pass]);
  cr_expect_eq(nows->named[pass], 0u, "%s: the tma90 %s uses no named barrier", DN[dt], PASS[pass]);
}

static void compare_lce(int64_t N, int64_t V, int64_t D, float softcap) {
  static const char* PN[4] = {"sm_80", "sm_90a", "sm_90a in clusters of 2", "sm_90a tma90 loop (FH_WS=0)"};
  for (int dt = 0; dt < 2; ++dt) {
    path_out_t o[4]; /* by use_engine's mode; o[0] (sm_80) is the reference */
    for (int m = 0; m < 4; ++m) run_path(N, V, D, dt, softcap, m, &o[m]);
    const int64_t nv = o[0].nv, rb = (nv + 127) / 128;
    const uint64_t c_tile = (uint64_t)(V * D) * fh_dtype_size(DT[dt]);
    /* The warp-specialized forward's tile CTAs have a producer warpgroup: 128 more threads each,
     * over ceil(N / 128) row blocks (even in clusters) x S = ceil(V / 128) splits (V <= 2048). */
    const int mc2 = N > 128 && lk_multicast_on();
    const uint64_t gx = (uint64_t)((N + 127) / 128), ctas = (mc2 ? gx + (gx & 1u) : gx) * (uint64_t)((V + 127) / 128);
    /* The deterministic backward: the row-owner kernel over ceil(N / 128) blocks and the
     * class-owner kernel over the class tiles, each CTA with a producer warpgroup too. */
    const uint64_t bctas = gx + (uint64_t)((V + 127) / 128);
    for (int pass = 0; pass < 2; ++pass)
      check_ws_pass(&o[2], &o[3], pass, pass ? bctas : ctas, dt, N, V, D);
    for (int m = 0; m < 4; ++m) {
      /* clusters when the grid has two row blocks or more and the device schedules clusters */
      const int mc = m >= 2 && N > 128 && lk_multicast_on();
      const uint64_t flops = lk_tile_gemm_flops(nv, V, D, DT[dt], mc ? 2 : (m ? 1 : 0));
      /* C once per row block, or once per cluster of two (multicast) */
      const uint64_t c_model = (uint64_t)(mc ? (rb + 1) / 2 : rb) * c_tile;
      printf("sm90 path %s N=%lld (valid %lld) V=%lld D=%lld softcap %g, %s: forward FLOPs %llu (model %llu), C bytes "
             "read %llu (model %llu)\n",
             DN[dt], (long long)N, (long long)nv, (long long)V, (long long)D, (double)softcap, PN[m],
             (unsigned long long)o[m].fwd_flops, (unsigned long long)flops, (unsigned long long)o[m].c_bytes,
             (unsigned long long)c_model);
      cr_expect_eq(o[m].fwd_flops, flops, "%s: %s did not run its tiles", DN[dt], PN[m]);
      cr_expect_eq(o[m].c_bytes, c_model, "%s: %s reads C other than its model", DN[dt], PN[m]);
      if (m == 0) continue;
      cr_expect(lk_same_bits(o[m].f.lse, o[0].f.lse, N) && lk_same_bits(o[m].f.entropy, o[0].f.entropy, N),
                "%s: lse / entropy differ between %s and sm_80", DN[dt], PN[m]);
      cr_expect(lk_same_bits(o[m].f.loss_rows, o[0].f.loss_rows, N), "%s: per-row loss differs (%s)", DN[dt], PN[m]);
      cr_expect(memcmp(o[m].f.argmax, o[0].f.argmax, sizeof(int64_t) * (size_t)N) == 0, "%s: argmax differs (%s)",
                DN[dt], PN[m]);
      cr_expect(lk_same_bits(o[m].g.dE, o[0].g.dE, N * D), "%s: dE differs between %s and sm_80", DN[dt], PN[m]);
      cr_expect(lk_same_bits(o[m].g.dC, o[0].g.dC, V * D), "%s: dC differs between %s and sm_80", DN[dt], PN[m]);
      cr_expect(lk_same_bits(o[m].g.db, o[0].g.db, V), "%s: dbias differs between %s and sm_80", DN[dt], PN[m]);
    }
    cr_expect_neq(lk_tile_gemm_flops(nv, V, D, DT[dt], 1), lk_tile_gemm_flops(nv, V, D, DT[dt], 0),
                  "%s: the shape does not tell the loops apart", DN[dt]);
    for (int m = 0; m < 4; ++m) free_path(&o[m]);
  }
}

/* Two row blocks (the second partial), gathered rows, 8 class tiles (the last partial), K = 2
 * blocks of 64 + 8. */
Test(kernel_sm90, linear_ce_paths_agree_bitwise, .timeout = 900) { compare_lce(130, 1000, 136, 0.0f); }
/* One row; softcap; K = 64 exactly; V with a 44-class last tile. */
Test(kernel_sm90, linear_ce_one_row_softcap, .timeout = 900) { compare_lce(1, 300, 64, 30.0f); }
/* 257 rows of which 220 are valid, compacted into two row blocks (128 + 92); two class tiles
 * (one class in the second); K = 3 blocks of 64 + 8. */
Test(kernel_sm90, linear_ce_gathered_rows_k200, .timeout = 900) { compare_lce(257, 129, 200, 0.0f); }
/* Three row blocks (valid rows of 300): in clusters of 2 the fourth CTA has no rows and still
 * loads its half of every classifier tile for its peer; K = one block of 64 + 8. */
Test(kernel_sm90, linear_ce_odd_row_blocks_multicast, .timeout = 900) { compare_lce(300, 300, 72, 0.0f); }
/* K = 8 blocks of 64 + 8: every slot of the 4-slot ring is refilled twice, so in clusters each
 * refill waits for both CTAs to release the slot (the empty mbarriers' two phases). */
Test(kernel_sm90, linear_ce_ring_wraps_multicast, .timeout = 900) { compare_lce(200, 260, 520, 0.0f); }

static void* device_copy(const void* h, size_t bytes) {
  void* d = NULL;
  cr_assert_eq(cudaMalloc(&d, bytes), cudaSuccess);
  cr_assert_eq(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}

/* Fused top-k: B rows, V = 1000, D = 200, k = 50, bias; ties are likely at bf16 precision, so
 * equal ids test the tie order too. */
static void topk_compare(int64_t B) {
  const int64_t V = 1000, D = 200, k = 50;
  /* the default sm_90a launch goes in 2-CTA clusters with two row blocks or more */
  const int m90 = B > 128 && lk_multicast_on() ? 2 : 1;
  for (int dt = 0; dt < 2; ++dt) {
    const fh_dtype_t dtype = DT[dt];
    const size_t es = fh_dtype_size(dtype);
    tu_rng_t rng = {(uint64_t)(9090 + dt)};
    void *hH = malloc((size_t)(B * D) * es), *hC = malloc((size_t)(V * D) * es), *hb = malloc((size_t)V * es);
    for (int64_t i = 0; i < B * D; ++i) fh_store(hH, dtype, i, tu_normal(&rng));
    for (int64_t i = 0; i < V * D; ++i) fh_store(hC, dtype, i, 0.1 * tu_normal(&rng));
    for (int64_t v = 0; v < V; ++v) fh_store(hb, dtype, v, 0.01 * tu_normal(&rng));
    void *dH = device_copy(hH, (size_t)(B * D) * es), *dC = device_copy(hC, (size_t)(V * D) * es),
         *db = device_copy(hb, (size_t)V * es);
    const fh_tensor_t H = fh_tensor_2d(dH, dtype, B, D), C = fh_tensor_2d(dC, dtype, V, D),
                      bias = fh_tensor_2d(db, dtype, 1, V);
    fh_context_t* gpu = NULL;
    cr_assert_eq(fh_context_create(&gpu, FH_BACKEND_CUDA, 0), FH_SUCCESS);
    size_t ws_bytes = 0;
    cr_assert_eq(fh_topk_workspace_size(gpu, B, V, D, k, dtype, &ws_bytes), FH_SUCCESS);
    void* ws = NULL;
    cr_assert_eq(cudaMalloc(&ws, ws_bytes), cudaSuccess);
    float* val[2];
    int64_t* ids[2];
    uint64_t flops[2];
    for (int sm90 = 0; sm90 < 2; ++sm90) {
      float* d_v = NULL;
      int64_t* d_i = NULL;
      cr_assert_eq(cudaMalloc((void**)&d_v, (size_t)(B * k) * sizeof(float)), cudaSuccess);
      cr_assert_eq(cudaMalloc((void**)&d_i, (size_t)(B * k) * sizeof(int64_t)), cudaSuccess);
      use_engine(sm90 ? 2 : 0); /* the default launch on sm_90a */
      fh_emu_reset_counters();
      cr_assert_eq(fh_topk_fused(gpu, &H, &C, &bias, k, d_v, d_i, ws, ws_bytes), FH_SUCCESS, "%s", fh_last_error());
      flops[sm90] = fh_emu_total_counters().mma_flops;
      unsetenv("FH_ENGINE");
      val[sm90] = malloc((size_t)(B * k) * sizeof(float));
      ids[sm90] = malloc((size_t)(B * k) * sizeof(int64_t));
      cr_assert_eq(cudaMemcpy(val[sm90], d_v, (size_t)(B * k) * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
      cr_assert_eq(cudaMemcpy(ids[sm90], d_i, (size_t)(B * k) * sizeof(int64_t), cudaMemcpyDeviceToHost), cudaSuccess);
      cudaFree(d_v), cudaFree(d_i);
    }
    printf("sm90 path top-k %s B=%lld V=%lld D=%lld k=%lld: FLOPs sm_90a %llu (model %llu), sm_80 %llu (model %llu)\n",
           DN[dt], (long long)B, (long long)V, (long long)D, (long long)k, (unsigned long long)flops[1],
           (unsigned long long)lk_tile_gemm_flops(B, V, D, dtype, m90), (unsigned long long)flops[0],
           (unsigned long long)lk_tile_gemm_flops(B, V, D, dtype, 0));
    cr_expect_eq(flops[1], lk_tile_gemm_flops(B, V, D, dtype, m90), "%s: the default path did not run sm_90a", DN[dt]);
    cr_expect_eq(flops[0], lk_tile_gemm_flops(B, V, D, dtype, 0), "%s: FH_ENGINE=sm80 did not run sm_80", DN[dt]);
    for (int64_t i = 0; i < B * k; ++i)
      cr_assert(ids[0][i] == ids[1][i] && memcmp(&val[0][i], &val[1][i], sizeof(float)) == 0,
                "%s: row %lld rank %lld: sm_80 (%lld, %a) vs sm_90a (%lld, %a)", DN[dt], (long long)(i / k),
                (long long)(i % k), (long long)ids[0][i], (double)val[0][i], (long long)ids[1][i], (double)val[1][i]);
    cr_assert_eq(fh_context_check(gpu), FH_SUCCESS, "%s", fh_last_error());
    for (int q = 0; q < 2; ++q) free(val[q]), free(ids[q]);
    cudaFree(ws), cudaFree(dH), cudaFree(dC), cudaFree(db);
    free(hH), free(hC), free(hb);
    fh_context_destroy(gpu);
  }
}

/* Two row blocks: one 2-CTA cluster on the sm_90a path. */
Test(kernel_sm90, topk_paths_agree_bitwise, .timeout = 900) { topk_compare(150); }
/* Three row blocks (the third of 4 rows): two clusters, the last CTA without rows. */
Test(kernel_sm90, topk_odd_row_blocks_multicast, .timeout = 900) { topk_compare(260); }

/* Distillation (JSD, hard term, reduction none): the forward's per-row loss, soft and hard terms
 * and row state, and the deterministic backward's student gradients, bitwise between the
 * mainloops; both heads' tiles (student D 136, teacher D 72) run on the sm_90a path, checked from
 * the forward's FLOPs (two passes over both heads). */
static void distill_compare(void) {
  const int64_t N = 130, V = 300, Ds = 136, Dt = 72;
  for (int dt = 0; dt < 2; ++dt) {
    dk_spec_t s = dk_default(N, V, Ds, V, Dt, DT[dt]);
    dk_problem_t P;
    dk_init(&P, &s);
    int64_t nv = 0;
    for (int64_t i = 0; i < N; ++i) nv += !P.targets || P.targets[i] != -100;
    fh_distill_options_t o = dk_opts(FH_DISTILL_JSD, 0.5f);
    o.accum_mode = FH_ACCUM_DETERMINISTIC;
    dk_out_t out[2];
    dk_grads_t g[2];
    uint64_t flops[2];
    double* gl = dk_make_gl(&P, &o);
    for (int sm90 = 0; sm90 < 2; ++sm90) {
      use_engine(sm90 ? 2 : 0); /* the default launch on sm_90a */
      dk_out_alloc(&out[sm90], N);
      fh_emu_reset_counters();
      cr_assert_eq(dk_run(&P, &o, &out[sm90]), FH_SUCCESS, "%s", fh_last_error());
      flops[sm90] = fh_emu_total_counters().mma_flops;
      dk_grads_alloc(&g[sm90], &P);
      cr_assert_eq(dk_run_backward(&P, &o, out[sm90].state, gl, NULL, &g[sm90]), FH_SUCCESS, "%s", fh_last_error());
      unsetenv("FH_ENGINE");
    }
    /* both forward passes in 2-CTA clusters by default (N > 128: two row blocks in the grid) */
    const int m = N > 128 && lk_multicast_on() ? 2 : 1;
    const uint64_t m90 = 2 * (lk_tile_gemm_flops(nv, V, Ds, DT[dt], m) + lk_tile_gemm_flops(nv, V, Dt, DT[dt], m));
    const uint64_t m80 = 2 * (lk_tile_gemm_flops(nv, V, Ds, DT[dt], 0) + lk_tile_gemm_flops(nv, V, Dt, DT[dt], 0));
    printf("sm90 path distill %s N=%lld (valid %lld) V=%lld Ds=%lld Dt=%lld: forward FLOPs sm_90a %llu (model %llu), "
           "sm_80 %llu (model %llu)\n", DN[dt], (long long)N, (long long)nv, (long long)V, (long long)Ds, (long long)Dt,
           (unsigned long long)flops[1], (unsigned long long)m90, (unsigned long long)flops[0],
           (unsigned long long)m80);
    cr_expect_eq(flops[1], m90, "%s: the default path did not run the sm_90a tiles", DN[dt]);
    cr_expect_eq(flops[0], m80, "%s: FH_ENGINE=sm80 did not run the sm_80 tiles", DN[dt]);
    cr_expect(lk_same_bits(out[0].loss, out[1].loss, N) && lk_same_bits(out[0].soft, out[1].soft, N) &&
                  lk_same_bits(out[0].hard, out[1].hard, N) && lk_same_bits(out[0].state, out[1].state, N),
              "%s: the forward differs between the mainloops", DN[dt]);
    cr_expect(lk_same_bits(g[0].dE, g[1].dE, N * Ds) && lk_same_bits(g[0].dC, g[1].dC, V * Ds) &&
                  lk_same_bits(g[0].db, g[1].db, V),
              "%s: the student's gradients differ between the mainloops", DN[dt]);
    for (int q = 0; q < 2; ++q) dk_out_free(&out[q]), dk_grads_free(&g[q]);
    free(gl);
    dk_free(&P);
  }
}
Test(kernel_sm90, distill_paths_agree_bitwise, .timeout = 900) { distill_compare(); }

/* A device that schedules no 2-CTA cluster (FH_EMU_MAX_CLUSTERS=0: the occupancy query answers 0
 * and a cluster launch fails): each launch that would multicast (the linear CE forward, the fused
 * top-k, both distillation passes) takes the single-CTA sm_90a loop instead, with the same bits,
 * C read once per row block and the single-CTA FLOPs (the models follow lk_multicast_on). */
Test(kernel_sm90, clusters_refused_fall_back_to_one_cta, .timeout = 900) {
  setenv("FH_EMU_MAX_CLUSTERS", "0", 1);
  compare_lce(300, 300, 72, 0.0f);
  topk_compare(150);
  distill_compare();
  unsetenv("FH_EMU_MAX_CLUSTERS");
}
