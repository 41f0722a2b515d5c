/* decode_probs.cu: chain speculative acceptance (fh_spec_accept) and unfiltered sampling from
 * probabilities (fh_decode_from_probs without top-k / top-p / min-p / top-n) on the CUDA backend,
 * with the CPU reference's semantics (fusedhead_decode.h; docs/decoding.md, "From
 * probabilities" and "Speculative sampling"; reference src/ref/spec.c, src/ref/decode_probs.c).
 *
 * Formulas, per row: valid iff every p is finite and >= 0 and S = Σ p satisfies S > 0 and
 * |S − 1| <= tol. Sampling: token = argmax_{v : w_v > 0} (ln w_v + g_v), g_v = −ln(−ln u_v), u_v
 * the keyed Philox uniform of (seed, offset, v): words x0, x1 for fh_decode_from_probs (w = p),
 * x2, x3 for the speculative correction (w = max(0, p_t − p_d)) and bonus (w = p_t). Speculative
 * acceptance of draft i: a_i < p_t(d_i) / p_d(d_i) (p_d = 0: p_t > 0), a_i the uniform of
 * counter 2^64 − 1 − i (src/decode_math.h, shared with the reference).
 * Shapes: probabilities fp32 [rows x V] with row stride; draft tokens [B x K] int64; outputs as
 * fh_spec_outputs_t / fh_decode_outputs_t; one CTA of DEC_THREADS threads per output row.
 * Thread mapping: threads stride over the vocabulary; sums and the keyed argmax end in the fixed
 * shared-memory trees of kernels/decode_row.cuh; thread 0 runs the (short, sequential) acceptance
 * chain and writes the row's outputs.
 * Numerics: fp64. The keys, the acceptance quotients and every decision that does not involve a
 * sum are the reference's bit for bit (the emulator uses the host libm; real GPUs: CUDA's log,
 * docs/decoding.md "CUDA backend"). S, the entropy sum and Σ_A p are fp64 in tree order, so the
 * validity test can differ from the CPU's only for a row whose sum is within a few ulps of
 * 1 ± tol, and the fp32 log-probabilities by at most an ulp. Draft ids are checked on the device:
 * a row with one outside [0, V) is degenerate and raises FH_DEVERR_DECODE_PARAM, as does an output
 * row whose index is outside the input rows. No host sync. */
#include "decode_row.cuh"

