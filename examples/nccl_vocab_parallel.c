/* A vocabulary-parallel linear cross-entropy over NCCL: one process per GPU, each holding a slice
 * of the classifier C (uneven sizes), the collectives of fusedhead_shard.h issued with NCCL.
 *
 *   torchrun --nproc_per_node=NGPUS --no-python ./build/nccl_vocab_parallel [N D V]
 *
 * (or any launcher that sets RANK, WORLD_SIZE and LOCAL_RANK). Rank 0 writes the NCCL unique id
 * to $FH_NCCL_ID_FILE (default /tmp/fusedhead_nccl_id.<TORCHELASTIC_RUN_ID>.<MASTER_PORT>), which
 * every rank must be able to read: one machine, or a shared directory.
 *
 * Steps, per training step (docs/distributed.md):
 *   forward   fh_linear_ce_shard_forward -> partials [N x 9] fp64
 *             ncclAllGather(partials)                          72 bytes per row per rank
 *             fh_linear_ce_shard_combine -> loss, lse (the same on every rank)
 *   backward  fh_linear_ce_shard_backward(gathered partials) -> dC of this slice (final) and a
 *             part of dE
 *             ncclAllReduce(dE, sum)                           4·D bytes per row (fp32)
 * This version of fusedhead runs the shard calls on the CPU reference backend only, so the
 * partials and dE are staged through host memory; once the CUDA backend has shard kernels the
 * same calls take device pointers and the copies go away. Rank 0 checks the result against the
 * single-device op on the whole head and exits nonzero on a mismatch. */
#define _POSIX_C_SOURCE 200809L /* nanosleep under -std=c11 */
#include <cuda_runtime.h>
#include <math.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fusedhead.h"

#define CUDA_OK(x) check_cuda((x), #x)
#define NCCL_OK(x) check_nccl((x), #x)
#define FH_OK(x) check_fh((x), #x)

static void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    exit(2);
  }
}
static void check_nccl(ncclResult_t e, const char* what) {
  if (e != ncclSuccess) {
    fprintf(stderr, "%s: %s\n", what, ncclGetErrorString(e));
    exit(2);
  }
}
static void check_fh(fh_status_t s, const char* what) {
  if (s != FH_SUCCESS) {
    fprintf(stderr, "%s: %s: %s\n", what, fh_status_string(s), fh_last_error());
    exit(2);
  }
}

static int env_int(const char* name, int fallback) {
  const char* v = getenv(name);
  return v && *v ? atoi(v) : fallback;
}

