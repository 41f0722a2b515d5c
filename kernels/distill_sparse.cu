/* Sparse (offline) teacher, the per-row pass (docs/distillation_cuda.md "Sparse teacher"): K
 * (id, log-probability) pairs per row against the student's full-vocabulary softmax, whose
 * m and ln Z the dense statistics kernel has computed (the teacher's mainloop skipped).
 *
 * distill_sparse_row_kernel<T>: one block of 128 threads per row (rows that are not valid exit).
 *   1. The four warps take the entries k in turn: lane d-strided dot product of Es_i and Cs_id
 *      (fp32 FMAs on the values, which the tiles also read exactly: fp32 as three bf16 pieces
 *      to 2^-24, docs/engine.md; so only the summation order differs), a fixed xor tree over the
 *      lanes, then u = (dot + bs_id)·(1/T) with the tiles' rounding and
 *      X_k = (u − m_u) − ln Z_u into the workspace. Checks: id in [0, V), not repeated (lanes compare
 *      the earlier entries: O(K²) per row), log-prob not NaN or +inf.
 *   2. Warp 0: the normalizer log Σ_S e^{logp/T} (renormalize), then per entry
 *      Y_k (logp/T − normalizer, or logp as given) and the divergence element (term, qa) of
 *      kernels/distill_div.cuh; Σ term, Σ qa, π = Σ p and Σ_S q in fp64 per lane, summed in
 *      lane order. Lane 0: the rest bucket (renormalize ρ = 0, remainder ρ = max(0, 1 − π),
 *      none and K = V: no bucket) against q_R = max(0, 1 − Σ_S q), its element added to D and
 *      S, and a_R = a(ρ/q_R). Checks: a finite log-prob, remainder π <= 1 + 1e-3.
 *   Forward: D, S into the one-split partials [2 x N] and a_R into the row statistics, which
 *   distill_fin_row_kernel turns into the loss and the state (slot 1 = a_R). Backward: the
 *   entry's correction cs (qa − q a_R) (cs, a_R from the backward's row coefficients) and its id
 *   as int32 for sparse_g_soft (kernels/distill_sparse.cuh).
 * A row that fails a check raises FH_DEVERR_BAD_SPARSE_TEACHER and is skipped: D = S = a_R = 0
 * (forward), ids -1 (backward: no corrections); the hard term is unaffected.
 * Cost: N K D_s FMAs and N K rows of Cs read (L2-resident for frequent ids) per pass, against
 * N V D_s of the tiles: at K = 100, V = 128256 about 0.08 % of the FLOPs. q_R is 1 − Σ_S q in
 * fp64 from fp32 q: its absolute error is about K·2^-24 (each q carries fp32 rounding), so a
 * rest mass below ~1e-6 has a large relative error (the reference sums the complement in log
 * space). */
#include <math.h>

#include "distill_sparse.cuh"

