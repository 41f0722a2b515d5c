/* bench_decode: fused decoding (fh_decode_fused) against the unfused path a serving engine runs
 * (cuBLAS logits, then fh_decode_from_logits), and the CPU reference's time.
 *
 * Prints CSV on stdout (lines starting with '#' are comments):
 *   kind=cpu  measured wall time of the CPU reference backend's fh_decode_fused at a small shape
 *             (median of --cpu-reps runs after one warm-up; not a GPU number).
 *   kind=gpu  (only when the CUDA backend is built and a device exists) measured with CUDA events
 *             on the default stream, at the LLM shapes (V, D) = (128256, 4096) and
 *             (256000, 2304), B in {1, 16, 64, 256}, bf16, for two option sets: "temperature"
 *             (T = 1: every id kept) and "top_k_top_p" (T = 0.8, top-k 50, top-p 0.9):
 *               fused     fh_decode_fused on H, C (no bias), all outputs but the top-n;
 *               unfused   fh_baseline_logits (fp32 logits [B x V], one cuBLAS GEMM) then
 *                         fh_decode_from_logits on them, the same outputs.
 *             --warmup untimed calls, then --gpu-reps timed calls, each after an L2 flush (a
 *             memset of a buffer of twice the L2 size, outside the timed region); time_ms = the
 *             median, spread_ms = max − min. floor_ms = V·D·2 bytes at the GPU's HBM bandwidth
 *             (from a table of known parts by name; empty otherwise). fallback_rows = the rows
 *             the fused call decoded by its exact second pass (FH_DECODE_FLAG_SECOND_PASS, last
 *             call). token_mismatch = rows whose fused token differs from the unfused one (the
 *             logits differ by GEMM summation order, so a few may, at near ties); ws_bytes =
 *             the workspace query (unfused: plus the logits).
 * Columns: kind,sampler,B,V,D,dtype,impl,time_ms,spread_ms,floor_ms,fallback_rows,token_mismatch,
 *          ws_bytes,device,commit,note
 *
 *   bench_decode [--gpu-reps N] [--warmup N] [--cpu-reps N] [--no-cpu] [--no-gpu]
 * scripts/gpu_check.sh runs it on a GPU machine (docs/gpu_check.md). */
#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"
#include "fusedhead.h"
#ifdef FH_HAVE_CUDA
#include "../kernels/baseline_lce.h"
#include "bench_cuda.h"
#endif

static void die(const char* what) {
  fprintf(stderr, "bench_decode: %s failed: %s\n", what, fh_last_error());
  exit(1);
}

/* The two option sets of the GPU rows (the CPU row uses the second). */
static void options_of(int top, fh_decode_options_t* o) {
  fh_decode_options_init(o);
  o->seed = 1234;
  o->offset = 7;
  if (top) o->temperature = 0.8f, o->top_k = 50, o->top_p = 0.9f;
}

static void cpu_run(int reps) {
  const int64_t B = 4, V = 32000, D = 256;
  fh_context_t* ctx = NULL;
  if (fh_context_create(&ctx, FH_BACKEND_CPU, 0) != FH_SUCCESS) die("context");
  float* H = malloc(sizeof(float) * (size_t)(B * D));
  float* C = malloc(sizeof(float) * (size_t)(V * D));
  int64_t* tok = malloc(sizeof(int64_t) * (size_t)B);
  double* t = malloc(sizeof(double) * (size_t)(reps + 1));
  if (!H || !C || !tok || !t) die("malloc");
  uint64_t st = 42;
  for (int64_t k = 0; k < B * D; ++k) st = st * 6364136223846793005ull + 1, H[k] = (float)((st >> 40) % 1000) / 500.0f - 1.0f;
  for (int64_t k = 0; k < V * D; ++k) st = st * 6364136223846793005ull + 1, C[k] = (float)((st >> 40) % 1000) / 4000.0f - 0.125f;
  const fh_tensor_t tH = fh_tensor_2d(H, FH_DTYPE_F32, B, D), tC = fh_tensor_2d(C, FH_DTYPE_F32, V, D);
  fh_decode_options_t o;
  options_of(1, &o);
  fh_decode_outputs_t out;
  memset(&out, 0, sizeof out);
  out.tokens = tok;
  for (int r = -1; r < reps; ++r) { /* r = -1: warm-up */
    const double t0 = bu_now_ms();
    if (fh_decode_fused(ctx, &o, &tH, &tC, NULL, &out, NULL, 0) != FH_SUCCESS) die("fh_decode_fused (CPU)");
    if (r >= 0) t[r] = bu_now_ms() - t0;
  }
  qsort(t, (size_t)reps, sizeof(double), bu_cmp_double);
  printf("cpu,top_k_top_p,%lld,%lld,%lld,f32,cpu-reference,%.3f,%.3f,,,,0,cpu,%s,measured: median of %d (fp64 "
         "reference; not a GPU number)\n",
         (long long)B, (long long)V, (long long)D, t[reps / 2], t[reps - 1] - t[0], FH_GIT_COMMIT, reps);
  free(H), free(C), free(tok), free(t);
  fh_context_destroy(ctx);
}

