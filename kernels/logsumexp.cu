/* logsumexp.cu: row-wise log-sum-exp of a logits matrix (the example kernel of the SIMT
 * emulator, and the building block of every softmax-shaped op).
 *
 * Formula: lse[i] = log sum_j exp(z[i][j]), j in [0, V).
 * Shapes: z is N x V, fp32/fp16/bf16, row stride S >= V elements; lse is N fp32 values.
 * Thread mapping: one block of FH_LSE_THREADS threads per row (grid.x = N); thread t reads
 * columns t, t + T, t + 2T, ... (consecutive threads, consecutive addresses), keeps online
 * (max, sum-exp) statistics, then the block merges them (warp shuffles, then shared memory).
 * Numerics: every element is converted to fp32 on load and never rounded again; statistics are
 * fp32 with accurate expf/logf. Special values: NaN anywhere -> NaN; else +inf -> +inf; a row of
 * only -inf (or V = 0) -> -inf, as in the CPU reference. Row offsets are int64 (i * S can exceed
 * 2^31). */
#include "common.cuh"

#define FH_LSE_THREADS 256

template <typename T>
__global__ void __launch_bounds__(FH_LSE_THREADS)
    fh_rows_logsumexp_kernel(const T* __restrict__ z, int64_t V, int64_t stride, float* __restrict__ lse) {
  __shared__ fh_stats scratch[32];
  const T* row = z + (int64_t)blockIdx.x * stride;
  fh_stats st = fh_stats_identity();
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) fh_stats_add(st, fh_to_float(row[j]));
  st = fh_block_stats(st, scratch);
  if (threadIdx.x == 0) lse[blockIdx.x] = fh_stats_lse(st);
}

template <typename T>
static fh_status_t launch_rows_logsumexp(struct CUstream_st* stream, const fh_tensor_t* z, float* lse) {
  FH_LAUNCH(fh_rows_logsumexp_kernel<T>, dim3((unsigned)z->rows), dim3(FH_LSE_THREADS), 0, stream,
            static_cast<const T*>(z->data), z->cols, z->row_stride, lse);
  return fh_cuda_launch_status("fh_rows_logsumexp", "fh_rows_logsumexp_kernel");
}

extern "C" fh_status_t fh_cuda_rows_logsumexp(fh_cuda_state_t* st, struct CUstream_st* stream,
                                              const fh_tensor_t* logits, float* lse) {
  (void)st;
  if (logits->rows == 0) return FH_SUCCESS;
  if (logits->rows > 2147483647)
    return fh_set_error(FH_ERR_UNSUPPORTED, "fh_rows_logsumexp", "more than 2^31-1 rows (%lld)", (long long)logits->rows);
  switch (logits->dtype) {
    case FH_DTYPE_F32: return launch_rows_logsumexp<float>(stream, logits, lse);
    case FH_DTYPE_F16: return launch_rows_logsumexp<__half>(stream, logits, lse);
    case FH_DTYPE_BF16: return launch_rows_logsumexp<__nv_bfloat16>(stream, logits, lse);
    default: return fh_set_error(FH_ERR_INTERNAL, "fh_rows_logsumexp", "dtype %d reached the kernel", (int)logits->dtype);
  }
}
