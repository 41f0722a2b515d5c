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
 *
 * Fused, pass 1: topk_fused_tile_kernel<T, Align> on the engine (kernels/engine/sm80.cuh,
 * docs/engine.md), grid (ceil(B / 128) row blocks) x (splits), 256 threads. A block owns 128
 * consecutive rows of H and one vocabulary split, a contiguous range of 128-class tiles. Per
 * tile the engine's mainloop (cp.async 3-stage pipeline, ldmatrix + mma.sync, fp32
 * accumulators) leaves the 128 x 128 logits H·Cᵀ in registers; the epilogue adds the bias in
 * fp32 in registers, turns each logit into a 64-bit tile key (tile_key: the order word above,
 * then the column, then the sign and mantissa bits so the value is recovered exactly) and stores
 * the keys with 16-byte shared stores into a [128 x 136] key tile laid over the free stage
 * buffers (1088-byte rows: the two rows of a quarter warp's stores fall in opposite bank halves,
 * conflict-free). After a barrier each warp merges its 16 rows (r = warp + 8 n) one at a time
 * into the row's sorted list of k pairs for this split, kept in the workspace (double buffer):
 * the tile keys above the list's last entry are compacted to the row's front (ballots), then
 * one pass over them ranks everything by counting (a list entry moves down by the candidates
 * above it; a candidate's rank is the candidates above it plus the list entries above it, found
 * by binary search over the list's order words staged in a per-warp shared scratch), and each
 * entry with rank < k is written at its rank. A second barrier frees the key tile for the next
 * tile's copies. Align = fh_eng::vec16 (16-byte cp.async) when H and C have 16-byte aligned
 * bases and row strides that are multiples of 16 bytes, else fh_eng::scalar (element loads).
 * Shared memory: max(48 KiB stages, 136 KiB key tile) + 8 KiB scratch = 144 KiB (opt-in).
 * Fused, pass 2 (topk_merge_kernel), grid.x = B: the same block select over the splits x k
 * candidates of the row.
 *
 * Splits depend on V alone (never on B or the device): T = ceil(V / 128) class tiles,
 * splits = ceil(T / ceil(T / 16)) (at most 16, each a whole number of tiles, none empty).
 * Workspace: B x splits x 2 x k pairs of (fp32 value, int32 id), 16 · B · splits · k bytes, so at
 * most 256 · B · k bytes; 0 from logits.
 *
 * Numerics: values are the logits rounded once to fp32: loaded exactly from a logits tensor of
 * 16-bit inputs; fused, the engine's fp32 tensor-core sum over k in one fixed order that depends
 * only on D (operands exact: fp16/bf16 directly, fp32 as three bf16 pieces), plus the bias in
 * fp32 (no bias: the accumulator unchanged). A row's logits therefore do not depend on which
 * rows share its block (docs/engine.md "Determinism"), and the selection itself is exact
 * integer work whatever the split boundaries, so a row's results do not depend on the batch.
 * Results are bit-identical to the CPU reference whenever the fp32 logits equal the
 * reference's rounded fp64 logits (exactly representable sums). Row offsets are int64. */
#include "engine/sm90.cuh"
#include "linear_ce_common.cuh" /* LCE_DTYPE_SWITCH, lce_check_shape, lce_blocks */

namespace {

constexpr int SEL_THREADS = 256; /* one thread per digit bin */
constexpr int MAX_K = FH_CUDA_TOPK_MAX_K;

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

/* ---- Fused pass 1 on the engine (kernels/engine/sm80.cuh, docs/engine.md) ---- */

constexpr int F_BM = fh_eng::BM, F_BN = fh_eng::BN, F_WARPS = fh_eng::THREADS / 32;
constexpr int F_MAX_SPLITS = 16;
constexpr int KP = F_BN + 8;                              /* keys per key-tile row: 1088-byte pitch */
constexpr size_t KEYS_BYTES = (size_t)F_BM * KP * sizeof(uint64_t); /* 136 KiB, over the stages */
/* The key tile and the mainloop's ring overlap; the warps' scratch follows the larger. */
template <typename Align>
constexpr size_t keys_end() {
  return KEYS_BYTES > fh_eng::ring<Align>::bytes ? KEYS_BYTES : fh_eng::ring<Align>::bytes;
}
template <typename Align>
constexpr size_t fused_smem() {
  return keys_end<Align>() + (size_t)F_WARPS * MAX_K * sizeof(uint32_t); /* + 8 KiB */
}
static_assert(fused_smem<fh_eng::vec16>() <= 160 * 1024, "fused top-k shared memory");
static_assert(MAX_K <= 8 * 32, "a lane holds at most 8 list entries");
static_assert(F_BN == 4 * 32, "a lane reads 4 keys of a tile row; tile columns take 7 bits");

struct fused_params {
  const void* H;
  const void* C;
  const void* bias; /* NULL: no bias */
  int64_t ldh, ldc;
  int B, V, D, k;
  int vt, tps, splits; /* class tiles, tiles per split, splits */
  topk_pair* ws;
  CUtensorMap tmc; /* C for the sm_90a mainloop's TMA (engine/sm90.cuh); unused on sm_80 */
};

/* The key of logit v in column c of the current class tile: the same upper word as topk_key
 * (the order of the value), then (127 - c) << 24 (ties by lowest column, so by lowest id), then
 * v's sign and 23 mantissa bits, which make v recoverable bit for bit (tile_value) where the
 * order word alone is not (±0, NaN payloads). Tile keys of one row are distinct; key 0 is an
 * empty column. Every entry of a row's list comes from an earlier tile of the split (a lower
 * id), so a tile key t beats a list key L exactly when t >> 32 > L >> 32. */
__device__ __forceinline__ uint64_t tile_key(float v, int c) {
  const uint32_t bits = __float_as_uint(v);
  uint32_t u;
  if (v != v) {
    u = 0xffffffffu;
  } else {
    u = v == 0.0f ? 0u : bits;
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  const uint32_t lo = ((uint32_t)(F_BN - 1 - c) << 24) | ((bits >> 8) & 0x00800000u) | (bits & 0x007fffffu);
  return ((uint64_t)u << 32) | lo;
}
__device__ __forceinline__ float tile_value(uint64_t t) {
  const uint32_t u = (uint32_t)(t >> 32), lo = (uint32_t)t;
  const uint32_t sm = ((lo & 0x00800000u) << 8) | (lo & 0x007fffffu); /* sign and mantissa */
  uint32_t bits;
  if (u == 0xffffffffu) bits = 0x7f800000u | sm; /* NaN (its mantissa is not 0) */
  else if (u == 0x80000000u) bits = sm;          /* ±0 */
  else bits = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  return __uint_as_float(bits);
}
__device__ __forceinline__ int tile_col(uint64_t t) { return F_BN - 1 - (int)(((uint32_t)t >> 24) & 127u); }
__device__ __forceinline__ uint64_t u64_of(uint32_t lo, uint32_t hi) { return ((uint64_t)hi << 32) | lo; }

/* Merges the key-tile row `rowp` (F_BN keys of global row `row`, columns v0..) into the row's
 * sorted list for this split; `cur` says which buffer holds it. One warp (the row's owner);
 * returns whether the list moved to the other buffer (warp-uniform). `scr`: the warp's k words.
 *   1. Candidates: the tile keys above the list's last entry (all real keys while the list has
 *      empty slots); no other key can enter, nor move a list entry. They are compacted in place
 *      to the front of the row (ballots, so the order is fixed), a zero key padding to even.
 *   2. Ranks by counting, one pass over the candidates (broadcast 16-byte shared loads): a list
 *      entry moves down by the candidates above it; a candidate's rank is the candidates above
 *      it plus the list entries above it (binary search over the list's order words in scr).
 *   3. Every entry with rank < k is written to the other buffer at its rank. */
__device__ __forceinline__ bool merge_row(const fused_params& p, unsigned char* rowp, uint32_t* scr, int row, int v0,
                                          bool cur) {
  const int lane = (int)threadIdx.x & 31, k = p.k;
  topk_pair* L = p.ws + ((int64_t)row * p.splits + blockIdx.y) * 2 * k;
  const topk_pair* src = L + (cur ? k : 0);
  topk_pair* dst = L + (cur ? 0 : k);
  uint64_t t[4];
  {
    const uint4 w0 = fh_ptx::lds_v4(rowp + 16 * lane), w1 = fh_ptx::lds_v4(rowp + 16 * (lane + 32));
    t[0] = u64_of(w0.x, w0.y), t[1] = u64_of(w0.z, w0.w), t[2] = u64_of(w1.x, w1.y), t[3] = u64_of(w1.z, w1.w);
  }
  const topk_pair last = src[k - 1];
  const uint32_t thr = (uint32_t)(topk_key(last.v, last.id) >> 32);
  __syncwarp(); /* every lane has read the row: the compaction overwrites it */
  const unsigned below = (1u << lane) - 1u;
  int m = 0;
  FH_UNROLL
  for (int s = 0; s < 4; ++s) {
    const bool pass = (uint32_t)(t[s] >> 32) > thr;
    const unsigned bal = __ballot_sync(FH_FULL_MASK, pass);
    if (pass) {
      unsigned char* q = rowp + 8 * (m + __popc(bal & below));
      fh_ptx::sts_u32(q, (uint32_t)t[s]);
      fh_ptx::sts_u32(q + 4, (uint32_t)(t[s] >> 32));
    }
    m += __popc(bal);
  }
  if (m == 0) return false; /* warp-uniform: nothing enters, the list stays where it is */
  if ((m & 1) && lane == 0) {
    fh_ptx::sts_u32(rowp + 8 * m, 0u);
    fh_ptx::sts_u32(rowp + 8 * m + 4, 0u);
  }
  /* This lane's list entries i = lane + 32 n, their keys with the low word saturated (so a
   * candidate compares above one exactly when its order word is higher), their order words. */
  topk_pair e[8];
  uint64_t lk[8];
  int lpos[8];
  FH_UNROLL
  for (int n = 0; n < 8; ++n) {
    const int i = lane + 32 * n;
    e[n] = topk_pair{-INFINITY, -1};
    lk[n] = ~0ull;
    lpos[n] = i;
    if (i < k) {
      e[n] = src[i];
      const uint64_t key = topk_key(e[n].v, e[n].id);
      fh_ptx::sts_u32(scr + i, (uint32_t)(key >> 32));
      lk[n] = key | 0xffffffffull;
    }
  }
  __syncwarp(); /* candidates, padding and scr visible to every lane */
  uint64_t ck[4];
  int cpos[4];
  FH_UNROLL
  for (int n = 0; n < 4; ++n) {
    const int j = lane + 32 * n;
    ck[n] = ~0ull;
    cpos[n] = 0;
    if (j < m) ck[n] = u64_of(fh_ptx::lds_u32(rowp + 8 * j), fh_ptx::lds_u32(rowp + 8 * j + 4));
  }
  FH_NO_UNROLL
  for (int j = 0; j < m; j += 2) {
    const uint4 w = fh_ptx::lds_v4(rowp + 8 * j);
    const uint64_t a = u64_of(w.x, w.y), b = u64_of(w.z, w.w);
    FH_UNROLL
    for (int n = 0; n < 8; ++n) lpos[n] += (int)(a > lk[n]) + (int)(b > lk[n]);
    FH_UNROLL
    for (int n = 0; n < 4; ++n) cpos[n] += (int)(a > ck[n]) + (int)(b > ck[n]);
  }
  FH_UNROLL
  for (int n = 0; n < 8; ++n)
    if (lane + 32 * n < k && lpos[n] < k) dst[lpos[n]] = e[n];
  FH_UNROLL
  for (int n = 0; n < 4; ++n) {
    if (lane + 32 * n >= m) continue;
    const uint32_t u = (uint32_t)(ck[n] >> 32);
    int lo = 0, hi = k; /* list entries whose order word is >= u: they rank above (lower ids) */
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (fh_ptx::lds_u32(scr + mid) >= u) lo = mid + 1;
      else hi = mid;
    }
    const int pos = cpos[n] + lo;
    if (pos < k) dst[pos] = topk_pair{tile_value(ck[n]), v0 + tile_col(ck[n])};
  }
  __syncwarp(); /* dst complete; the reads of the row and of scr done before the next row */
  return true;
}

/* One block of 128 rows x one vocabulary split: per 128-class tile, the engine's mainloop leaves
 * the logits in registers, the epilogue adds the bias and stores the tile keys (tile_key) over
 * the free stage buffers, and each warp merges its rows (r = warp + 8 n) into their lists. */
template <typename T, typename Align>
__global__ void __launch_bounds__(fh_eng::THREADS, 1) topk_fused_tile_kernel(const __grid_constant__ fused_params p) {
  using namespace fh_eng;
  FH_DYNAMIC_SMEM(unsigned char, smem);
  unsigned char* keys = smem; /* [F_BM][KP] keys */
  const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31, k = p.k;
  uint32_t* scr = (uint32_t*)(smem + keys_end<Align>()) + warp * MAX_K;
  /* In a 2-CTA cluster (engine/sm90.cuh) the last CTA may lie past B: no rows, it only loads
   * its half of every classifier tile for its peer. */
  const int row0 = blockIdx.x * F_BM, nr = p.B - row0 < 0 ? 0 : (p.B - row0 < F_BM ? p.B - row0 : F_BM);
  for (int idx = threadIdx.x; idx < nr * k; idx += fh_eng::THREADS) {
    const int r = idx / k, i = idx % k;
    p.ws[((int64_t)(row0 + r) * p.splits + blockIdx.y) * 2 * k + i] = topk_pair{-INFINITY, -1};
  }
  /* The empty lists are visible to their readers after the mainloop's barriers. */
  uint32_t cur = 0; /* bit n: row warp + 8 n has its list in buffer 1 (warp-uniform) */
  const T* bias = static_cast<const T*>(p.bias);
  const nt_operand<T> a{static_cast<const T*>(p.H), p.ldh, nullptr, row0, nr};
  const int t0 = blockIdx.y * p.tps, t1 = t0 + p.tps < p.vt ? t0 + p.tps : p.vt;
  for (int tile = t0; tile < t1; ++tile) {
    const int v0 = tile * F_BN, nv = p.V - v0 < F_BN ? p.V - v0 : F_BN;
    const nt_operand<T> b{static_cast<const T*>(p.C), p.ldc, nullptr, v0, nv, &p.tmc};
    acc_t acc;
    mainloop<T, Align>::run(acc, a, b, p.D, smem); /* ends with a barrier: the stages are free */
    /* -0.0f is the identity of fp32 addition (x + -0 == x for every x, -0 included), so rows
     * without bias keep the accumulator bit for bit. */
    float bj[NJ][2];
    FH_UNROLL
    for (int j = 0; j < NJ; ++j)
      FH_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int c = frag_col(j, e);
        bj[j][e] = (bias && c < nv) ? fh_to_float(bias[v0 + c]) : -0.0f;
      }
    FH_UNROLL
    for (int i = 0; i < MI; ++i)
      FH_UNROLL
      for (int h = 0; h < 2; ++h)
        FH_UNROLL
        for (int j = 0; j < NJ; ++j) {
          const int r = frag_row(i, 2 * h), c = frag_col(j, 0);
          const uint64_t k0 = c < nv ? tile_key(acc.v[i][j][2 * h] + bj[j][0], c) : 0ull;
          const uint64_t k1 = c + 1 < nv ? tile_key(acc.v[i][j][2 * h + 1] + bj[j][1], c + 1) : 0ull;
          fh_ptx::sts_v4(keys + ((size_t)r * KP + c) * sizeof(uint64_t),
                         make_uint4((uint32_t)k0, (uint32_t)(k0 >> 32), (uint32_t)k1, (uint32_t)(k1 >> 32)));
        }
    __syncthreads(); /* the key tile is complete */
    for (int n = 0, r = warp; r < nr; ++n, r += F_WARPS)
      if (merge_row(p, keys + (size_t)r * KP * sizeof(uint64_t), scr, row0 + r, v0, (cur >> n) & 1u)) cur ^= 1u << n;
    __syncthreads(); /* every warp is done with the keys before the next tile's copies land */
  }
  /* Leave every row's final list in buffer 0 (rows are owned by one warp: no block barrier). */
  for (int n = 0, r = warp; r < nr; ++n, r += F_WARPS) {
    if (!((cur >> n) & 1u)) continue;
    topk_pair* L = p.ws + ((int64_t)(row0 + r) * p.splits + blockIdx.y) * 2 * k;
    for (int i = lane; i < k; i += 32) L[i] = L[k + i];
  }
}

/* Vocabulary splits of the fused path, from V alone: T = ceil(V / 128) class tiles, at most
 * F_MAX_SPLITS splits of a whole number of tiles, none empty. */
static void fused_split(int64_t V, int* vt, int* tiles_per_split, int* splits) {
  const int64_t tiles = (V + F_BN - 1) / F_BN;
  const int64_t tps = (tiles + F_MAX_SPLITS - 1) / F_MAX_SPLITS;
  *vt = (int)tiles;
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

template <typename T, typename Align>
static fh_status_t launch_fused(const char* fn, cudaStream_t stream, const fused_params& fp, bool mc = false) {
  auto kern = topk_fused_tile_kernel<T, Align>;
  constexpr size_t smem = fused_smem<Align>();
  FH_TRY(fh_cuda_status(fh_eng::allow_smem<smem, fh_eng::optin<Align>::max>(kern), fn,
                        "cudaFuncSetAttribute(topk_fused_tile_kernel)"));
  fh_eng::launch_tiles_mc(mc, kern, dim3(fh_lce::lce_blocks(fp.B, F_BM), (unsigned)fp.splits), smem, stream, fp);
  return fh_cuda_launch_status(fn, "topk_fused_tile_kernel");
}

} /* namespace */

extern "C" size_t fh_cuda_topk_workspace(int64_t B, int64_t V, int64_t D, int64_t k) {
  if (D == 0 || B == 0 || V == 0) return 0;
  int vt, tps, splits;
  fused_split(V, &vt, &tps, &splits);
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
  FH_TRY(fh_lce::lce_check_shape(fn, B, V, D));
  /* The workspace query reads D = 0 as "from logits" (fusedhead.h) and sizes nothing for it, so
   * a fused call with zero hidden columns has no split lists to work in: refuse it by name. */
  if (!logits && D == 0 && B > 0)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                        "H has 0 columns: the CUDA backend's fused top-k needs D >= 1 (the logits are the bias "
                        "alone: use fh_topk_from_logits on it, or FH_BACKEND_CPU)");
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
  fused_split(V, &fp.vt, &fp.tps, &fp.splits);
  fp.ws = static_cast<topk_pair*>(workspace);
  const size_t es = fh_dtype_size(H->dtype);
  const bool vec = fh_eng::vec16_ok(fp.H, fp.ldh, es) && fh_eng::vec16_ok(fp.C, fp.ldc, es);
  LCE_DTYPE_SWITCH(H->dtype, T, {
    using A90 = fh_eng::tma90_for<T>;
    const bool mc = fh_eng::multicast_enabled<T>(fh_lce::lce_blocks(fp.B, F_BM), topk_fused_tile_kernel<T, A90>,
                                                 fused_smem<A90>());
    if (fh_eng::pick_tma90<T>(vec, &fp.tmc, fp.C, V, D, fp.ldc, mc))
      FH_TRY((launch_fused<T, A90>(fn, s, fp, mc)));
    else if (vec) FH_TRY((launch_fused<T, fh_eng::vec16>(fn, s, fp)));
    else FH_TRY((launch_fused<T, fh_eng::scalar>(fn, s, fp)));
  });
  FH_LAUNCH(topk_merge_kernel, dim3((unsigned)B), dim3(SEL_THREADS), 0, s, fp.ws, fp.splits, (int)k, values, ids);
  return fh_cuda_launch_status(fn, "topk_merge_kernel");
}