namespace {

using namespace fh_dec;

/* Whether row[0..V) is a valid probability row; every thread gets the verdict and the sum. */
__device__ bool probs_row_valid(const float* row, int64_t V, double tol, dec_smem& sm, double* S_out) {
  double s = 0.0;
  int64_t bad = 0;
  for (int64_t v = threadIdx.x; v < V; v += DEC_THREADS) {
    const double x = row[v];
    bad |= !(isfinite(x) && x >= 0.0);
    s += x;
  }
  const double S = dec_block_sum(s, sm);
  const int64_t nbad = dec_block_sum_i(bad, sm);
  *S_out = S;
  return nbad == 0 && S > 0.0 && fabs(S - 1.0) <= tol;
}

/* argmax over {v : w(v) > 0} of ln w(v) + g_v (words x2, x3 when `second`), equal keys to the
 * lowest id; −1 when no weight is positive. Every thread calls it and gets the winner. */
template <class W>
__device__ int64_t keyed_argmax(const W& w, int64_t V, uint64_t seed, uint64_t off, bool second, dec_smem& sm) {
  double best = -INFINITY;
  int64_t tok = -1;
  for (int64_t v = threadIdx.x; v < V; v += DEC_THREADS) { /* ascending ids: strict > keeps the lowest */
    const double x = w(v);
    if (!(x > 0.0)) continue;
    const double g = second ? fh_dm_gumbel2(seed, off, (uint64_t)v) : fh_dm_gumbel(seed, off, (uint64_t)v);
    const double key = log(x) + g;
    if (tok < 0 || key > best) {
      best = key;
      tok = v;
    }
  }
  int64_t id, pos;
  dec_block_argmax(best, tok, 0, sm, &id, &pos);
  return id;
}

struct spec_params {
  const int64_t* draft;
  const float *pd, *pt;
  int64_t ldd, ldt, B, K, V;
  fh_spec_options_t o;
  fh_spec_outputs_t out;
  int* err;
};

__global__ void __launch_bounds__(DEC_THREADS) spec_accept_kernel(spec_params p) {
  __shared__ dec_smem sm;
  __shared__ int64_t sh_acc, sh_stop, sh_indep;
  __shared__ uint32_t sh_flags;
  const int64_t b = blockIdx.x, K = p.K, V = p.V, W = K + 1;
  const uint64_t seed = p.o.seed_per_row ? p.o.seed_per_row[b] : p.o.seed;
  const uint64_t off = p.o.offset_per_row ? p.o.offset_per_row[b] : p.o.offset;
  const float* pt = p.pt + b * W * p.ldt;
  const float* pd = p.pd + b * K * p.ldd;
  bool valid = true;
  double S;
  for (int64_t i = 0; i <= K; ++i) {
    valid &= probs_row_valid(pt + i * p.ldt, V, p.o.sum_tolerance, sm, &S);
    if (i < K) valid &= probs_row_valid(pd + i * p.ldd, V, p.o.sum_tolerance, sm, &S);
  }
  bool ids_ok = true;
  for (int64_t i = 0; i < K; ++i) ids_ok &= p.draft[b * K + i] >= 0 && p.draft[b * K + i] < V;
  int64_t* tok = p.out.output_tokens + b * W;
  if (!valid || !ids_ok) { /* uniform over the block: no barrier below is skipped by some threads only */
    if (threadIdx.x == 0) {
      if (!ids_ok) atomicExch(p.err, (int)FH_DEVERR_DECODE_PARAM);
      for (int64_t i = 0; i < W; ++i) tok[i] = -1;
      if (p.out.accepted) p.out.accepted[b] = 0;
      if (p.out.emitted) p.out.emitted[b] = 0;
      if (p.out.accepted_independent) p.out.accepted_independent[b] = 0;
      if (p.out.flags) p.out.flags[b] = FH_SPEC_FLAG_DEGENERATE;
    }
    return;
  }
  if (threadIdx.x == 0) { /* the chain, in order, exactly as the reference */
    int64_t acc = 0, indep = 0, stop = -1;
    uint32_t flags = 0;
    for (int64_t i = 0; i < K; ++i) {
      const int64_t d = p.draft[b * K + i];
      const double t = pt[i * p.ldt + d], q = pd[i * p.ldd + d];
      const int ok = fh_dm_spec_accepts(fh_dm_spec_uniform(seed, off, i), t, q);
      indep += ok;
      if (stop >= 0) continue;
      if (q == 0.0) flags |= FH_SPEC_FLAG_ZERO_DRAFT;
      if (ok) ++acc;
      else stop = i;
    }
    sh_acc = acc;
    sh_stop = stop;
    sh_indep = indep;
    sh_flags = flags;
  }
  __syncthreads();
  const int64_t stop = sh_stop;
  int64_t last;
  if (stop < 0) {
    const float* row = pt + K * p.ldt;
    last = keyed_argmax([&](int64_t v) { return (double)row[v]; }, V, seed, off, true, sm);
  } else {
    const float* t = pt + stop * p.ldt;
    const float* q = pd + stop * p.ldd;
    last = keyed_argmax(
        [&](int64_t v) {
          const double a = t[v], c = q[v];
          return a > c ? a - c : 0.0;
        },
        V, seed, off, true, sm);
    if (last < 0) { /* the residual is all zero: draw from p_t (same for every thread) */
      last = keyed_argmax([&](int64_t v) { return (double)t[v]; }, V, seed, off, true, sm);
      if (threadIdx.x == 0) sh_flags |= FH_SPEC_FLAG_RESIDUAL_FALLBACK;
    }
  }
  if (threadIdx.x == 0) {
    const int64_t acc = sh_acc;
    for (int64_t i = 0; i < acc; ++i) tok[i] = p.draft[b * K + i];
    tok[acc] = last;
    for (int64_t i = acc + 1; i < W; ++i) tok[i] = -1;
    if (p.out.accepted) p.out.accepted[b] = acc;
    if (p.out.emitted) p.out.emitted[b] = acc + 1;
    if (p.out.accepted_independent) p.out.accepted_independent[b] = sh_indep;
    if (p.out.flags) p.out.flags[b] = sh_flags;
  }
}

struct probs_params {
  const float* p;
  int64_t ld, rows, V; /* rows: the input's */
  fh_filter_options_t o;
  fh_decode_outputs_t out;
  int32_t* tok32;
  int* err;
};

/* fh_decode_from_probs with every filter off: A = {v : p_v > 0}. */
__global__ void __launch_bounds__(DEC_THREADS) from_probs_kernel(probs_params p) {
  __shared__ dec_smem sm;
  const int64_t i = blockIdx.x, V = p.V;
  const fh_filter_options_t& o = p.o;
  const uint64_t seed = o.seed_per_row ? o.seed_per_row[i] : o.seed;
  const uint64_t off = o.offset_per_row ? o.offset_per_row[i] : o.offset;
  const int64_t r = fh_filter_input_row(&o, i);
  const bool in_range = r >= 0 && r < p.rows; /* indices are device memory: checked here */
  if (!in_range && threadIdx.x == 0) atomicExch(p.err, (int)FH_DEVERR_DECODE_PARAM);
  const float* row = p.p + (in_range ? r : 0) * p.ld;
  double S;
  const bool valid = in_range && probs_row_valid(row, V, o.sum_tolerance, sm, &S);
  const fh_decode_outputs_t& out = p.out;
  if (!valid) {
    if (threadIdx.x == 0) {
      const int64_t t = o.degenerate_token;
      if (out.tokens) out.tokens[i] = t;
      if (p.tok32) p.tok32[i] = (int32_t)t;
      if (out.logprob) out.logprob[i] = NAN;
      if (out.full_logprob) out.full_logprob[i] = NAN;
      if (out.rank) out.rank[i] = 0;
      if (out.lse) out.lse[i] = NAN;
      if (out.entropy) out.entropy[i] = NAN;
      if (out.allowed_count) out.allowed_count[i] = 0;
      if (out.flags) out.flags[i] = FH_DECODE_FLAG_DEGENERATE | FH_DECODE_FLAG_INVALID_PROBS;
    }
    return;
  }
  const int64_t tok = keyed_argmax([&](int64_t v) { return (double)row[v]; }, V, seed, off, false, sm);
  const double pt = row[tok];
  double plogp = 0.0;
  int64_t above = 0, pos = 0;
  for (int64_t v = threadIdx.x; v < V; v += DEC_THREADS) {
    const double x = row[v];
    if (x > 0.0) {
      plogp += x * log(x);
      ++pos;
    }
    above += x > pt;
  }
  plogp = dec_block_sum(plogp, sm);
  above = dec_block_sum_i(above, sm);
  pos = dec_block_sum_i(pos, sm);
  if (threadIdx.x == 0) {
    const double lS = log(S);
    if (out.tokens) out.tokens[i] = tok;
    if (p.tok32) p.tok32[i] = (int32_t)tok;
    if (out.logprob) out.logprob[i] = (float)(log(pt) - lS); /* A = every positive id: Σ_A p = S */
    if (out.full_logprob) out.full_logprob[i] = (float)(log(pt) - lS);
    if (out.rank) out.rank[i] = 1 + above;
    if (out.lse) out.lse[i] = (float)lS;
    if (out.entropy) out.entropy[i] = (float)(lS - plogp / S);
    if (out.allowed_count) out.allowed_count[i] = pos;
    if (out.flags) out.flags[i] = 0u;
  }
}

} /* namespace */

