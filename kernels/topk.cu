/* topk.cu: exact top-k of logits, from a logits tensor or fused with the LM head (fusedhead.h,
 * fh_topk_from_logits / fh_topk_fused), on the CUDA backend.
 *
 * Formula: per row b, the k pairs (z_bv, v) largest in the order "value descending, NaN above
 * +inf, ties (and NaN vs NaN) by lowest id", written sorted: values [B x k] fp32, ids [B x k]
 * int64. Logits: z [B x V] (fp32/fp16/bf16, row stride honoured), or z_bv = H_b · C_v + bias_v with
 * H [B x D], C [V x D], bias [1 x V] (one dtype). 1 <= k <= FH_CUDA_TOPK_MAX_K (256).
 *
 * The order as one integer: key(z, v) = (ordered_u32(z) << 32) | (2^32 - 1 - v), where
 * ordered_u32 is the order-preserving map of fp32 (negatives bit-inverted, positives with the
 * sign bit set, -0 read as +0 since the reference compares -0 == +0, every NaN mapped to
 * 0xffffffff, above +inf's 0xff800000). Keys of one row are distinct, so "the k largest keys" is
 * exactly the reference's first k, ties included. Key 0 marks an empty slot (below every real
 * entry: -inf maps to 0x007fffff).
 *
 * Selection (topk_block_select, one block of 256 threads per row): radix select on the 64-bit
 * key, 8-bit digits from the top: a shared histogram of the keys matching the prefix chosen so
 * far, a suffix scan over the 256 bins finds the digit holding the k-th largest key; it stops as
 * soon as the whole chosen bucket is needed (usually after 4 digits, the value part). Then every
 * key >= the prefix is collected (exactly k of them) and ranked by counting (k^2 comparisons,
 * k <= 256), each thread writing its entries at their rank. No CUB (docs/architecture.md, "Kernels").
 *
 * From logits: grid.x = B, the select reads the row (8 passes at most, each coalesced).
 * Fused: pass 1, grid (ceil(B / 64), splits), 128 threads: a block owns 64 rows and a contiguous
 * range of 64-class tiles (one vocabulary split); it computes each tile with lce_logit_tile
 * (WMMA, fp32 accumulators, linear_ce_common.cuh) and adds the bias in fp32, then each warp
 * merges 16 of the rows' 64 new pairs into the row's sorted list of k pairs for this split, kept
 * in the workspace (double buffer: new position of a list entry = its index + the number of new
 * keys above it; of a new entry = new keys above it + list keys above it, by binary search).
 * Pass 2, grid.x = B: the same block select over the splits x k candidates of the row.
 * Workspace: B x splits x 2 x k pairs of (fp32 value, int32 id), 16 · B · splits · k bytes,
 * splits = ceil(T / ceil(T / 16)) with T = ceil(V / 64) tiles, so at most 256 · B · k bytes.
 *
 * Numerics: values are the logits rounded once to fp32 (loaded exactly for 16-bit inputs;
 * fused: the tensor-core fp32 sum, tf32-rounded operands for fp32 inputs, plus the bias in
 * fp32); the selection itself is exact integer work, so results are bit-identical to the CPU
 * reference whenever the fp32 logits equal the reference's rounded fp64 logits (exactly
 * representable sums). Row offsets are int64. */
#include "linear_ce_common.cuh"

using namespace fh_lce;

