/* decode.cu: fh_decode_from_logits on the CUDA backend: every sampler of the reference
 * (greedy, temperature, min-p → top-k → top-p sequential or joint, top-nσ, ε, η, top-H, Bregman,
 * p-less), exactly, with no host synchronization (fusedhead.h, "Decoding"; design in
 * docs/decoding.md, "CUDA backend").
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
 *      (kernels/decode_row.cuh): m, lse, entropy (and Σ (e^(s−m))² for p-less), the rule's
 *      kept set, the keyed Gumbel-max over it, rank, log-probabilities and top-n, all in fp64 with the formulas of
 *      src/decode_math.h that the CPU reference uses; outputs rounded once to fp32.
 *
 * Workspace: 32·B·V bytes (z, keys and ids twice) + 4·(2B + 1) + CUB's temp storage, each piece
 * 256-byte aligned; B·V < 2^31. Numerics: z, s, the keys and the Gumbel keys are bit-identical to
 * the reference's; sums (Z, F, the prefix sums of top-p / top-H / Bregman, σ, the α
 * normaliser) are fp64 in another order (docs/decoding.md, "CUDA backend"). Row offsets are
 * int64. A row's results do not depend on the batch. */
#include "decode_rule.cuh"
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
  /* The fused path's exact fallback (kernels/decode_fused.cu): only rows with DEC_ROW_FALLBACK
   * in only[b] are decoded, from z already materialised (bias and lists applied) at zb + offs[b],
   * offs written beforehand (the flagged rows packed). NULL: every row, from p.z. */
  const uint32_t* only;
};

template <typename T>
__global__ void __launch_bounds__(DEC_THREADS) decode_prep_kernel(dec_params p) {
  __shared__ uint32_t sh_info;
  const int t = threadIdx.x;
  const int64_t b = blockIdx.x, V = p.V;
  if (p.only && !(p.only[b] & DEC_ROW_FALLBACK)) return;
  const int64_t base = p.only ? (int64_t)p.offs[b] : b * V;
  double* z = p.zb + base;
  if (!p.only) {
    const T* src = static_cast<const T*>(p.z) + b * p.ldz;
    for (int64_t j = t; j < V; j += DEC_THREADS) z[j] = (double)fh_to_float(src[j]);
  }
  fh_decode_row_params_t prm;
  fh_dm_row_params(&p.o, b, &prm);
  if (t == 0 && !p.only) {
    p.offs[b] = (int32_t)(b * V);
    if (b == p.B - 1) p.offs[p.B] = (int32_t)(p.B * V);
  }
  __syncthreads(); /* z complete before thread 0 edits it */
  if (t == 0 && p.only) sh_info = 0u; /* materialised z: the lists are applied, the row was checked */
  if (t == 0 && !p.only) {
    uint32_t bad = fh_dm_row_params_ok(&prm) ? 0u : INFO_BAD;
    /* list order: repeated ids add up as on the CPU; then the bans (−inf wins over any bias) */
    if (!bad) bad = dec_row_lists(p.o, b, V, [&](int64_t id, double val, bool ban) { z[id] = ban ? val : z[id] + val; });
    sh_info = bad;
  }
  __syncthreads(); /* the edited z and sh_info visible to the block */
  const double temp = prm.temperature > 0.0 && isfinite(prm.temperature) ? prm.temperature : 1.0; /* 0: greedy */
  uint32_t f = 0;
  for (int64_t j = t; j < V; j += DEC_THREADS) {
    const double zj = z[j];
    f |= zj != zj ? INFO_NAN : zj == INFINITY ? INFO_PINF : zj > -INFINITY ? INFO_FINITE : 0u;
    p.kin[base + j] = dec_key_of(zj / temp);
    p.iin[base + j] = (int32_t)j;
  }
  if (f) atomicOr(&sh_info, f);
  __syncthreads();
  if (t == 0) {
    p.info[b] = sh_info;
    if (sh_info & INFO_BAD) atomicExch(p.err, (int)FH_DEVERR_DECODE_PARAM);
  }
}

