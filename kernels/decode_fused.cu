/* decode_fused.cu: fh_decode_fused on the CUDA backend: the LM-head matmul fused with every
 * sampler of the reference, exact, without writing the [B x V] logits (fusedhead.h,
 * "Decoding"; design and certificate in docs/decoding.md, "Fused decoding on CUDA").
 *
 * Formula: z_bv = H_b · C_v + bias_v (the engine's fp32 tensor-core sum over D, then + bias in
 * fp64), the row's sparse bias and bans, then the from-logits semantics (kernels/decode.cu).
 *
 * Steps, every count on the device (graph-capturable):
 *   1. decode_fused_prep_kernel, grid B: checks the row's per-row parameters and lists (a bad
 *      row is degenerate and raises FH_DEVERR_DECODE_PARAM) and marks the listed ids in a
 *      per-row bitmap, so the epilogue edits only those ids.
 *   2. decode_fused_tile_kernel<T, Align, false>, grid (row blocks of 128) x (splits), on the
 *      engine with the vocabulary as the M dimension (A = a 128-id tile of C, B = the row
 *      block of H): small batches still give every CTA a full 128-row operand to stream. The
 *      epilogue parks the fp32 tile in shared memory transposed (a batch row's 128 ids
 *      contiguous), then one warp per row, in fp64: z, the edits, s = z / T; the online
 *      (m, Z, F, Z2) of the finite s (Z2 = Σ (e^(s−m))², p-less's Σ p² = Z2 / Z²);
 *      (count, mean, M2, max) of the finite z for top-nσ rows; the
 *      keyed Gumbel-max of s + g over every finite id for rows whose rule keeps every id; and
 *      the split's NC best (s descending, id ascending) candidates with their z, kept sorted
 *      one per lane. Written per (row, split) at the split's end.
 *   3. decode_fused_merge_kernel, grid B: the splits' statistics merged in split order (so a
 *      row's totals do not depend on the batch) and the certificate's bound e*: the best of the
 *      full splits' last candidates. Every id missing from the union of the lists comes after
 *      e* in the order, so the union sorted is exact up to e* (P positions).
 *   4. fh_segmented_sort_u64_i32 over each row's splits x NC candidates.
 *   5. decode_fused_row_kernel, grid B: kernels/decode_rule.cuh over the P certified
 *      candidates with the streamed totals; a row whose rule needs a position past P is
 *      flagged for the fallback and nothing is written for it.
 *   6. Exact fallback for the flagged rows only: decode_fused_pack_kernel packs their
 *      offsets, decode_fused_tile_kernel<T, Align, true> recomputes their logits with the same
 *      mainloop (bitwise the same z) into fp64 rows (row blocks without a flagged row exit at
 *      once), then the from-logits steps over them (fh_dec::fallback_run); their flags carry
 *      FH_DECODE_FLAG_SECOND_PASS.
 * Splits depend on V alone: T = ceil(V / 128) tiles, at most MAX_SPLITS splits of whole tiles,
 * so every result of a row is the same whatever the batch. Row offsets are int64. */
#include "decode_rule.cuh"
#include "engine/sm90.cuh"
#include "linear_ce_common.cuh" /* LCE_DTYPE_SWITCH, lce_blocks */
#include "segsort.cuh"