#ifdef FH_HAVE_CUDA
/* HBM bandwidth of known parts, bytes/s (NVIDIA datasheets); 0 when the name is not listed. */
static double hbm_bandwidth(const char* name) {
  if (strstr(name, "H200")) return 4.8e12;
  if (strstr(name, "H100") && strstr(name, "PCIe")) return 2.0e12;
  if (strstr(name, "H100")) return 3.35e12;
  if (strstr(name, "A100")) return 2.039e12;
  if (strstr(name, "B200")) return 8.0e12;
  return 0.0;
}

typedef struct gpu_bufs {
  fh_decode_outputs_t out;
  int64_t *tok, *rank, *cnt;
  float *lp, *flp, *lse, *ent;
  uint32_t* flags;
} gpu_bufs_t;

static int bufs_alloc(gpu_bufs_t* g, int64_t B) {
  memset(g, 0, sizeof *g);
  g->tok = bc_malloc(8 * (size_t)B), g->rank = bc_malloc(8 * (size_t)B), g->cnt = bc_malloc(8 * (size_t)B);
  g->lp = bc_malloc(4 * (size_t)B), g->flp = bc_malloc(4 * (size_t)B), g->lse = bc_malloc(4 * (size_t)B);
  g->ent = bc_malloc(4 * (size_t)B), g->flags = bc_malloc(4 * (size_t)B);
  const fh_decode_outputs_t o = {g->tok, g->lp, g->flp, g->rank, g->lse, g->ent, g->cnt, NULL, NULL, g->flags};
  g->out = o;
  return g->tok && g->rank && g->cnt && g->lp && g->flp && g->lse && g->ent && g->flags;
}
static void bufs_free(gpu_bufs_t* g) {
  bc_free(g->tok), bc_free(g->rank), bc_free(g->cnt), bc_free(g->lp), bc_free(g->flp), bc_free(g->lse);
  bc_free(g->ent), bc_free(g->flags);
}

typedef struct shape_run {
  fh_context_t* ctx;
  const fh_decode_options_t* o;
  fh_tensor_t H, C, Z;
  fh_baseline_lce_args_t a;
  gpu_bufs_t* g;
  void* ws;
  size_t ws_bytes;
  int fused;
} shape_run_t;

static int run_once(const shape_run_t* r) {
  if (r->fused) return fh_decode_fused(r->ctx, r->o, &r->H, &r->C, NULL, &r->g->out, r->ws, r->ws_bytes) != FH_SUCCESS;
  if (fh_baseline_logits(r->ctx, &r->a, (float*)r->Z.data) != FH_SUCCESS) return 1;
  return fh_decode_from_logits(r->ctx, r->o, &r->Z, &r->g->out, r->ws, r->ws_bytes) != FH_SUCCESS;
}