__global__ void __launch_bounds__(DEC_THREADS) decode_row_kernel(dec_params p) {
  __shared__ dec_smem sm;
  const int t = threadIdx.x;
  const int64_t b = blockIdx.x, V = p.V;
  if (p.only && !(p.only[b] & DEC_ROW_FALLBACK)) return; /* the fused path decided this row */
  const uint32_t info = p.info[b], extra = p.only ? FH_DECODE_FLAG_SECOND_PASS : 0u;
  if ((info & (INFO_NAN | INFO_PINF | INFO_BAD)) || !(info & INFO_FINITE)) { /* block-uniform */
    dec_write_degenerate(p.o, p.out, b, info, extra);
    return;
  }
  const int64_t base = p.offs[b];
  const uint64_t* keys = p.kout + base;
  const int32_t* ids = p.iout + base;
  const double* z = p.zb + base;
  const auto s = [&](int64_t i) { return dec_s_of(keys[i]); };
  dec_totals tot;
  tot.m = s(0); /* position 0: the argmax, lowest id among ties */
  tot.n_fin = dec_partition_point(0, V, [&](int64_t i) { return s(i) > -INFINITY; });
  double zp = 0.0, fp = 0.0, z2p = 0.0;
  for (int64_t i = t; i < tot.n_fin; i += DEC_THREADS) {
    const double d = s(i) - tot.m, e = exp(d);
    zp += e;
    fp += e * d;
    z2p += e * e;
  }
  tot.Z = dec_block_sum(zp, sm);
  tot.F = dec_block_sum(fp, sm);
  tot.Z2 = dec_block_sum(z2p, sm);
  tot.gid = -1;
  tot.gs = 0.0;
  tot.zcnt = tot.zmean = tot.zm2 = tot.zmax = 0.0;
  fh_decode_row_params_t prm;
  fh_dm_row_params(&p.o, b, &prm);
  if (prm.temperature != 0.0 && prm.sampler == FH_DECODE_TOP_N_SIGMA) { /* block-uniform */
    double sp = 0.0, zm = -INFINITY;
    int64_t cp = 0;
    for (int64_t j = t; j < V; j += DEC_THREADS)
      if (isfinite(z[j])) {
        ++cp;
        sp += z[j];
        zm = fmax(zm, z[j]);
      }
    const int64_t cnt = dec_block_sum_i(cp, sm);
    tot.zcnt = (double)cnt;
    tot.zmean = dec_block_sum(sp, sm) / (double)cnt;
    tot.zmax = dec_block_max(zm, sm);
    double mp = 0.0;
    for (int64_t j = t; j < V; j += DEC_THREADS)
      if (isfinite(z[j])) mp += (z[j] - tot.zmean) * (z[j] - tot.zmean);
    tot.zm2 = dec_block_sum(mp, sm);
  }
  decode_row_body(
      p.o, p.out, b, V, s, [&](int64_t i) { return (int64_t)ids[i]; }, [&](int64_t i) { return z[ids[i]]; }, V, true,
      tot, extra, sm);
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

/* The three steps over the workspace laid out as L; p.z / p.only say which rows and from where. */
fh_status_t run_steps(const char* fn, cudaStream_t s, fh_dtype_t dtype, unsigned char* ws, const dec_layout& L,
                      dec_params& p) {
  p.zb = reinterpret_cast<double*>(ws + L.zb);
  p.kin = reinterpret_cast<uint64_t*>(ws + L.kin);
  p.kout = reinterpret_cast<uint64_t*>(ws + L.kout);
  p.iin = reinterpret_cast<int32_t*>(ws + L.iin);
  p.iout = reinterpret_cast<int32_t*>(ws + L.iout);
  p.offs = reinterpret_cast<int32_t*>(ws + L.offs);
  p.info = reinterpret_cast<uint32_t*>(ws + L.info);
  switch (dtype) {
    case FH_DTYPE_F32: FH_TRY(launch_prep<float>(fn, s, p)); break;
    case FH_DTYPE_F16: FH_TRY(launch_prep<__half>(fn, s, p)); break;
    case FH_DTYPE_BF16: FH_TRY(launch_prep<__nv_bfloat16>(fn, s, p)); break;
    default: return fh_set_error(FH_ERR_INTERNAL, fn, "dtype %d reached the decoding kernels", (int)dtype);
  }
  size_t tb = L.temp_bytes;
  const int64_t n = p.B * p.V;
  FH_TRY(fh_segmented_sort_u64_i32(ws + L.temp, &tb, p.kin, p.kout, p.iin, p.iout, (int)n, (int)p.B, p.offs,
                                   (struct CUstream_st*)s, fn));
  FH_LAUNCH(decode_row_kernel, dim3((unsigned)p.B), dim3(DEC_THREADS), 0, s, p);
  return fh_cuda_launch_status(fn, "decode_row_kernel");
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
  dec_params p;
  p.o = pr->opt;
  p.z = z->data;
  p.ldz = z->row_stride;
  p.B = B;
  p.V = V;
  p.out = *out;
  p.err = st->d_error;
  p.only = NULL;
  return run_steps(fn, (cudaStream_t)stream, z->dtype, static_cast<unsigned char*>(workspace), L, p);
}

/* The fused path's exact fallback (kernels/decode_fused.cu, docs/decoding.md "Fused decoding
 * on CUDA"): the from-logits steps over the rows flagged in `only`, whose z the caller has
 * materialised at zb + offs[b] (fh_dec::fallback_z / fallback_offs of the same workspace). */
namespace fh_dec {
fh_status_t fallback_layout(int64_t B, int64_t V, const char* fn, size_t* zb, size_t* offs, size_t* total) {
  dec_layout L;
  FH_TRY(dec_layout_of(B, V, fn, &L));
  *zb = L.zb;
  *offs = L.offs;
  *total = L.total;
  return FH_SUCCESS;
}
fh_status_t fallback_run(const char* fn, struct CUstream_st* stream, const fh_decode_options_t& o,
                         const fh_decode_outputs_t& out, int64_t B, int64_t V, void* workspace, const uint32_t* only,
                         int* err) {
  dec_layout L;
  FH_TRY(dec_layout_of(B, V, fn, &L));
  dec_params p;
  p.o = o;
  p.z = NULL;
  p.ldz = 0;
  p.B = B;
  p.V = V;
  p.out = out;
  p.err = err;
  p.only = only;
  return run_steps(fn, (cudaStream_t)stream, FH_DTYPE_F32, static_cast<unsigned char*>(workspace), L, p);
}
} /* namespace fh_dec */
