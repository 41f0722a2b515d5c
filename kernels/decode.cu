/* decode.cu: fh_decode_from_logits on the CUDA backend: every sampler of the reference
 * (greedy, temperature, min-p → top-k → top-p, top-nσ, ε, η, top-H, Bregman), exactly, with no
 * host synchronization (fusedhead.h, "Decoding"; design in docs/decoding.md, "CUDA backend").
 *
 * Formula: per row b, z = logits (+ sparse bias, bans at −inf), s = z / T (T = 1 for greedy),
 * the allowed set A by the row's rule over the order (s descending, id ascending), the token
 * argmax_{v ∈ A} (s_v + g_v) (or log q_v + g_v for α-Bregman), g_v = −ln(−ln u_v) with u_v the
 * Philox uniform of (seed_b, offset_b, v), and the statistics lse, entropy, rank, top-n.
 * Shapes: logits [B x V] fp32/fp16/bf16 with row stride; outputs as fh_decode_outputs_t.
 *
 * Three stream-ordered steps, every count on the device (graph-capturable):
 *   1. decode_prep_kernel<T>, grid B x 256 threads: loads the row into fp64 z (workspace),
 *      thread 0 applies the bias list in list order and then the bans (the reference's order,
 *      so z is bit-identical), checks the row's per-row parameters and list entries (out of
 *      range: device error FH_DEVERR_DECODE_PARAM, the row reports as degenerate), writes
 *      the order key of s = z / T (dec_key_of: ascending key = descending s, −0 = +0), the ids
 *      0..V−1, the segment offsets and the row's info bits (NaN, +inf, any finite, bad).
 *   2. fh_segmented_sort_u64_i32 (cub::DeviceSegmentedRadixSort, stable): per row the ids in
 *      (s descending, id ascending) order, the keys giving s back exactly.
 *   3. decode_row_kernel, grid B x 256 threads: one CTA per row over the sorted row
 *      (kernels/decode_row.cuh): m, lse, entropy, the rule's kept set, the keyed Gumbel-max over
 *      it, rank, log-probabilities and top-n, all in fp64 with the formulas of
 *      src/decode_math.h that the CPU reference uses; outputs rounded once to fp32.
 *
 * Workspace: 32·B·V bytes (z, keys and ids twice) + 4·(2B + 1) + CUB's temp storage, each piece
 * 256-byte aligned; B·V < 2^31. Numerics: z, s, the keys and the Gumbel keys are bit-identical to
 * the reference's; sums (Z, F, the prefix sums of top-p / top-H / Bregman, σ, the α
 * normaliser) are fp64 in another order (docs/decoding.md, "CUDA backend"). Row offsets are
 * int64. A row's results do not depend on the batch. */
#include "decode_row.cuh"
#include "segsort.cuh"