/* Median and spread of reps timed calls, each after an L2 flush; < 0 on failure. */
static double time_calls(const shape_run_t* r, void* flush, size_t flush_bytes, int warmup, int reps, double* spread) {
  bc_timer_t* tm = bc_timer_create();
  double* t = malloc(sizeof(double) * (size_t)reps);
  double med = -1.0;
  if (!tm || !t) goto done;
  for (int i = 0; i < warmup; ++i)
    if (run_once(r)) goto done;
  for (int i = 0; i < reps; ++i) {
    if (flush && bc_memset(flush, i & 0xff, flush_bytes)) goto done;
    if (bc_timer_start(tm) || run_once(r)) goto done;
    if ((t[i] = bc_timer_stop_ms(tm)) < 0) goto done;
  }
  if (fh_context_check(r->ctx) != FH_SUCCESS) goto done;
  qsort(t, (size_t)reps, sizeof(double), bu_cmp_double);
  med = t[reps / 2];
  *spread = t[reps - 1] - t[0];
done:
  free(t);
  bc_timer_destroy(tm);
  return med;
}

static void gpu_run(int warmup, int reps) {
  fh_context_t* ctx = NULL;
  if (fh_context_create(&ctx, FH_BACKEND_CUDA, 0) != FH_SUCCESS) {
    printf("# gpu: no CUDA context (%s): no GPU time printed\n", fh_last_error());
    return;
  }
  bc_device_info_t di;
  if (bc_device_info(0, &di)) die("device info");
  const double bw = hbm_bandwidth(di.name);
  printf("# gpu: %s, cc %d.%d, L2 %.0f MiB, driver %d, runtime %d\n", di.name, di.cc_major, di.cc_minor,
         di.l2_bytes / 1048576.0, di.driver_version, di.runtime_version);
  const size_t flush_bytes = 2 * di.l2_bytes;
  void* flush = flush_bytes ? bc_malloc(flush_bytes) : NULL;
  static const int64_t SH[2][2] = {{128256, 4096}, {256000, 2304}}, BS[4] = {1, 16, 64, 256};
  static const char* const SAMPLER[2] = {"temperature", "top_k_top_p"};
  for (int s = 0; s < 2; ++s) {
    const int64_t V = SH[s][0], D = SH[s][1];
    void* C = bc_malloc((size_t)(V * D) * 2);
    if (!C) {
      printf("# skip V=%lld D=%lld: out of device memory for C\n", (long long)V, (long long)D);
      continue;
    }
    if (bc_fill_uniform(C, FH_DTYPE_BF16, V * D, 6.0f / 64.0f, 11)) die("fill C");
    for (int bi = 0; bi < 4; ++bi) {
      const int64_t B = BS[bi];
      void* H = bc_malloc((size_t)(B * D) * 2);
      float* Z = bc_malloc((size_t)(B * V) * 4);
      gpu_bufs_t g;
      if (!H || !Z || !bufs_alloc(&g, B)) die("device allocation");
      if (bc_fill_uniform(H, FH_DTYPE_BF16, B * D, 1.0f, 13 + (uint64_t)B)) die("fill H");
      int64_t* tok[2] = {malloc(8 * (size_t)B), malloc(8 * (size_t)B)};
      uint32_t* flags = malloc(4 * (size_t)B);
      if (!tok[0] || !tok[1] || !flags) die("malloc");
      memset(flags, 0, 4 * (size_t)B);
      for (int64_t b = 0; b < B; ++b) tok[0][b] = tok[1][b] = -1;
      for (int k = 0; k < 2; ++k) {
        fh_decode_options_t o;
        options_of(k, &o);
        double ms[2] = {-1.0, -1.0}, spread[2] = {0.0, 0.0};
        size_t wsb[2] = {0, 0};
        for (int f = 0; f < 2; ++f) { /* f = 1: fused */
          shape_run_t r;
          memset(&r, 0, sizeof r);
          r.ctx = ctx, r.o = &o, r.g = &g, r.fused = f;
          r.H = fh_tensor_2d(H, FH_DTYPE_BF16, B, D), r.C = fh_tensor_2d(C, FH_DTYPE_BF16, V, D);
          r.Z = fh_tensor_2d(Z, FH_DTYPE_F32, B, V);
          r.a.N = B, r.a.V = V, r.a.D = D, r.a.dtype = FH_DTYPE_BF16, r.a.E = H, r.a.lde = D, r.a.C = C, r.a.ldc = D;
          r.a.reduction = FH_REDUCTION_MEAN;
          if (fh_decode_workspace_size(ctx, &o, B, V, f ? D : 0, FH_DTYPE_BF16, &wsb[f]) != FH_SUCCESS)
            die("fh_decode_workspace_size");
          r.ws_bytes = wsb[f];
          r.ws = wsb[f] ? bc_malloc(wsb[f]) : NULL;
          if (wsb[f] && !r.ws) {
            printf("# skip %s B=%lld V=%lld: out of device memory for the workspace\n", f ? "fused" : "unfused",
                   (long long)B, (long long)V);
            continue;
          }
          ms[f] = time_calls(&r, flush, flush_bytes, warmup, reps, &spread[f]);
          if (ms[f] < 0) printf("# %s B=%lld V=%lld failed: %s\n", f ? "fused" : "unfused", (long long)B, (long long)V,
                                fh_last_error());
          if (ms[f] >= 0 && (bc_copy_to_host(tok[f], g.tok, 8 * (size_t)B) ||
                             (f && bc_copy_to_host(flags, g.flags, 4 * (size_t)B))))
            die("copy to host");
          bc_free(r.ws);
        }
        int64_t second = 0, mismatch = 0;
        for (int64_t b = 0; b < B; ++b) {
          second += (flags[b] & FH_DECODE_FLAG_SECOND_PASS) != 0;
          mismatch += tok[0][b] != tok[1][b];
        }
        const double floor_ms = bw > 0 ? (double)(V * D) * 2.0 / bw * 1e3 : -1.0;
        for (int f = 0; f < 2; ++f) {
          if (ms[f] < 0) continue;
          char fl[32] = "";
          if (floor_ms > 0) snprintf(fl, sizeof fl, "%.4f", floor_ms);
          printf("gpu,%s,%lld,%lld,%lld,bf16,%s,%.4f,%.4f,%s,%lld,%lld,%zu,%s,%s,measured: median of %d after an L2 "
                 "flush\n",
                 SAMPLER[k], (long long)B, (long long)V, (long long)D, f ? "fused" : "unfused", ms[f], spread[f], fl,
                 f ? (long long)second : 0LL, (long long)mismatch, wsb[f] + (f ? 0 : (size_t)(B * V) * 4), di.name,
                 FH_GIT_COMMIT, reps);
        }
        fflush(stdout);
      }
      free(tok[0]), free(tok[1]), free(flags);
      bufs_free(&g);
      bc_free(H), bc_free(Z);
    }
    bc_free(C);
  }
  bc_free(flush);
  fh_context_destroy(ctx);
}
#endif