/* The same pseudo-random inputs on every rank (each then keeps its slice of C). */
static float rnd(uint64_t* s) {
  *s = *s * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((double)(*s >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

/* Rank 0 creates the NCCL id and publishes it through a file (write, then rename: atomic); it
 * removes the file once every rank has joined (after ncclCommInitRank), so no later run reads a
 * stale id. */
static ncclUniqueId share_id(int rank, char* path, size_t cap) {
  char tmp[600];
  const char* f = getenv("FH_NCCL_ID_FILE");
  const char* run = getenv("TORCHELASTIC_RUN_ID");
  if (f)
    snprintf(path, cap, "%s", f);
  else
    snprintf(path, cap, "/tmp/fusedhead_nccl_id.%s.%d", run ? run : "run", env_int("MASTER_PORT", 0));
  ncclUniqueId id;
  if (rank == 0) {
    NCCL_OK(ncclGetUniqueId(&id));
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE* out = fopen(tmp, "wb");
    if (!out || fwrite(&id, sizeof id, 1, out) != 1 || fclose(out) != 0 || rename(tmp, path) != 0) {
      fprintf(stderr, "cannot write %s\n", path);
      exit(2);
    }
    return id;
  }
  for (int tries = 0; tries < 600; ++tries) { /* 60 s */
    FILE* in = fopen(path, "rb");
    if (in) {
      const size_t got = fread(&id, sizeof id, 1, in);
      fclose(in);
      if (got == 1) return id;
    }
    const struct timespec tenth = {0, 100000000L};
    nanosleep(&tenth, NULL);
  }
  fprintf(stderr, "rank %d: no NCCL id in %s after 60 s\n", rank, path);
  exit(2);
}

int main(int argc, char** argv) {
  const int rank = env_int("RANK", 0), world = env_int("WORLD_SIZE", 1), local = env_int("LOCAL_RANK", 0);
  const int64_t N = argc > 1 ? atoll(argv[1]) : 64, D = argc > 2 ? atoll(argv[2]) : 128,
                V = argc > 3 ? atoll(argv[3]) : 1001;
  CUDA_OK(cudaSetDevice(local));
  char id_path[512];
  ncclUniqueId id = share_id(rank, id_path, sizeof id_path);
  ncclComm_t comm;
  NCCL_OK(ncclCommInitRank(&comm, world, id, rank));
  if (rank == 0) remove(id_path);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));

  /* Inputs: E, targets the same everywhere; this rank's contiguous slice of C (uneven). */
  float* E = (float*)malloc(sizeof(float) * (size_t)(N * D));
  float* C = (float*)malloc(sizeof(float) * (size_t)(V * D));
  int64_t* y = (int64_t*)malloc(sizeof(int64_t) * (size_t)N);
  uint64_t s = 42;
  for (int64_t k = 0; k < N * D; ++k) E[k] = rnd(&s);
  for (int64_t k = 0; k < V * D; ++k) C[k] = 0.2f * rnd(&s);
  for (int64_t i = 0; i < N; ++i) y[i] = i % 9 == 4 ? -100 : (int64_t)(s = s * 2862933555777941757ull + 3) % V;
  const int64_t base = V / world, extra = V % world;
  const int64_t start = rank * base + (rank < extra ? rank : extra), nloc = base + (rank < extra);
  fh_shard_t shard = {start, nloc, V};

  fh_context_t* ctx;
  FH_OK(fh_context_create(&ctx, FH_BACKEND_CPU, 0));
  fh_linear_ce_options_t o;
  fh_linear_ce_options_init(&o);
  o.label_smoothing = 0.1f;
  o.z_loss_scale = 1e-4f;
  fh_tensor_t tE = fh_tensor_2d(E, FH_DTYPE_F32, N, D), tC = fh_tensor_2d(C + start * D, FH_DTYPE_F32, nloc, D);

  /* Forward: partials, one all-gather, the merge. */
  const size_t pw = (size_t)(N * FH_SHARD_LCE_PARTIAL);
  double* part = (double*)malloc(sizeof(double) * pw);
  double* gathered = (double*)malloc(sizeof(double) * pw * (size_t)world);
  FH_OK(fh_linear_ce_shard_forward(ctx, &o, &shard, &tE, &tC, NULL, y, NULL, NULL, part));
  double *d_part, *d_gathered;
  CUDA_OK(cudaMalloc((void**)&d_part, sizeof(double) * pw));
  CUDA_OK(cudaMalloc((void**)&d_gathered, sizeof(double) * pw * (size_t)world));
  CUDA_OK(cudaMemcpyAsync(d_part, part, sizeof(double) * pw, cudaMemcpyHostToDevice, stream));
  NCCL_OK(ncclAllGather(d_part, d_gathered, pw, ncclDouble, comm, stream));
  CUDA_OK(cudaMemcpyAsync(gathered, d_gathered, sizeof(double) * pw * (size_t)world, cudaMemcpyDeviceToHost, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  float loss, *lse = (float*)malloc(sizeof(float) * (size_t)N);
  fh_linear_ce_outputs_t out = {&loss, lse, NULL, NULL, NULL, NULL};
  FH_OK(fh_linear_ce_shard_combine(ctx, &o, FH_DTYPE_F32, N, V, world, gathered, y, NULL, NULL, &out));

  /* Backward: this slice's dC, a part of dE (the row statistics merged from `gathered` in fp64,
   * so lse is not read); one all-reduce of dE. */
  float one = 1.0f, *dE = (float*)malloc(sizeof(float) * (size_t)(N * D));
  float* dC = (float*)malloc(sizeof(float) * (size_t)((nloc > 0 ? nloc : 1) * D));
  fh_tensor_t gE = fh_tensor_2d(dE, FH_DTYPE_F32, N, D), gC = fh_tensor_2d(dC, FH_DTYPE_F32, nloc, D);
  fh_linear_ce_grad_inputs_t in = {lse, NULL, &one, NULL};
  fh_linear_ce_grads_t g = {&gE, &gC, NULL};
  FH_OK(fh_linear_ce_shard_backward(ctx, &o, &shard, &tE, &tC, NULL, y, NULL, NULL, world, gathered, &in, &g));
  float* d_dE;
  CUDA_OK(cudaMalloc((void**)&d_dE, sizeof(float) * (size_t)(N * D)));
  CUDA_OK(cudaMemcpyAsync(d_dE, dE, sizeof(float) * (size_t)(N * D), cudaMemcpyHostToDevice, stream));
  NCCL_OK(ncclAllReduce(d_dE, d_dE, (size_t)(N * D), ncclFloat, ncclSum, comm, stream));
  CUDA_OK(cudaMemcpyAsync(dE, d_dE, sizeof(float) * (size_t)(N * D), cudaMemcpyDeviceToHost, stream));
  CUDA_OK(cudaStreamSynchronize(stream));

  int rc = 0;
  if (rank == 0) { /* the single-device op on the whole head */
    float loss1, *lse1 = (float*)malloc(sizeof(float) * (size_t)N), *dE1 = (float*)malloc(sizeof(float) * (size_t)(N * D));
    fh_tensor_t tCall = fh_tensor_2d(C, FH_DTYPE_F32, V, D), gE1 = fh_tensor_2d(dE1, FH_DTYPE_F32, N, D);
    fh_linear_ce_outputs_t out1 = {&loss1, lse1, NULL, NULL, NULL, NULL};
    FH_OK(fh_linear_ce_forward(ctx, &o, &tE, &tCall, NULL, y, NULL, NULL, &out1, NULL, 0));
    fh_linear_ce_grad_inputs_t in1 = {lse1, NULL, &one, NULL};
    fh_linear_ce_grads_t g1 = {&gE1, NULL, NULL};
    FH_OK(fh_linear_ce_backward(ctx, &o, &tE, &tCall, NULL, y, NULL, NULL, &in1, &g1, NULL, 0));
    double err = 0.0, scale = 0.0;
    for (int64_t k = 0; k < N * D; ++k) {
      err = fmax(err, fabs((double)dE[k] - dE1[k]));
      scale = fmax(scale, fabs((double)dE1[k]));
    }
    /* fp32 outputs of fp64 sums; dE adds `world` fp32 parts: a few ulps of the largest entry. */
    const int ok = fabs((double)loss - loss1) <= 1e-6 * fabs((double)loss1) + 1e-6 && err <= 1e-5 * scale + 1e-9;
    printf("nccl_vocab_parallel: %d ranks, N %lld, D %lld, V %lld: loss %.7g (single device %.7g), "
           "max |dE - dE_single| %.3g; bytes per row: forward %d per rank (all-gather), backward %lld (all-reduce "
           "of fp32 dE): %s\n",
           world, (long long)N, (long long)D, (long long)V, (double)loss, (double)loss1, err,
           (int)(FH_SHARD_LCE_PARTIAL * sizeof(double)), (long long)(4 * D), ok ? "OK" : "MISMATCH");
    rc = ok ? 0 : 1;
    free(lse1), free(dE1);
  }
  cudaFree(d_part), cudaFree(d_gathered), cudaFree(d_dE);
  ncclCommDestroy(comm);
  fh_context_destroy(ctx);
  free(E), free(C), free(y), free(part), free(gathered), free(lse), free(dE), free(dC);
  return rc;
}