namespace {

using namespace fh_dec;

struct dec_params {
  fh_decode_options_t o; /* validated on the host; per-row arrays and lists in device memory */
  const void* z;
  int64_t ldz, B, V;
  double* zb;              /* [B x V] processed logits */
  uint64_t *kin, *kout;    /* [B x V] order keys, before / after the sort */
  int32_t *iin, *iout;     /* [B x V] ids */
  int32_t* offs;           /* [B + 1] segment offsets */
  uint32_t* info;          /* [B] INFO_* bits */
  fh_decode_outputs_t out; /* device pointers */
  int* err;
};

template <typename T>
__global__ void __launch_bounds__(DEC_THREADS) decode_prep_kernel(dec_params p) {
  __shared__ uint32_t sh_info;
  const int t = threadIdx.x;
  const int64_t b = blockIdx.x, V = p.V;
  const T* src = static_cast<const T*>(p.z) + b * p.ldz;
  double* z = p.zb + b * V;
  for (int64_t j = t; j < V; j += DEC_THREADS) z[j] = (double)fh_to_float(src[j]);
  fh_decode_row_params_t prm;
  fh_dm_row_params(&p.o, b, &prm);
  if (t == 0) {
    p.offs[b] = (int32_t)(b * V);
    if (b == p.B - 1) p.offs[p.B] = (int32_t)(p.B * V);
  }
  __syncthreads(); /* z complete before thread 0 edits it */
  if (t == 0) {
    const fh_decode_options_t& o = p.o;
    uint32_t bad = fh_dm_row_params_ok(&prm) ? 0u : INFO_BAD;
    if (o.bias_width > 0) { /* list order: repeated ids add up as on the CPU */
      const int64_t c = o.bias_count[b];
      if (c < 0 || c > o.bias_width) bad = INFO_BAD;
      for (int64_t i = 0; !bad && i < c; ++i) {
        const int64_t id = o.bias_ids[b * o.bias_width + i];
        const float val = o.bias_values[b * o.bias_width + i];
        if (id < 0 || id >= V || !isfinite(val)) bad = INFO_BAD;
        else z[id] += (double)val;
      }
    }
    if (o.banned_width > 0) { /* then the bans: −inf wins over any bias */
      const int64_t c = o.banned_count[b];
      if (c < 0 || c > o.banned_width) bad = INFO_BAD;
      for (int64_t i = 0; !bad && i < c; ++i) {
        const int64_t id = o.banned_ids[b * o.banned_width + i];
        if (id < 0 || id >= V) bad = INFO_BAD;
        else z[id] = -INFINITY;
      }
    }
    sh_info = bad;
  }
  __syncthreads(); /* the edited z and sh_info visible to the block */
  const double temp = prm.temperature > 0.0 && isfinite(prm.temperature) ? prm.temperature : 1.0; /* 0: greedy */
  uint32_t f = 0;
  for (int64_t j = t; j < V; j += DEC_THREADS) {
    const double zj = z[j];
    f |= zj != zj ? INFO_NAN : zj == INFINITY ? INFO_PINF : zj > -INFINITY ? INFO_FINITE : 0u;
    p.kin[b * V + j] = dec_key_of(zj / temp);
    p.iin[b * V + j] = (int32_t)j;
  }
  if (f) atomicOr(&sh_info, f);
  __syncthreads();
  if (t == 0) {
    p.info[b] = sh_info;
    if (sh_info & INFO_BAD) atomicExch(p.err, (int)FH_DEVERR_DECODE_PARAM);
  }
}

/* FH_DECODE_STANDARD on the sorted row: min-p, top-k (tie-inclusive) and top-p each keep a
 * prefix (src/ref/decode_row.c, fh_ref_decode_rule_standard). */
template <class S>
__device__ int64_t rule_standard(const fh_decode_row_params_t& prm, const S& s, int64_t n_fin, int64_t V, double m,
                                 dec_smem& sm) {
  int64_t n = n_fin;
  if (prm.min_p > 0.0) {
    const double thr = fh_dm_min_p_threshold(m, prm.min_p);
    n = dec_partition_point(0, n, [&](int64_t i) { return s(i) >= thr; });
  }
  if (prm.top_k > 0 && prm.top_k < V && prm.top_k < n) { /* the tie group of the k-th stays whole */
    const double sk = s(prm.top_k - 1);
    n = dec_partition_point(0, n, [&](int64_t i) { return s(i) >= sk; });
  }
  if (prm.top_p < 1.0) {
    const auto term = [&](int64_t j) { return exp(s(j) - m); };
    double Zs = 0.0, unused = 0.0;
    dec_scan_first(n, term, [](int64_t, double, double) { return false; }, &Zs, sm);
    /* the first tie group (after the first) whose mass strictly above is not < top_p */
    n = dec_scan_first(
        n, term,
        [&](int64_t j, double above, double) {
          return j > 0 && s(j) != s(j - 1) && !fh_dm_top_p_keeps(above, Zs, prm.top_p);
        },
        &unused, sm);
  }
  return n;
}

__device__ void write_degenerate(const dec_params& p, int64_t b, uint32_t info) {
  const fh_decode_outputs_t& out = p.out;
  const int64_t n = p.o.num_logprobs;
  if (threadIdx.x == 0) {
    out.tokens[b] = p.o.degenerate_token;
    if (out.logprob) out.logprob[b] = NAN;
    if (out.full_logprob) out.full_logprob[b] = NAN;
    if (out.rank) out.rank[b] = 0;
    if (out.lse) out.lse[b] = (info & (INFO_NAN | INFO_BAD)) ? NAN : (info & INFO_PINF) ? INFINITY : -INFINITY;
    if (out.entropy) out.entropy[b] = NAN;
    if (out.allowed_count) out.allowed_count[b] = 0;
    if (out.flags) out.flags[b] = FH_DECODE_FLAG_DEGENERATE;
  }
  for (int64_t i = threadIdx.x; i < n; i += DEC_THREADS) {
    if (out.topn_ids) out.topn_ids[b * n + i] = -1;
    if (out.topn_logprobs) out.topn_logprobs[b * n + i] = NAN;
  }
}

__global__ void __launch_bounds__(DEC_THREADS) decode_row_kernel(dec_params p) {
  __shared__ dec_smem sm;
  const int t = threadIdx.x;
  const int64_t b = blockIdx.x, V = p.V, nlp = p.o.num_logprobs;
  const fh_decode_outputs_t& out = p.out;
  const uint32_t info = p.info[b];
  if ((info & (INFO_NAN | INFO_PINF | INFO_BAD)) || !(info & INFO_FINITE)) { /* block-uniform */
    write_degenerate(p, b, info);
    return;
  }
  const uint64_t* keys = p.kout + b * V;
  const int32_t* ids = p.iout + b * V;
  const double* z = p.zb + b * V;
  const auto s = [&](int64_t i) { return dec_s_of(keys[i]); };
  fh_decode_row_params_t prm;
  fh_dm_row_params(&p.o, b, &prm);
  const bool greedy = prm.temperature == 0.0;
  const double m = s(0); /* position 0: the argmax, lowest id among ties */
  const int64_t n_fin = dec_partition_point(0, V, [&](int64_t i) { return s(i) > -INFINITY; });
  double zp = 0.0, fp = 0.0;
  for (int64_t i = t; i < n_fin; i += DEC_THREADS) {
    const double d = s(i) - m, e = exp(d);
    zp += e;
    fp += e * d;
  }
  const double Z = dec_block_sum(zp, sm), F = dec_block_sum(fp, sm);
  const double lse = m + log(Z), h = log(Z) - F / Z;

  uint32_t flags = 0;
  int64_t prefix = -1; /* rules keeping a sorted prefix set it; otherwise a predicate (pred) */
  int pred = 0;        /* 1: top-nσ on z, 2: ε / η on log p */
  bool nsig_off = false;
  double thr = 0.0;
  if (greedy) {
    prefix = 1;
    flags |= FH_DECODE_FLAG_GREEDY;
  } else {
    switch (prm.sampler) {
      case FH_DECODE_STANDARD: prefix = rule_standard(prm, s, n_fin, V, m, sm); break;
      case FH_DECODE_TOP_N_SIGMA: {
        nsig_off = !(prm.top_n_sigma > 0.0) || V <= 1;
        double sp = 0.0, zm = -INFINITY;
        int64_t cp = 0;
        for (int64_t j = t; j < V; j += DEC_THREADS)
          if (isfinite(z[j])) {
            ++cp;
            sp += z[j];
            zm = fmax(zm, z[j]);
          }
        const int64_t cnt = dec_block_sum_i(cp, sm);
        const double mean = dec_block_sum(sp, sm) / (double)cnt, zmax = dec_block_max(zm, sm);
        double mp = 0.0;
        for (int64_t j = t; j < V; j += DEC_THREADS)
          if (isfinite(z[j])) mp += (z[j] - mean) * (z[j] - mean);
        thr = fh_dm_n_sigma_threshold(zmax, prm.top_n_sigma, dec_block_sum(mp, sm), (double)cnt);
        pred = 1;
        break;
      }
      case FH_DECODE_EPSILON:
      case FH_DECODE_ETA:
        thr = fh_dm_eps_eta_threshold(prm.sampler == FH_DECODE_ETA, prm.epsilon, h);
        pred = 2;
        break;
      case FH_DECODE_TOP_H: {
        const int64_t N = prm.top_h_candidates < n_fin ? prm.top_h_candidates : n_fin;
        const auto term = [&](int64_t j) { return fh_dm_top_h_term(s(j) - lse); };
        double HN = 0.0, unused = 0.0;
        dec_scan_first(N, term, [](int64_t, double, double) { return false; }, &HN, sm);
        const double tau = prm.top_h_alpha * HN;
        /* H_j is the same computation as HN's prefix, so α = 1 keeps all N */
        const int64_t k = dec_scan_first(N, term, [&](int64_t, double, double H) { return H > tau; }, &unused, sm);
        prefix = k > 1 ? k : 1;
        break;
      }
      case FH_DECODE_BREGMAN:
      default: {
        double unused = 0.0;
        const int64_t j = dec_scan_first(
            n_fin, [&](int64_t i) { return exp(s(i) - lse); },
            [&](int64_t i, double, double P) {
              const double pnext = i + 1 < n_fin ? exp(s(i + 1) - lse) : 0.0;
              return fh_dm_bregman_stop(pnext, P, prm.bregman_lambda) != 0;
            },
            &unused, sm);
        prefix = j < n_fin ? j + 1 : n_fin;
        break;
      }
    }
  }
  /* The rule's set before the union with the argmax (position 0). */
  const auto rule = [&](int64_t i) -> bool {
    if (prefix >= 0) return i < prefix;
    if (pred == 1) {
      const double zi = z[ids[i]];
      return isfinite(zi) && (nsig_off || zi >= thr);
    }
    const double lp = s(i) - lse;
    return lp > -INFINITY && lp >= thr;
  };
  int64_t cnt0 = prefix;
  if (prefix < 0) {
    int64_t c = 0;
    for (int64_t i = t; i < n_fin; i += DEC_THREADS) c += rule(i);
    cnt0 = dec_block_sum_i(c, sm);
  }
  if (cnt0 == 0) flags |= FH_DECODE_FLAG_ARGMAX_FALLBACK;
  const int64_t count = cnt0 + (rule(0) ? 0 : 1);
  const int64_t n_lim = prefix >= 0 ? (prefix > 1 ? prefix : 1) : n_fin;
  const auto allowed = [&](int64_t i) { return i == 0 || rule(i); };

  /* α-Bregman renormalisation (α != 1) on the first k* > 1 tokens: bisection on c′. */
  const bool alpha_q = !greedy && prm.sampler == FH_DECODE_BREGMAN && prm.bregman_alpha != 1.0 && prefix > 1;
  const double a = prm.bregman_alpha - 1.0, lp1 = s(0) - lse;
  double c = 0.0, lt = 0.0;
  const auto lq = [&](int64_t i, double cc) { return lp1 + fh_dm_alpha_logratio(a, (s(i) - lse) - lp1, cc); };
  if (alpha_q) {
    double lo, hi;
    fh_dm_alpha_bracket(a, lp1, &lo, &hi);
    for (int it = 0; it < FH_DM_ALPHA_MAX_ITERS; ++it) { /* lo, hi are block-uniform */
      const double mid = 0.5 * (lo + hi);
      if (mid <= lo || mid >= hi) break;
      double ps = 0.0;
      for (int64_t i = t; i < prefix; i += DEC_THREADS) ps += exp(lq(i, mid));
      fh_dm_alpha_step(a, dec_block_sum(ps, sm), mid, &lo, &hi);
    }
    c = fh_dm_alpha_root(a, lo, hi);
    double ps = 0.0;
    for (int64_t i = t; i < prefix; i += DEC_THREADS) ps += exp(lq(i, c));
    lt = log(dec_block_sum(ps, sm));
  }
  double lseA = 0.0;
  if (!alpha_q) { /* q = p on A renormalised */
    double zp2 = 0.0;
    for (int64_t i = t; i < n_lim; i += DEC_THREADS)
      if (allowed(i)) zp2 += exp(s(i) - m);
    lseA = m + log(dec_block_sum(zp2, sm));
  }

  /* The keyed Gumbel-max over A; equal keys go to the lower id. */
  int64_t tok = ids[0], pos = 0;
  if (!greedy) {
    double best = -INFINITY;
    int64_t bid = -1, bpos = -1;
    for (int64_t i = t; i < n_lim; i += DEC_THREADS) {
      if (!allowed(i)) continue;
      const int64_t id = ids[i];
      const double key = (alpha_q ? lq(i, c) - lt : s(i)) + fh_dm_gumbel(prm.seed, prm.offset, (uint64_t)id);
      if (bid < 0 || key > best || (key == best && id < bid)) {
        best = key;
        bid = id;
        bpos = i;
      }
    }
    dec_block_argmax(best, bid, bpos, sm, &tok, &pos);
  }
  const double st = s(pos);
  if (t == 0) {
    out.tokens[b] = tok;
    if (out.logprob) out.logprob[b] = greedy ? 0.0f : (float)(alpha_q ? lq(pos, c) - lt : st - lseA);
    if (out.full_logprob) out.full_logprob[b] = (float)(st - lse);
    if (out.rank) out.rank[b] = 1 + dec_partition_point(0, pos, [&](int64_t i) { return s(i) > st; });
    if (out.lse) out.lse[b] = (float)lse;
    if (out.entropy) out.entropy[b] = (float)h;
    if (out.allowed_count) out.allowed_count[b] = count;
    if (out.flags) out.flags[b] = flags;
  }
  for (int64_t i = t; i < nlp; i += DEC_THREADS) {
    if (out.topn_ids) out.topn_ids[b * nlp + i] = ids[i];
    if (out.topn_logprobs) out.topn_logprobs[b * nlp + i] = (float)(s(i) - lse);
  }
}

constexpr size_t DEC_ALIGN = 256;
size_t dec_round(size_t x) { return (x + DEC_ALIGN - 1) / DEC_ALIGN * DEC_ALIGN; }

/* Offsets of the workspace pieces; `temp_bytes` from the CUB query. */
struct dec_layout {
  size_t zb, kin, kout, iin, iout, offs, info, temp, temp_bytes, total;
};

fh_status_t dec_layout_of(int64_t B, int64_t V, const char* fn, dec_layout* L) {
  const size_t n = (size_t)B * (size_t)V;
  size_t at = 0;
  L->zb = at, at += dec_round(8 * n);
  L->kin = at, at += dec_round(8 * n);
  L->kout = at, at += dec_round(8 * n);
  L->iin = at, at += dec_round(4 * n);
  L->iout = at, at += dec_round(4 * n);
  L->offs = at, at += dec_round(4 * ((size_t)B + 1));
  L->info = at, at += dec_round(4 * (size_t)B);
  L->temp_bytes = 0;
  FH_TRY(fh_segmented_sort_u64_i32(NULL, &L->temp_bytes, NULL, NULL, NULL, NULL, (int)n, (int)B, NULL, NULL, fn));
  L->temp = at, at += dec_round(L->temp_bytes);
  L->total = at;
  return FH_SUCCESS;
}

fh_status_t dec_check_shape(const char* fn, int64_t B, int64_t V) {
  if (B > 0 && V > (int64_t)2147483647 / B)
    return fh_set_error(FH_ERR_UNSUPPORTED, fn,
                        "B x V is %lld x %lld: the CUDA backend decodes at most 2^31 - 1 logits per call (split the "
                        "batch)",
                        (long long)B, (long long)V);
  return FH_SUCCESS;
}

template <typename T>
fh_status_t launch_prep(const char* fn, cudaStream_t s, const dec_params& p) {
  auto kern = decode_prep_kernel<T>;
  FH_LAUNCH(kern, dim3((unsigned)p.B), dim3(DEC_THREADS), 0, s, p);
  return fh_cuda_launch_status(fn, "decode_prep_kernel");
}

} /* namespace */