int main(int argc, char** argv) {
  int gpu_reps = 10, warmup = 3, cpu_reps = 3, cpu = 1, gpu = 1;
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "--gpu-reps") && i + 1 < argc) gpu_reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--cpu-reps") && i + 1 < argc) cpu_reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--no-cpu")) cpu = 0;
    else if (!strcmp(argv[i], "--no-gpu")) gpu = 0;
    else {
      fprintf(stderr, "usage: bench_decode [--gpu-reps N] [--warmup N] [--cpu-reps N] [--no-cpu] [--no-gpu]\n");
      return 2;
    }
  }
  if (gpu_reps < 1) gpu_reps = 1;
  if (cpu_reps < 1) cpu_reps = 1;
  if (warmup < 0) warmup = 0;
  printf("kind,sampler,B,V,D,dtype,impl,time_ms,spread_ms,floor_ms,fallback_rows,token_mismatch,ws_bytes,device,commit,"
         "note\n");
#ifdef FH_HAVE_CUDA
  if (gpu) gpu_run(warmup, gpu_reps);
#else
  (void)gpu, (void)warmup, (void)gpu_reps;
  printf("# gpu: the CUDA backend is not built: no GPU time printed\n");
#endif
  if (cpu) cpu_run(cpu_reps);
  return 0;
}