namespace fh_dst {

constexpr int SP_THREADS = 128;
constexpr double SP_MASS_SLACK = 1e-3; /* as src/distill.c: engines round their log-probs */

struct sparse_row_params {
  head hs;
  const int64_t* ids;
  const float* lp;
  const int64_t* targets;
  int64_t ignore_index;
  int K, N, V, mode, backward;
  float invT;
  dev_div dv;
  const float *m_u, *lnz_u; /* [N] each: m and ln Z of u (forward row statistics 0, 1; backward coef 0, 1) */
  const float* coef;  /* backward: [NC x N] */
  float* xk;          /* [N x K]: X per entry (backward: the corrections, in place) */
  int* ids32;         /* backward */
  float *part, *aR;   /* forward */
  int* err;
};

/* An operand element as the tensor cores read it: exactly (16-bit types directly, fp32 as three
 * bf16 pieces whose sum is the value to 2^-24, docs/engine.md "fp32 inputs"). */
template <typename T>
__device__ __forceinline__ float tc_view(T x) {
  return fh_to_float(x);
}

template <typename T>
__global__ void __launch_bounds__(SP_THREADS) distill_sparse_row_kernel(sparse_row_params p) {
  __shared__ int bad;
  __shared__ double sums[4][32];
  const int i = (int)blockIdx.x, warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
  int64_t y;
  if (!row_valid(p.targets, p.ignore_index, p.V, i, &y)) return; /* block-uniform */
  const size_t base = (size_t)i * p.K;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  const float mu = p.m_u[i], lnzu = p.lnz_u[i];
  const T* E = (const T*)p.hs.E + (size_t)i * p.hs.lde;
  for (int k = warp; k < p.K; k += SP_THREADS / 32) {
    const int64_t id = p.ids[base + k];
    const bool in = id >= 0 && id < p.V;
    float a = 0.0f;
    if (in) {
      const T* C = (const T*)p.hs.C + (size_t)id * p.hs.ldc;
      for (int d = lane; d < p.hs.D; d += 32) a = fmaf(tc_view(E[d]), tc_view(C[d]), a);
    }
    a = fh_warp_sum(a);
    bool dup = false;
    for (int k2 = lane; k2 < k; k2 += 32) dup = dup || p.ids[base + k2] == id;
    dup = __any_sync(FH_FULL_MASK, dup) != 0;
    if (lane == 0) {
      const float l = p.lp[base + k];
      if (!in || dup || isnan(l) || l == INFINITY) atomicOr(&bad, 1);
      const float b = in && p.hs.bias ? fh_to_float(((const T*)p.hs.bias)[id]) : 0.0f;
      p.xk[base + k] = in ? __fsub_rn(tempered(fh_eng::raw_logit(a, b), p.invT) - mu, lnzu) : 0.0f;
    }
  }
  __syncthreads();
  if (warp != 0) return; /* warp-uniform; no block barrier follows */
  const bool renorm = p.mode == FH_DISTILL_SPARSE_RENORMALIZE;
  /* Max, then Σ e^{x−m} (two passes over K: no branchy merges in the warp reduction). */
  float mx = -INFINITY, z = 0.0f;
  for (int k = lane; k < p.K; k += 32) mx = fmaxf(mx, renorm ? p.lp[base + k] * p.invT : p.lp[base + k]);
  mx = fh_warp_max(mx);
  if (renorm && mx > -INFINITY) {
    for (int k = lane; k < p.K; k += 32) z += expf(p.lp[base + k] * p.invT - mx);
    z = fh_warp_sum(z);
  }
  const float norm = renorm ? mx + logf(z) : 0.0f;
  if (lane == 0 && !(mx > -INFINITY)) atomicOr(&bad, 1); /* no finite log-prob */
  __syncwarp();
  /* Per-lane running sums Σ term, Σ qa, π, Σ_S q in fp64 in shared memory (each lane its own
   * column: few values stay live across the element's calls), then summed in lane order. */
  for (int q = 0; q < 4; ++q) sums[q][lane] = 0.0;
  /* backward coefficients (kernels/distill_bwd.cu): cs in row 7, a_R in row 2 */
  const float cs = p.backward ? p.coef[7 * (size_t)p.N + i] : 0.0f, aRs = p.backward ? p.coef[2 * (size_t)p.N + i] : 0.0f;
  for (int k = lane; k < p.K; k += 32) {
    const float X = p.xk[base + k], l = p.lp[base + k], Y = renorm ? l * p.invT - norm : l;
    float term, qa;
    div_eval(p.dv, X, Y, term, qa);
    if (X == -INFINITY) qa = 0.0f; /* a masked student class has zero gradient */
    sums[0][lane] += term, sums[1][lane] += qa, sums[2][lane] += (double)expf(Y), sums[3][lane] += (double)expf(X);
    if (p.backward) p.xk[base + k] = cs * (qa - expf(X) * aRs); /* the support's correction */
  }
  __syncwarp();
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  FH_NO_UNROLL
  for (int l = 0; l < 32; ++l) /* lane order: deterministic */
    for (int q = 0; q < 4; ++q) acc[q] += sums[q][l];
  const bool remainder = p.mode == FH_DISTILL_SPARSE_REMAINDER;
  const bool rejected = bad || (remainder && acc[2] > 1.0 + SP_MASS_SLACK);
  if (rejected && lane == 0) atomicExch(p.err, (int)FH_DEVERR_BAD_SPARSE_TEACHER);
  if (p.backward) {
    for (int k = lane; k < p.K; k += 32) p.ids32[base + k] = rejected ? -1 : (int)p.ids[base + k];
    return;
  }
  if (lane != 0) return;
  double D = acc[0], S = acc[1];
  float aR = 0.0f;
  if (p.mode != FH_DISTILL_SPARSE_NONE && p.K < p.V) {
    const double qR = acc[3] < 1.0 ? 1.0 - acc[3] : 0.0, rho = remainder && acc[2] < 1.0 ? 1.0 - acc[2] : 0.0;
    const float lq = logf((float)qR), lr = logf((float)rho);
    float term, qa;
    if (qR > 0.0 || rho > 0.0) {
      div_eval(p.dv, lq, lr, term, qa);
      D += term;
    }
    if (qR > 0.0) {
      S += qa;
      div_eval(p.dv, 0.0f, lr - lq, term, qa); /* q = 1, p = ρ/q_R: qa = a(ρ/q_R) */
      aR = qa;
    }
  }
  p.part[i] = rejected ? 0.0f : (float)D;
  p.part[(size_t)p.N + i] = rejected ? 0.0f : (float)S;
  p.aR[i] = rejected ? 0.0f : aR;
}

static sparse_row_params row_params(const fh_distill_problem_t* p, int* err, const float* m_u, const float* lnz_u,
                                    void* area) {
  sparse_row_params r;
  r.hs = head_of(p->Es, p->Cs, p->bs);
  r.ids = p->ids, r.lp = p->logprobs, r.targets = p->targets, r.ignore_index = p->opt.ignore_index;
  r.K = (int)p->K, r.N = (int)p->N, r.V = (int)p->V, r.mode = (int)p->opt.sparse_mass, r.backward = 0;
  r.invT = 1.0f / p->opt.temperature;
  r.dv = dev_div_of(&p->opt);
  r.m_u = m_u, r.lnz_u = lnz_u, r.coef = NULL;
  r.xk = (float*)area, r.ids32 = NULL, r.part = NULL, r.aR = NULL;
  r.err = err;
  return r;
}

static fh_status_t launch_rows(const char* fn, cudaStream_t stream, const fh_distill_problem_t* p,
                               const sparse_row_params& r) {
  LCE_DTYPE_SWITCH(p->Es->dtype, T, {
    FH_LAUNCH(distill_sparse_row_kernel<T>, dim3((unsigned)p->N), dim3(SP_THREADS), 0, stream, r);
  });
  LCE_CHECK_LAUNCH(fn, "distill_sparse_row_kernel");
  return FH_SUCCESS;
}

size_t sparse_ws_bytes(int64_t N, int64_t K, bool backward) {
  return fh_lce::lce_align(sizeof(float) * (size_t)N * (size_t)K) * (backward ? 2 : 1);
}

fh_status_t sparse_forward_rows(const char* fn, int* err, cudaStream_t stream, const fh_distill_problem_t* p,
                                const float* m_u, const float* lnz_u, float* part, float* aR, void* area) {
  sparse_row_params r = row_params(p, err, m_u, lnz_u, area);
  r.part = part, r.aR = aR;
  return launch_rows(fn, stream, p, r);
}

fh_status_t sparse_backward_prep(const char* fn, int* err, cudaStream_t stream, const fh_distill_problem_t* p,
                                 const float* coef, void* area, sparse_bwd* out) {
  sparse_row_params r = row_params(p, err, coef, coef + p->N, area);
  r.backward = 1, r.coef = coef;
  r.ids32 = (int*)((unsigned char*)area + fh_lce::lce_align(sizeof(float) * (size_t)p->N * (size_t)p->K));
  out->ids = r.ids32, out->corr = r.xk, out->K = r.K;
  return launch_rows(fn, stream, p, r);
}

} /* namespace fh_dst */

extern "C" fh_status_t fh_cuda_distill_sparse_workspace(int64_t N, int64_t K, int backward, size_t* bytes) {
  *bytes = fh_dst::sparse_ws_bytes(N, K, backward != 0);
  return FH_SUCCESS;
}