extern "C" fh_status_t fh_cuda_decode_workspace(int64_t B, int64_t V, const char* fn, size_t* bytes) {
  *bytes = 0;
  FH_TRY(dec_check_shape(fn, B, V));
  if (B == 0 || V == 0) return FH_SUCCESS;
  dec_layout L;
  FH_TRY(dec_layout_of(B, V, fn, &L));
  *bytes = L.total;
  return FH_SUCCESS;
}

extern "C" fh_status_t fh_cuda_decode(fh_cuda_state_t* st, struct CUstream_st* stream, const fh_decode_problem_t* pr,
                                      const fh_decode_outputs_t* out, void* workspace) {
  const char* fn = pr->fn;
  const fh_tensor_t* z = pr->src.logits;
  const int64_t B = pr->src.B, V = pr->src.V;
  FH_TRY(dec_check_shape(fn, B, V));
  if (B == 0) return FH_SUCCESS;
  dec_layout L;
  FH_TRY(dec_layout_of(B, V, fn, &L));
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  dec_params p;
  p.o = pr->opt;
  p.z = z->data;
  p.ldz = z->row_stride;
  p.B = B;
  p.V = V;
  p.zb = reinterpret_cast<double*>(ws + L.zb);
  p.kin = reinterpret_cast<uint64_t*>(ws + L.kin);
  p.kout = reinterpret_cast<uint64_t*>(ws + L.kout);
  p.iin = reinterpret_cast<int32_t*>(ws + L.iin);
  p.iout = reinterpret_cast<int32_t*>(ws + L.iout);
  p.offs = reinterpret_cast<int32_t*>(ws + L.offs);
  p.info = reinterpret_cast<uint32_t*>(ws + L.info);
  p.out = *out;
  p.err = st->d_error;
  cudaStream_t s = (cudaStream_t)stream;
  switch (z->dtype) {
    case FH_DTYPE_F32: FH_TRY(launch_prep<float>(fn, s, p)); break;
    case FH_DTYPE_F16: FH_TRY(launch_prep<__half>(fn, s, p)); break;
    case FH_DTYPE_BF16: FH_TRY(launch_prep<__nv_bfloat16>(fn, s, p)); break;
    default: return fh_set_error(FH_ERR_INTERNAL, fn, "dtype %d reached the decoding kernels", (int)z->dtype);
  }
  size_t tb = L.temp_bytes;
  FH_TRY(fh_segmented_sort_u64_i32(ws + L.temp, &tb, p.kin, p.kout, p.iin, p.iout, (int)(B * V), (int)B, p.offs,
                                   stream, fn));
  FH_LAUNCH(decode_row_kernel, dim3((unsigned)B), dim3(DEC_THREADS), 0, s, p);
  return fh_cuda_launch_status(fn, "decode_row_kernel");
}