namespace {

constexpr int SEL_THREADS = 256; /* one thread per digit bin */
constexpr int MAX_K = FH_CUDA_TOPK_MAX_K;
constexpr int MAX_SPLITS = 16;

struct topk_pair {
  float v;
  int id; /* -1: empty slot */
};

__device__ __forceinline__ uint64_t topk_key(float v, int id) {
  if (id < 0) return 0;
  uint32_t u;
  if (v != v) {
    u = 0xffffffffu;
  } else {
    u = v == 0.0f ? 0u : __float_as_uint(v); /* -0 ties with +0 */
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return ((uint64_t)u << 32) | (uint64_t)(0xffffffffu - (uint32_t)id);
}

struct select_smem {
  unsigned hist[SEL_THREADS];
  unsigned suf[SEL_THREADS];
  uint64_t key[MAX_K];
  float val[MAX_K];
  int id[MAX_K];
  unsigned bin, above, cnt, count;
};

/* Row of a logits tensor. */
template <typename T>
struct row_source {
  const T* row;
  __device__ __forceinline__ void get(int64_t j, float& v, int& id) const {
    v = fh_to_float(row[j]);
    id = (int)j;
  }
};

/* The splits x k candidates of one row (pass 1's buffer 0 of every split). */
struct cand_source {
  const topk_pair* base; /* row's first split */
  int k;
  __device__ __forceinline__ void get(int64_t j, float& v, int& id) const {
    const int64_t s = j / k, i = j % k;
    const topk_pair p = base[s * 2 * k + i];
    v = p.v;
    id = p.id;
  }
};

/* The k largest keys of src[0..n) written sorted to out_v/out_id. Every thread of the block
 * (SEL_THREADS) must call it; n >= k real entries are guaranteed by the callers. */
template <typename Src>
__device__ void topk_block_select(const Src& src, int64_t n, int k, float* __restrict__ out_v,
                                  int64_t* __restrict__ out_id, select_smem& sm) {
  const int t = threadIdx.x;
  uint64_t prefix = 0, mask = 0;
  unsigned need = (unsigned)k;
  for (int shift = 56; shift >= 0; shift -= 8) {
    sm.hist[t] = 0;
    __syncthreads();
    for (int64_t j = t; j < n; j += SEL_THREADS) {
      float v;
      int id;
      src.get(j, v, id);
      const uint64_t key = topk_key(v, id);
      if ((key & mask) == prefix) atomicAdd(&sm.hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    /* Inclusive suffix sums suf[b] = sum of hist[b'] for b' >= b (Hillis-Steele). */
    const unsigned h = sm.hist[t];
    unsigned x = h;
    sm.suf[t] = x;
    __syncthreads();
    for (int off = 1; off < SEL_THREADS; off <<= 1) {
      const unsigned y = t + off < SEL_THREADS ? sm.suf[t + off] : 0u;
      __syncthreads();
      x += y;
      sm.suf[t] = x;
      __syncthreads();
    }
    /* Exactly one bin has fewer than `need` keys above it and at least `need` from it on. */
    if (x - h < need && x >= need) {
      sm.bin = (unsigned)t;
      sm.above = x - h;
      sm.cnt = h;
    }
    __syncthreads();
    const unsigned bin = sm.bin, above = sm.above, cnt = sm.cnt;
    prefix |= (uint64_t)bin << shift;
    mask |= (uint64_t)255u << shift;
    need -= above;
    if (cnt == need) break; /* block-uniform: the whole bucket is in */
    /* sm.bin is rewritten only after the next pass's barriers, when everyone has read it. */
  }
  /* Keys >= prefix (undetermined bits zero): the keys above each chosen digit plus the final
   * bucket, k in all. */
  if (t == 0) sm.count = 0;
  __syncthreads();
  for (int64_t j = t; j < n; j += SEL_THREADS) {
    float v;
    int id;
    src.get(j, v, id);
    const uint64_t key = topk_key(v, id);
    if (key >= prefix) {
      const unsigned slot = atomicAdd(&sm.count, 1u);
      sm.key[slot] = key;
      sm.val[slot] = v;
      sm.id[slot] = id;
    }
  }
  __syncthreads();
  for (int i = t; i < k; i += SEL_THREADS) {
    const uint64_t ki = sm.key[i];
    int rank = 0;
    for (int j = 0; j < k; ++j) rank += sm.key[j] > ki;
    out_v[rank] = sm.val[i];
    out_id[rank] = sm.id[i];
  }
}

template <typename T>
__global__ void __launch_bounds__(SEL_THREADS)
    topk_rows_kernel(const T* __restrict__ z, int64_t stride, int V, int k, float* __restrict__ values,
                     int64_t* __restrict__ ids) {
  __shared__ select_smem sm;
  const int64_t b = blockIdx.x;
  const row_source<T> src{z + b * stride};
  topk_block_select(src, V, k, values + b * k, ids + b * k, sm);
}

__global__ void __launch_bounds__(SEL_THREADS)
    topk_merge_kernel(const topk_pair* __restrict__ ws, int splits, int k, float* __restrict__ values,
                      int64_t* __restrict__ ids) {
  __shared__ select_smem sm;
  const int64_t b = blockIdx.x;
  const cand_source src{ws + b * splits * 2 * k, k};
  topk_block_select(src, (int64_t)splits * k, k, values + b * k, ids + b * k, sm);
}

struct fused_params {
  const void* H;
  const void* C;
  const void* bias; /* NULL: no bias */
  int64_t ldh, ldc;
  int B, V, D, k;
  int tiles_per_split, splits;
  topk_pair* ws;
};

template <typename T>
static size_t fused_smem() {
  typedef typename mma_traits<T>::S S;
  return sizeof(float) * BM * ACC_LD + sizeof(S) * (BM + BV) * mma_traits<T>::LDS + BM * sizeof(int) * 2 +
         (THREADS / 32) * BV * sizeof(uint64_t);
}

/* Merges this tile's pairs of row r (columns [v0, v0 + nv), logits in acc) into the row's
 * sorted list (see the file comment). One warp; `raw` is the warp's 64-key scratch. */
template <typename T>
__device__ __forceinline__ void merge_tile_row(const fused_params& p, const float* acc, int r, int row, int v0,
                                               int nv, int* s_cur, uint64_t* raw) {
  const int lane = threadIdx.x & 31, k = p.k;
  topk_pair* L = p.ws + ((int64_t)row * p.splits + blockIdx.y) * 2 * k;
  const int cur = s_cur[r];
  const topk_pair* src = L + cur * k;
  topk_pair* dst = L + (1 - cur) * k;
  float v[2];
  uint64_t key[2];
  for (int q = 0; q < 2; ++q) {
    const int c = lane + 32 * q;
    v[q] = -INFINITY;
    key[q] = 0;
    if (c < nv) {
      v[q] = acc[r * ACC_LD + c];
      if (p.bias) v[q] += mma_traits<T>::to_float(static_cast<const T*>(p.bias)[v0 + c]);
      key[q] = topk_key(v[q], v0 + c);
    }
  }
  const topk_pair last = src[k - 1];
  const uint64_t thr = topk_key(last.v, last.id);
  __syncwarp();  /* the previous row's readers of raw are done */
  if (!__any_sync(FH_FULL_MASK, key[0] > thr || key[1] > thr)) return; /* warp-uniform */
  raw[lane] = key[0];
  raw[lane + 32] = key[1];
  __syncwarp();
  for (int i = lane; i < k; i += 32) {
    const topk_pair e = src[i];
    const uint64_t ki = topk_key(e.v, e.id);
    int pos = i;
    for (int j = 0; j < BV; ++j) pos += raw[j] > ki;
    if (pos < k) dst[pos] = e;
  }
  for (int q = 0; q < 2; ++q) {
    if (key[q] == 0) continue;
    int pos = 0;
    for (int j = 0; j < BV; ++j) pos += raw[j] > key[q];
    int lo = 0, hi = k; /* list keys above key[q]: the list is sorted descending */
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (topk_key(src[mid].v, src[mid].id) > key[q]) lo = mid + 1;
      else hi = mid;
    }
    pos += lo;
    if (pos < k) dst[pos] = topk_pair{v[q], v0 + lane + 32 * q};
  }
  __syncwarp(); /* dst complete and src reads done before the flip */
  if (lane == 0) s_cur[r] = 1 - cur;
  __syncwarp();
}

template <typename T>
__global__ void __launch_bounds__(THREADS) topk_fused_tile_kernel(fused_params p) {
  typedef mma_traits<T> tr;
  typedef typename tr::S S;
  FH_DYNAMIC_SMEM(unsigned char, smem);
  float* acc = (float*)smem; /* first: 32-byte alignment for WMMA */
  S* sA = (S*)(acc + BM * ACC_LD);
  S* sB = sA + BM * tr::LDS;
  uint64_t* raw = (uint64_t*)(sB + BV * tr::LDS); /* 8-byte aligned: the sizes above are multiples of 8 */
  int* s_rows = (int*)(raw + (THREADS / 32) * BV);
  int* s_cur = s_rows + BM;

  const int row0 = blockIdx.x * BM, nr = p.B - row0 < BM ? p.B - row0 : BM, k = p.k;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = threadIdx.x; r < BM; r += THREADS) {
    s_rows[r] = row0 + (r < nr ? r : 0);
    s_cur[r] = 0;
  }
  for (int idx = threadIdx.x; idx < nr * k; idx += THREADS) {
    const int r = idx / k, i = idx % k;
    p.ws[((int64_t)(row0 + r) * p.splits + blockIdx.y) * 2 * k + i] = topk_pair{-INFINITY, -1};
  }
  __syncthreads(); /* s_rows and the empty lists visible to every warp */
  const int v_begin = blockIdx.y * p.tiles_per_split * BV;
  const int v_end = p.V - v_begin < p.tiles_per_split * BV ? p.V : v_begin + p.tiles_per_split * BV;
  for (int v0 = v_begin; v0 < v_end; v0 += BV) {
    lce_logit_tile<T>(static_cast<const T*>(p.H), p.ldh, static_cast<const T*>(p.C), p.ldc, s_rows, nr, v0, p.V, p.D,
                      sA, sB, acc); /* starts and ends with a barrier */
    const int nv = p.V - v0 < BV ? p.V - v0 : BV;
    for (int r = warp; r < nr; r += THREADS / 32) merge_tile_row<T>(p, acc, r, row0 + r, v0, nv, s_cur, raw + warp * BV);
  }
  /* Leave every row's final list in buffer 0 (rows are owned by one warp: no block barrier). */
  for (int r = warp; r < nr; r += THREADS / 32) {
    if (s_cur[r] == 0) continue;
    topk_pair* L = p.ws + ((int64_t)(row0 + r) * p.splits + blockIdx.y) * 2 * k;
    for (int i = lane; i < k; i += 32) L[i] = L[k + i];
  }
}

/* Vocabulary splits of the fused path: at most MAX_SPLITS, each a whole number of tiles. */
static void fused_split(int64_t V, int* tiles_per_split, int* splits) {
  const int64_t tiles = (V + BV - 1) / BV;
  const int64_t tps = (tiles + MAX_SPLITS - 1) / MAX_SPLITS;
  *tiles_per_split = (int)(tps > 0 ? tps : 1);
  *splits = (int)(tiles > 0 ? (tiles + *tiles_per_split - 1) / *tiles_per_split : 1);
}

template <typename T>
static fh_status_t launch_rows(const char* fn, cudaStream_t stream, const fh_tensor_t* z, int k, float* values,
                               int64_t* ids) {
  auto kern = topk_rows_kernel<T>;
  FH_LAUNCH(kern, dim3((unsigned)z->rows), dim3(SEL_THREADS), 0, stream, static_cast<const T*>(z->data),
            z->row_stride, (int)z->cols, k, values, ids);
  return fh_cuda_launch_status(fn, "topk_rows_kernel");
}

template <typename T>
static fh_status_t launch_fused(const char* fn, cudaStream_t stream, const fused_params& fp) {
  auto kern = topk_fused_tile_kernel<T>;
  FH_LAUNCH(kern, dim3(lce_blocks(fp.B, BM), (unsigned)fp.splits), dim3(THREADS), fused_smem<T>(), stream, fp);
  return fh_cuda_launch_status(fn, "topk_fused_tile_kernel");
}

} /* namespace */

extern "C" size_t fh_cuda_topk_workspace(int64_t B, int64_t V, int64_t D, int64_t k) {
  if (D == 0 || B == 0 || V == 0) return 0;
  int tps, splits;
  fused_split(V, &tps, &splits);
  return (size_t)B * (size_t)splits * 2u * (size_t)k * sizeof(topk_pair);
}

extern "C" fh_status_t fh_cuda_topk(fh_cuda_state_t* st, struct CUstream_st* stream, const char* fn,
                                    const fh_tensor_t* logits, const fh_tensor_t* H, const fh_tensor_t* C,
                                    const fh_tensor_t* bias, int64_t k, float* values, int64_t* ids, void* workspace) {
  (void)st;
  if (k > MAX_K)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn, "k is %lld: the CUDA backend supports k <= %d (use FH_BACKEND_CPU)",
                        (long long)k, MAX_K);
  const int64_t B = logits ? logits->rows : H->rows, V = logits ? logits->cols : C->rows, D = logits ? 0 : H->cols;
  FH_TRY(lce_check_shape(fn, B, V, D));
  if (B == 0) return FH_SUCCESS;
  cudaStream_t s = (cudaStream_t)stream;
  if (logits) {
    LCE_DTYPE_SWITCH(logits->dtype, T, return launch_rows<T>(fn, s, logits, (int)k, values, ids));
  }
  fused_params fp;
  fp.H = H->data;
  fp.C = C->data;
  fp.bias = bias ? bias->data : NULL;
  fp.ldh = H->row_stride;
  fp.ldc = C->row_stride;
  fp.B = (int)B, fp.V = (int)V, fp.D = (int)D, fp.k = (int)k;
  fused_split(V, &fp.tiles_per_split, &fp.splits);
  fp.ws = static_cast<topk_pair*>(workspace);
  LCE_DTYPE_SWITCH(H->dtype, T, FH_TRY(launch_fused<T>(fn, s, fp)));
  FH_LAUNCH(topk_merge_kernel, dim3((unsigned)B), dim3(SEL_THREADS), 0, s, fp.ws, fp.splits, (int)k, values, ids);
  return fh_cuda_launch_status(fn, "topk_merge_kernel");
}