namespace {

using namespace fh_dec;

constexpr int NC = 32; /* candidates per (row, split): one per lane */
constexpr int MAX_SPLITS = 256;
constexpr int F_BM = fh_eng::BM, F_BN = fh_eng::BN, F_WARPS = fh_eng::THREADS / 32;
constexpr int ZP = F_BM + 4; /* floats per parked row: lanes (g, t) of a store hit 32 banks */
constexpr uint64_t EMPTY = ~0ull;
static_assert(F_BM == 4 * 32, "a lane takes ids lane + 32 q, q < 4, of a tile");

struct split_stat { /* per (row, split), and per row after the merge */
  double m, Z, F;   /* max s, Σ e^(s−m), Σ e^(s−m)(s−m) over s > −inf */
  double Z2;        /* Σ (e^(s−m))² over s > −inf (p-less's Σ p² = Z2 / Z²) */
  double zcnt, zmean, zm2, zmax; /* finite z, top-nσ rows only */
  double gkey, gs;  /* keyed Gumbel-max over every finite id (rows keeping all ids) and its s */
  int64_t nfin;     /* ids with s > −inf */
  int64_t ekey;     /* merged rows: the certificate's bound e* (key; id in eid), −1 none */
  int32_t gid, eid; /* −1: none */
  uint32_t info;    /* INFO_* bits */
};
static_assert(sizeof(split_stat) == 112, "scripts/decode_table.py's cost model counts 112 bytes per (row, split)");

struct fparams {
  fh_decode_options_t o;
  const void *H, *C, *bias;
  int64_t ldh, ldc;
  int B, V, D, vt, tps, splits, nrmax;
  size_t zt_bytes;    /* shared bytes before the row states */
  uint32_t* bitmap;   /* [B x 4 vt] listed ids, NULL without lists */
  uint32_t* bad;      /* [B] INFO_BAD of the prep */
  split_stat* st;     /* [B x splits] */
  split_stat* rt;     /* [B] merged */
  uint64_t *ckey, *ckey2; /* [B x splits·NC] candidate keys (dec_key_of s), before / after the sort */
  int32_t *cval, *cval2;  /* their slot within the row, before / after */
  double* cz;             /* [B x splits·NC] candidate z */
  int32_t* cid;           /* candidate ids, −1 empty */
  int32_t* coffs;         /* [B + 1] candidate segments */
  uint32_t* only;         /* [B] DEC_ROW_FALLBACK */
  int32_t* offs;          /* [B + 1] packed fallback rows (the fallback workspace's) */
  double* zb;             /* fallback z rows */
  fh_decode_outputs_t out;
  int* err;
  CUtensorMap tmh; /* H (the B operand) for the sm_90a mainloop's TMA (engine/sm90.cuh) */
};

/* (key, id) order: the smaller key (larger s) first, equal keys to the lower id. */
__device__ __forceinline__ bool before(uint64_t k1, int i1, uint64_t k2, int i2) {
  return k1 < k2 || (k1 == k2 && (unsigned)i1 < (unsigned)i2);
}

/* (m, Z, F, Q) ← the union with (mb, Zb, Fb, Qb), Q = Σ (e^(s−m))²: the part with the smaller
 * max is rescaled, Z by e^d, F by e^d (Fb + d·Zb), Q by (e^d)², d = mb − m <= 0. */
__device__ __forceinline__ void lse_merge(double& m, double& Z, double& F, double& Q, double mb, double Zb, double Fb,
                                          double Qb) {
  if (mb == -INFINITY) return;
  if (mb > m) {
    const double tm = m, tZ = Z, tF = F, tQ = Q;
    m = mb, Z = Zb, F = Fb, Q = Qb;
    mb = tm, Zb = tZ, Fb = tF, Qb = tQ;
    if (mb == -INFINITY) return;
  }
  const double d = mb - m, e = exp(d);
  Z = Z + Zb * e;
  F = F + e * (Fb + d * Zb);
  Q = Q + Qb * (e * e);
}

/* Chan et al.'s pairwise update of (count, mean, M2, max). */
__device__ __forceinline__ void moments_merge(double& n, double& mean, double& m2, double& mx, double nb, double meanb,
                                              double m2b, double mxb) {
  if (nb == 0.0) return;
  const double n0 = n, nn = n + nb, d = meanb - mean;
  mean = n0 == 0.0 ? meanb : mean + d * (nb / nn);
  m2 = n0 == 0.0 ? m2b : m2 + m2b + d * d * (n0 * nb / nn);
  mx = fmax(mx, mxb);
  n = nn;
}

__device__ __forceinline__ double warp_sum(double x) {
  FH_UNROLL
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ double warp_max(double x) {
  FH_UNROLL
  for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__global__ void __launch_bounds__(DEC_THREADS) decode_fused_prep_kernel(fparams p) {
  const int64_t b = blockIdx.x, words = 4 * (int64_t)p.vt;
  if (p.bitmap) {
    uint32_t* bm = p.bitmap + b * words;
    for (int64_t w = threadIdx.x; w < words; w += DEC_THREADS) bm[w] = 0u;
  }
  __syncthreads(); /* the row's bitmap cleared before thread 0 marks it */
  if (threadIdx.x == 0) {
    fh_decode_row_params_t prm;
    fh_dm_row_params(&p.o, b, &prm);
    uint32_t bad = fh_dm_row_params_ok(&prm) ? 0u : INFO_BAD;
    if (!bad)
      bad = dec_row_lists(p.o, b, p.V, [&](int64_t id, double, bool) {
        atomicOr(&p.bitmap[b * words + (id >> 5)], 1u << (id & 31));
      });
    p.bad[b] = bad;
    if (bad) atomicExch(p.err, (int)FH_DEVERR_DECODE_PARAM);
  }
}

/* One warp updates row c (global b) of the block with the parked tile zr[0..nv) of ids v0...:
 * MAT writes the row's z to the fallback buffer; otherwise the split's statistics in rs[c] and
 * its candidate list (lk/lz/li rows of NC, sorted by (key, id), EMPTY at the end) are brought
 * up to date. */
template <typename T, bool MAT>
__device__ void row_update(const fparams& p, int c, int64_t b, int v0, int nv, const float* zr, split_stat* rs,
                           uint64_t* lk, double* lz, int32_t* li) {
  const int lane = (int)threadIdx.x & 31;
  if (MAT && !(p.only[b] & DEC_ROW_FALLBACK)) return;
  fh_decode_row_params_t prm;
  fh_dm_row_params(&p.o, b, &prm);
  const double temp = prm.temperature > 0.0 && isfinite(prm.temperature) ? prm.temperature : 1.0; /* 0: greedy */
  const T* bias = static_cast<const T*>(p.bias);
  const uint32_t* bm = p.bitmap ? p.bitmap + b * 4 * (int64_t)p.vt + v0 / 32 : nullptr;
  double zq[4];
  FH_UNROLL
  for (int q = 0; q < 4; ++q) {
    const int v = lane + 32 * q;
    double z = -INFINITY;
    if (v < nv) {
      z = (double)zr[v] + (bias ? (double)fh_to_float(bias[v0 + v]) : 0.0);
      if (bm && ((bm[q] >> lane) & 1u)) { /* a listed id: its edits in the reference's order */
        const int64_t id = v0 + v;
        dec_row_lists(p.o, b, p.V, [&](int64_t e, double val, bool ban) {
          if (e == id) z = ban ? val : z + val;
        });
      }
    }
    zq[q] = z;
  }
  if (MAT) {
    double* dst = p.zb + p.offs[b] + v0;
    FH_UNROLL
    for (int q = 0; q < 4; ++q)
      if (lane + 32 * q < nv) dst[lane + 32 * q] = zq[q];
    return;
  }
  split_stat& r = rs[c];
  /* Info bits and the online (m, Z, F, Z2) of the finite s. */
  uint32_t info = 0;
  double sq[4], mt = -INFINITY;
  bool el[4];
  FH_UNROLL
  for (int q = 0; q < 4; ++q) {
    const double z = zq[q];
    const bool valid = lane + 32 * q < nv;
    if (valid) info |= z != z ? INFO_NAN : z == INFINITY ? INFO_PINF : z > -INFINITY ? INFO_FINITE : 0u;
    sq[q] = z / temp;
    el[q] = valid && z == z && sq[q] > -INFINITY;
    if (el[q]) mt = fmax(mt, sq[q]);
  }
  info = __reduce_or_sync(0xffffffffu, info);
  mt = warp_max(mt);
  int nel = 0;
  FH_UNROLL
  for (int q = 0; q < 4; ++q) nel += __popc(__ballot_sync(0xffffffffu, el[q]));
  double m = r.m, Z = r.Z, F = r.F, Z2 = r.Z2;
  if (mt > -INFINITY) {
    double zs = 0.0, fs = 0.0, qs = 0.0;
    FH_UNROLL
    for (int q = 0; q < 4; ++q)
      if (el[q]) {
        const double d = sq[q] - mt, e = exp(d);
        zs += e;
        fs += e * d;
        qs += e * e;
      }
    lse_merge(m, Z, F, Z2, mt, warp_sum(zs), warp_sum(fs), warp_sum(qs));
  }
  /* Moments of the finite z (top-nσ rows). */
  double zc = r.zcnt, zmean = r.zmean, zm2 = r.zm2, zmax = r.zmax;
  if (prm.temperature != 0.0 && prm.sampler == FH_DECODE_TOP_N_SIGMA) {
    double n = 0.0, sum = 0.0, mx = -INFINITY;
    FH_UNROLL
    for (int q = 0; q < 4; ++q)
      if (lane + 32 * q < nv && isfinite(zq[q])) n += 1.0, sum += zq[q], mx = fmax(mx, zq[q]);
    n = warp_sum(n);
    if (n > 0.0) {
      const double mean = warp_sum(sum) / n;
      double dev = 0.0;
      FH_UNROLL
      for (int q = 0; q < 4; ++q)
        if (lane + 32 * q < nv && isfinite(zq[q])) dev += (zq[q] - mean) * (zq[q] - mean);
      moments_merge(zc, zmean, zm2, zmax, n, mean, warp_sum(dev), warp_max(mx));
    }
  }
  /* The keyed Gumbel-max over every finite id (rows whose rule keeps them all). */
  double gkey = r.gkey, gs = r.gs;
  int gid = r.gid;
  if (dec_keeps_all(prm, p.V)) {
    double bk = -INFINITY, bs = 0.0;
    int bi = -1;
    FH_UNROLL
    for (int q = 0; q < 4; ++q)
      if (el[q]) {
        const int id = v0 + lane + 32 * q;
        const double key = sq[q] + fh_dm_gumbel(prm.seed, prm.offset, (uint64_t)id);
        if (bi < 0 || key > bk) bk = key, bs = sq[q], bi = id; /* ids ascend with q */
      }
    FH_UNROLL
    for (int o = 16; o > 0; o >>= 1) {
      const double ok = __shfl_xor_sync(0xffffffffu, bk, o), os = __shfl_xor_sync(0xffffffffu, bs, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi >= 0 && (bi < 0 || ok > bk || (ok == bk && oi < bi))) bk = ok, bs = os, bi = oi;
    }
    if (bi >= 0 && (gid < 0 || bk > gkey)) gkey = bk, gs = bs, gid = bi; /* earlier tiles: lower ids */
  }
  /* The split's candidates: entries that beat the list's last are inserted one at a time. */
  uint64_t mk = lk[c * NC + lane];
  double mz = lz[c * NC + lane];
  int mi = li[c * NC + lane];
  uint64_t lastk = __shfl_sync(0xffffffffu, mk, 31);
  int lasti = __shfl_sync(0xffffffffu, mi, 31);
  FH_UNROLL
  for (int q = 0; q < 4; ++q) {
    const uint64_t ck = el[q] ? dec_key_of(sq[q]) : EMPTY;
    const int cid = v0 + lane + 32 * q;
    unsigned mask = __ballot_sync(0xffffffffu, el[q] && before(ck, cid, lastk, lasti));
    while (mask) {
      const int src = __ffs(mask) - 1;
      mask &= mask - 1;
      const uint64_t bk = __shfl_sync(0xffffffffu, ck, src);
      const double bz = __shfl_sync(0xffffffffu, zq[q], src);
      const int bi = __shfl_sync(0xffffffffu, cid, src);
      if (!before(bk, bi, lastk, lasti)) continue; /* warp-uniform */
      const int f = before(bk, bi, mk, mi);
      const uint64_t pk = __shfl_up_sync(0xffffffffu, mk, 1);
      const double pz = __shfl_up_sync(0xffffffffu, mz, 1);
      const int pi = __shfl_up_sync(0xffffffffu, mi, 1);
      const int pf = __shfl_up_sync(0xffffffffu, f, 1);
      if (f) {
        if (lane > 0 && pf) mk = pk, mz = pz, mi = pi;
        else mk = bk, mz = bz, mi = bi;
      }
      lastk = __shfl_sync(0xffffffffu, mk, 31);
      lasti = __shfl_sync(0xffffffffu, mi, 31);
    }
  }
  lk[c * NC + lane] = mk;
  lz[c * NC + lane] = mz;
  li[c * NC + lane] = mi;
  __syncwarp(); /* every lane has read r before lane 0 rewrites it */
  if (lane == 0) {
    r.m = m, r.Z = Z, r.F = F, r.Z2 = Z2;
    r.zcnt = zc, r.zmean = zmean, r.zm2 = zm2, r.zmax = zmax;
    r.gkey = gkey, r.gs = gs, r.gid = gid;
    r.nfin += nel;
    r.info |= info;
  }
  __syncwarp();
}

/* Block (row block x, split y): per 128-id tile of the split, the engine's mainloop computes
 * the [128 ids x 128 rows] logits, the epilogue parks them transposed over the free stages and
 * each warp updates its rows (c = warp + 8 n). */
template <typename T, typename Align, bool MAT>
__global__ void __launch_bounds__(fh_eng::THREADS, 1) decode_fused_tile_kernel(const __grid_constant__ fparams p) {
  using namespace fh_eng;
  FH_DYNAMIC_SMEM(unsigned char, smem);
  float* zt = reinterpret_cast<float*>(smem);
  split_stat* rs = reinterpret_cast<split_stat*>(smem + p.zt_bytes);
  uint64_t* lk = reinterpret_cast<uint64_t*>(rs + p.nrmax);
  double* lz = reinterpret_cast<double*>(lk + p.nrmax * NC);
  int32_t* li = reinterpret_cast<int32_t*>(lz + p.nrmax * NC);
  const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
  const int row0 = blockIdx.x * F_BN, nr = p.B - row0 < F_BN ? p.B - row0 : F_BN;
  if (MAT) { /* the fallback pass: only row blocks holding a flagged row */
    int any = 0;
    for (int r = threadIdx.x; r < nr; r += THREADS) any |= (int)(p.only[row0 + r] & DEC_ROW_FALLBACK);
    if (!__syncthreads_or(any)) return;
  } else {
    for (int r = threadIdx.x; r < nr; r += THREADS) {
      split_stat& s = rs[r];
      s.m = -INFINITY, s.Z = 0.0, s.F = 0.0, s.Z2 = 0.0;
      s.zcnt = 0.0, s.zmean = 0.0, s.zm2 = 0.0, s.zmax = -INFINITY;
      s.gkey = -INFINITY, s.gs = 0.0, s.gid = -1;
      s.nfin = 0, s.ekey = -1, s.eid = -1, s.info = 0u;
    }
    for (int i = threadIdx.x; i < nr * NC; i += THREADS) lk[i] = EMPTY, lz[i] = 0.0, li[i] = -1;
    /* visible to the warps after the mainloop's barriers */
  }
  const nt_operand<T> hb{static_cast<const T*>(p.H), p.ldh, nullptr, row0, nr, &p.tmh};
  const int t0 = blockIdx.y * p.tps, t1 = t0 + p.tps < p.vt ? t0 + p.tps : p.vt;
  for (int tile = t0; tile < t1; ++tile) {
    const int v0 = tile * F_BM, nv = p.V - v0 < F_BM ? p.V - v0 : F_BM;
    const nt_operand<T> ca{static_cast<const T*>(p.C), p.ldc, nullptr, v0, nv};
    acc_t acc;
    mainloop<T, Align>::run(acc, ca, hb, p.D, smem); /* ends with a barrier: the stages are free */
    FH_UNROLL
    for (int i = 0; i < MI; ++i)
      FH_UNROLL
      for (int j = 0; j < NJ; ++j)
        FH_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int c = frag_col(j, e);
          if (c < nr) zt[c * ZP + frag_row(i, e)] = acc.v[i][j][e];
        }
    __syncthreads(); /* the parked tile is complete */
    for (int c = warp; c < nr; c += F_WARPS)
      row_update<T, MAT>(p, c, row0 + c, v0, nv, zt + c * ZP, rs, lk, lz, li);
    __syncthreads(); /* every warp is done with the tile before the next tile's copies land */
  }
  if constexpr (!MAT) {
    for (int c = warp; c < nr; c += F_WARPS) { /* the split's results: warps own their rows */
      const int64_t b = row0 + c, at = b * p.splits + blockIdx.y;
      const int64_t ci = b * (int64_t)p.splits * NC + (int64_t)blockIdx.y * NC + lane;
      p.ckey[ci] = lk[c * NC + lane];
      p.cz[ci] = lz[c * NC + lane];
      p.cid[ci] = li[c * NC + lane];
      p.cval[ci] = (int32_t)(blockIdx.y * NC + lane);
      if (lane == 0) p.st[at] = rs[c];
    }
  }
}

/* One row: the splits merged in split order (thread 0; at most MAX_SPLITS), the certificate's
 * bound e* (the best last entry of a full list) and the candidate segment offsets. */
__global__ void decode_fused_merge_kernel(fparams p) {
  if (threadIdx.x != 0) return;
  const int64_t b = blockIdx.x;
  split_stat t = p.st[b * p.splits];
  t.ekey = -1, t.eid = -1;
  for (int s = 0; s < p.splits; ++s) {
    const split_stat& u = p.st[b * p.splits + s];
    if (s > 0) {
      lse_merge(t.m, t.Z, t.F, t.Z2, u.m, u.Z, u.F, u.Z2);
      moments_merge(t.zcnt, t.zmean, t.zm2, t.zmax, u.zcnt, u.zmean, u.zm2, u.zmax);
      if (u.gid >= 0 && (t.gid < 0 || u.gkey > t.gkey)) t.gkey = u.gkey, t.gs = u.gs, t.gid = u.gid;
      t.nfin += u.nfin;
      t.info |= u.info;
    }
    const int64_t last = b * (int64_t)p.splits * NC + (int64_t)s * NC + NC - 1;
    const uint64_t k = p.ckey[last];
    const int id = p.cid[last];
    if (k != EMPTY && (t.eid < 0 || before(k, id, (uint64_t)t.ekey, t.eid))) t.ekey = (int64_t)k, t.eid = id;
  }
  t.info |= p.bad[b];
  p.rt[b] = t;
  const int64_t seg = (int64_t)p.splits * NC;
  p.coffs[b] = (int32_t)(b * seg);
  if (b == p.B - 1) p.coffs[p.B] = (int32_t)(p.B * seg);
}

/* One row over its sorted candidates (kernels/decode_rule.cuh); flags it when undecided. */
__global__ void __launch_bounds__(DEC_THREADS) decode_fused_row_kernel(fparams p) {
  __shared__ dec_smem sm;
  const int64_t b = blockIdx.x, seg = (int64_t)p.splits * NC;
  const split_stat t = p.rt[b];
  const uint32_t info = t.info;
  if ((info & (INFO_NAN | INFO_PINF | INFO_BAD)) || !(info & INFO_FINITE)) { /* block-uniform */
    dec_write_degenerate(p.o, p.out, b, info, 0u);
    if (threadIdx.x == 0) p.only[b] = 0u;
    return;
  }
  const uint64_t* keys = p.ckey2 + b * seg;
  const int32_t* slot = p.cval2 + b * seg;
  const int32_t* cid = p.cid + b * seg;
  const double* cz = p.cz + b * seg;
  const auto s = [&](int64_t i) { return dec_s_of(keys[i]); };
  const auto id = [&](int64_t i) { return (int64_t)cid[slot[i]]; };
  const auto z = [&](int64_t i) { return cz[slot[i]]; };
  const int64_t listed = dec_partition_point(0, seg, [&](int64_t i) { return keys[i] != EMPTY; });
  /* Certified prefix: up to and including e*, or every listed candidate when no split's list
   * is full (then the lists hold every finite id). */
  const int64_t P = t.eid < 0 ? listed : dec_partition_point(0, listed, [&](int64_t i) {
    return !before((uint64_t)t.ekey, t.eid, keys[i], (int)id(i));
  });
  dec_totals tot;
  tot.m = t.m, tot.Z = t.Z, tot.F = t.F, tot.Z2 = t.Z2, tot.n_fin = t.nfin;
  tot.zcnt = t.zcnt, tot.zmean = t.zmean, tot.zm2 = t.zm2, tot.zmax = t.zmax;
  tot.gid = t.gid, tot.gs = t.gs;
  const bool done = decode_row_body(p.o, p.out, b, p.V, s, id, z, P, false, tot, 0u, sm);
  if (threadIdx.x == 0) p.only[b] = done ? 0u : DEC_ROW_FALLBACK;
}

/* Packed offsets of the flagged rows' z in the fallback buffer (one thread, in row order). */
__global__ void decode_fused_pack_kernel(fparams p) {
  if (threadIdx.x != 0) return;
  int32_t at = 0;
  for (int b = 0; b < p.B; ++b) {
    p.offs[b] = at;
    if (p.only[b] & DEC_ROW_FALLBACK) at += p.V;
  }
  p.offs[p.B] = at;
}

/* Splits from V alone: T = ceil(V / 128) tiles, at most MAX_SPLITS splits of whole tiles. */
void fused_split(int64_t V, int* vt, int* tps, int* splits) {
  const int64_t tiles = (V + F_BM - 1) / F_BM;
  const int64_t per = (tiles + MAX_SPLITS - 1) / MAX_SPLITS;
  *vt = (int)tiles;
  *tps = (int)(per > 0 ? per : 1);
  *splits = (int)(tiles > 0 ? (tiles + *tps - 1) / *tps : 1);
}

constexpr size_t AL = 256;
size_t rnd(size_t x) { return (x + AL - 1) / AL * AL; }

/* Shared memory of the tile kernel for row blocks of nrmax rows: the mainloop's ring, or the
 * parked tile over it, then the rows' states and lists (sm_90a ring, 128 rows: 224 KiB of 227). */
template <typename Align>
constexpr size_t zt_bytes_of(int nrmax) {
  return ((((size_t)nrmax * ZP * sizeof(float) > fh_eng::ring<Align>::bytes ? (size_t)nrmax * ZP * sizeof(float)
                                                                            : fh_eng::ring<Align>::bytes)) +
          127) /
         128 * 128;
}
template <typename Align>
constexpr size_t smem_of(int nrmax) {
  return zt_bytes_of<Align>(nrmax) +
         (size_t)nrmax * (sizeof(split_stat) + NC * (sizeof(uint64_t) + sizeof(double) + 4));
}

/* Workspace pieces (byte offsets); the fallback's from-logits workspace comes last. */
struct flayout {
  size_t bitmap, bad, st, rt, ckey, ckey2, cval, cval2, cz, cid, coffs, only, temp, temp_bytes, fb, fb_zb, fb_offs,
      total;
};

fh_status_t flayout_of(int64_t B, int64_t V, bool lists, const char* fn, flayout* L) {
  int vt, tps, splits;
  fused_split(V, &vt, &tps, &splits);
  const size_t nc = (size_t)B * splits * NC;
  size_t at = 0;
  L->bitmap = at, at += lists ? rnd(4 * (size_t)B * 4 * vt) : 0;
  L->bad = at, at += rnd(4 * (size_t)B);
  L->st = at, at += rnd(sizeof(split_stat) * (size_t)B * splits);
  L->rt = at, at += rnd(sizeof(split_stat) * (size_t)B);
  L->ckey = at, at += rnd(8 * nc);
  L->ckey2 = at, at += rnd(8 * nc);
  L->cval = at, at += rnd(4 * nc);
  L->cval2 = at, at += rnd(4 * nc);
  L->cz = at, at += rnd(8 * nc);
  L->cid = at, at += rnd(4 * nc);
  L->coffs = at, at += rnd(4 * ((size_t)B + 1));
  L->only = at, at += rnd(4 * (size_t)B);
  L->temp_bytes = 0;
  FH_TRY(fh_segmented_sort_u64_i32(NULL, &L->temp_bytes, NULL, NULL, NULL, NULL, (int)nc, (int)B, NULL, NULL, fn));
  L->temp = at, at += rnd(L->temp_bytes);
  size_t fb_total = 0;
  FH_TRY(fallback_layout(B, V, fn, &L->fb_zb, &L->fb_offs, &fb_total));
  L->fb = at, at += rnd(fb_total);
  L->total = at;
  return FH_SUCCESS;
}

fh_status_t fcheck_shape(const char* fn, int64_t B, int64_t V, int64_t D) {
  FH_TRY(fh_lce::lce_check_shape(fn, B, V, D));
  int vt, tps, splits;
  fused_split(V, &vt, &tps, &splits);
  if (B > 0 && (V > (int64_t)2147483647 / B || (int64_t)splits * NC > (int64_t)2147483647 / B))
    return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                        "B x V is %lld x %lld: the CUDA backend decodes at most 2^31 - 1 logits per call (split the "
                        "batch)",
                        (long long)B, (long long)V);
  if (B > 0 && D == 0)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                        "H has 0 columns: the CUDA backend's fused decoding needs D >= 1 (the logits are the bias "
                        "alone: use fh_decode_from_logits on it, or FH_BACKEND_CPU)");
  return FH_SUCCESS;
}