extern "C" fh_status_t fh_cuda_spec_accept(fh_cuda_state_t* st, struct CUstream_st* stream,
                                           const fh_spec_problem_t* pr, const fh_spec_outputs_t* out) {
  if (pr->B == 0) return FH_SUCCESS;
  if (pr->B > 0x7fffffff)
    return fh_set_error(FH_ERR_UNSUPPORTED, pr->fn, "B = %lld rows exceeds the grid (2^31 - 1)", (long long)pr->B);
  spec_params p;
  p.draft = pr->draft;
  p.pd = static_cast<const float*>(pr->pd->data);
  p.pt = static_cast<const float*>(pr->pt->data);
  p.ldd = pr->pd->row_stride;
  p.ldt = pr->pt->row_stride;
  p.B = pr->B;
  p.K = pr->K;
  p.V = pr->V;
  p.o = pr->opt;
  p.out = *out;
  p.err = st->d_error;
  FH_LAUNCH(spec_accept_kernel, dim3((unsigned)p.B), dim3(DEC_THREADS), 0, (cudaStream_t)stream, p);
  return fh_cuda_launch_status(pr->fn, "spec_accept_kernel");
}

extern "C" fh_status_t fh_cuda_from_probs(fh_cuda_state_t* st, struct CUstream_st* stream,
                                          const fh_filter_problem_t* pr, const fh_decode_outputs_t* out,
                                          int32_t* tokens_i32) {
  if (pr->B == 0) return FH_SUCCESS;
  if (pr->B > 0x7fffffff)
    return fh_set_error(FH_ERR_UNSUPPORTED, pr->fn, "B = %lld rows exceeds the grid (2^31 - 1)", (long long)pr->B);
  probs_params p;
  p.p = static_cast<const float*>(pr->in->data);
  p.ld = pr->in->row_stride;
  p.rows = pr->in->rows;
  p.V = pr->V;
  p.o = pr->opt;
  p.out = *out;
  p.tok32 = tokens_i32;
  p.err = st->d_error;
  FH_LAUNCH(from_probs_kernel, dim3((unsigned)pr->B), dim3(DEC_THREADS), 0, (cudaStream_t)stream, p);
  return fh_cuda_launch_status(pr->fn, "from_probs_kernel");
}