template <typename T, typename Align, bool MAT>
fh_status_t launch_tile(const char* fn, cudaStream_t s, const fparams& fp) {
  auto kern = decode_fused_tile_kernel<T, Align, MAT>;
  constexpr size_t most = smem_of<Align>(F_BN);
  FH_TRY(fh_cuda_status(fh_eng::allow_smem<most, fh_eng::optin<Align>::max>(kern), fn,
                        "cudaFuncSetAttribute(decode_fused_tile_kernel)"));
  fparams q = fp;
  q.zt_bytes = zt_bytes_of<Align>(fp.nrmax);
  FH_LAUNCH(kern, dim3(fh_lce::lce_blocks(fp.B, F_BN), (unsigned)fp.splits), dim3(fh_eng::THREADS),
            smem_of<Align>(fp.nrmax), s, q);
  return fh_cuda_launch_status(fn, "decode_fused_tile_kernel");
}

/* tma: the sm_90a mainloop (fp.tmh encoded by the caller; docs/hopper.md). */
template <bool MAT>
fh_status_t launch_tiles(const char* fn, cudaStream_t s, fh_dtype_t dtype, bool vec, bool tma, const fparams& fp) {
  LCE_DTYPE_SWITCH(dtype, T, {
    if (tma) FH_TRY((launch_tile<T, fh_eng::tma90_for<T>, MAT>(fn, s, fp)));
    else if (vec) FH_TRY((launch_tile<T, fh_eng::vec16, MAT>(fn, s, fp)));
    else FH_TRY((launch_tile<T, fh_eng::scalar, MAT>(fn, s, fp)));
  });
  return FH_SUCCESS;
}

} /* namespace */

extern "C" fh_status_t fh_cuda_decode_fused_workspace(int64_t B, int64_t V, int64_t D, int lists, const char* fn,
                                                      size_t* bytes) {
  *bytes = 0;
  FH_TRY(fcheck_shape(fn, B, V, D > 0 ? D : 1));
  if (B == 0 || V == 0) return FH_SUCCESS;
  flayout L;
  FH_TRY(flayout_of(B, V, lists != 0, fn, &L));
  *bytes = L.total;
  return FH_SUCCESS;
}

extern "C" fh_status_t fh_cuda_decode_fused(fh_cuda_state_t* st, struct CUstream_st* stream,
                                            const fh_decode_problem_t* pr, const fh_decode_outputs_t* out,
                                            void* workspace) {
  const char* fn = pr->fn;
  const fh_tensor_t *H = pr->src.H, *C = pr->src.C, *bias = pr->src.bias;
  const int64_t B = pr->src.B, V = pr->src.V, D = pr->src.D;
  FH_TRY(fcheck_shape(fn, B, V, D));
  if (B == 0) return FH_SUCCESS;
  const bool lists = pr->opt.bias_width > 0 || pr->opt.banned_width > 0;
  flayout L;
  FH_TRY(flayout_of(B, V, lists, fn, &L));
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  fparams p;
  p.o = pr->opt;
  p.H = H->data, p.C = C->data, p.bias = bias ? bias->data : NULL;
  p.ldh = H->row_stride, p.ldc = C->row_stride;
  p.B = (int)B, p.V = (int)V, p.D = (int)D;
  fused_split(V, &p.vt, &p.tps, &p.splits);
  p.nrmax = B < F_BN ? (int)B : F_BN;
  p.zt_bytes = 0; /* per mainloop: launch_tile */
  p.bitmap = lists ? reinterpret_cast<uint32_t*>(ws + L.bitmap) : NULL;
  p.bad = reinterpret_cast<uint32_t*>(ws + L.bad);
  p.st = reinterpret_cast<split_stat*>(ws + L.st);
  p.rt = reinterpret_cast<split_stat*>(ws + L.rt);
  p.ckey = reinterpret_cast<uint64_t*>(ws + L.ckey);
  p.ckey2 = reinterpret_cast<uint64_t*>(ws + L.ckey2);
  p.cval = reinterpret_cast<int32_t*>(ws + L.cval);
  p.cval2 = reinterpret_cast<int32_t*>(ws + L.cval2);
  p.cz = reinterpret_cast<double*>(ws + L.cz);
  p.cid = reinterpret_cast<int32_t*>(ws + L.cid);
  p.coffs = reinterpret_cast<int32_t*>(ws + L.coffs);
  p.only = reinterpret_cast<uint32_t*>(ws + L.only);
  p.zb = reinterpret_cast<double*>(ws + L.fb + L.fb_zb);
  p.offs = reinterpret_cast<int32_t*>(ws + L.fb + L.fb_offs);
  p.out = *out;
  p.err = st->d_error;
  cudaStream_t s = (cudaStream_t)stream;
  const size_t es = fh_dtype_size(H->dtype);
  const bool vec = fh_eng::vec16_ok(p.H, p.ldh, es) && fh_eng::vec16_ok(p.C, p.ldc, es);
  bool tma = false;
  LCE_DTYPE_SWITCH(H->dtype, T, { tma = fh_eng::pick_tma90<T>(vec, &p.tmh, p.H, B, D, p.ldh); });
  FH_LAUNCH(decode_fused_prep_kernel, dim3((unsigned)B), dim3(DEC_THREADS), 0, s, p);
  FH_TRY(fh_cuda_launch_status(fn, "decode_fused_prep_kernel"));
  FH_TRY(launch_tiles<false>(fn, s, H->dtype, vec, tma, p));
  FH_LAUNCH(decode_fused_merge_kernel, dim3((unsigned)B), dim3(32), 0, s, p);
  FH_TRY(fh_cuda_launch_status(fn, "decode_fused_merge_kernel"));
  size_t tb = L.temp_bytes;
  const int64_t nc = B * p.splits * NC;
  FH_TRY(fh_segmented_sort_u64_i32(ws + L.temp, &tb, p.ckey, p.ckey2, p.cval, p.cval2, (int)nc, (int)B, p.coffs, stream,
                                   fn));
  FH_LAUNCH(decode_fused_row_kernel, dim3((unsigned)B), dim3(DEC_THREADS), 0, s, p);
  FH_TRY(fh_cuda_launch_status(fn, "decode_fused_row_kernel"));
  /* The exact fallback over the undecided rows (each kernel exits at once for the others). */
  FH_LAUNCH(decode_fused_pack_kernel, dim3(1), dim3(32), 0, s, p);
  FH_TRY(fh_cuda_launch_status(fn, "decode_fused_pack_kernel"));
  FH_TRY(launch_tiles<true>(fn, s, H->dtype, vec, tma, p));
  return fallback_run(fn, stream, pr->opt, *out, B, V, ws + L.fb, p.only, st->d_error);
}
