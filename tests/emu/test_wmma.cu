/* Suite emu_wmma: WMMA GEMMs against host GEMMs for every supported input type (fp16, bf16 with
 * fp32 accumulators, m16n16k16; tf32, m16n16k8) and every combination of fragment layouts, plus
 * the tf32 rounding and the MMA counters. The host GEMM uses the same rounded inputs in fp64, so
 * the only difference is fp32 accumulation: |err| <= K * 2^-23 * sum|a*b| (tolerance below). */
#include "emu_test.h"

using namespace nvcuda;

/* C[M x N] (row-major, ldc = N) = A * B, one warp per 16 x 16 tile of C. A is stored row-major
 * M x K (lda = K) or column-major (lda = M); B row-major K x N (ldb = N) or column-major (ldb = K). */
template <class TIn, class TMem, int KS, class LA, class LB>
__global__ void wmma_gemm_kernel(const TMem* A, const TMem* B, float* C, int M, int N, int K, int store_col_major) {
  const int warp = threadIdx.x / 32;
  const int tm = blockIdx.x * (blockDim.x / 32) + warp, tiles_n = N / 16;
  if (tm >= (M / 16) * tiles_n) return; /* whole warps exit: no collective is left waiting */
  const int row = tm / tiles_n * 16, col = tm % tiles_n * 16;
  const bool a_row = std::is_same<LA, wmma::row_major>::value, b_row = std::is_same<LB, wmma::row_major>::value;
  wmma::fragment<wmma::matrix_a, 16, 16, KS, TIn, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, KS, TIn, LB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int k = 0; k < K; k += KS) {
    wmma::load_matrix_sync(fa, a_row ? A + (size_t)row * K + k : A + (size_t)k * M + row, a_row ? K : M);
    wmma::load_matrix_sync(fb, b_row ? B + (size_t)k * N + col : B + (size_t)col * K + k, b_row ? N : K);
    if (std::is_same<TIn, wmma::precision::tf32>::value) {
      for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
      for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= 2.0f; /* element-wise ops are layout-free */
  if (store_col_major) wmma::store_matrix_sync(C + (size_t)col * M + row, acc, M, wmma::mem_col_major);
  else wmma::store_matrix_sync(C + (size_t)row * N + col, acc, N, wmma::mem_row_major);
}

static float host_to_f(float x) { return x; }
static float host_to_f(__half x) { return __half2float(x); }
static float host_to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> static T host_from_f(float x);
template <> float host_from_f<float>(float x) { return x; }
template <> __half host_from_f<__half>(float x) { return __float2half_rn(x); }
template <> __nv_bfloat16 host_from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

/* tf32 by its definition: keep 10 mantissa bits, round to nearest with ties away from zero. */
static float host_tf32(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  b = (b + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &b, 4);
  return x;
}

template <class TIn, class TMem, int KS, class LA, class LB>
static void check_gemm(int store_col_major) {
  const int M = 32, N = 48, K = 64;
  const bool a_row = std::is_same<LA, wmma::row_major>::value, b_row = std::is_same<LB, wmma::row_major>::value;
  const bool tf32 = std::is_same<TIn, wmma::precision::tf32>::value;
  std::vector<TMem> a((size_t)M * K), b((size_t)K * N);
  std::vector<double> av((size_t)M * K), bv((size_t)K * N); /* logical row-major values */
  uint64_t s = 12345;
  auto rnd = [&s]() {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((s >> 40) % 2001) / 1000.0f - 1.0f + (float)((s >> 20) % 7) * 1e-4f;
  };
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k) {
      TMem v = host_from_f<TMem>(rnd());
      a[a_row ? (size_t)i * K + k : (size_t)k * M + i] = v;
      av[(size_t)i * K + k] = tf32 ? host_tf32(host_to_f(v)) : host_to_f(v);
    }
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < N; ++j) {
      TMem v = host_from_f<TMem>(rnd());
      b[b_row ? (size_t)k * N + j : (size_t)j * K + k] = v;
      bv[(size_t)k * N + j] = tf32 ? host_tf32(host_to_f(v)) : host_to_f(v);
    }
  TMem* dA = dev_upload(a);
  TMem* dB = dev_upload(b);
  float* dC = dev_alloc<float>((size_t)M * N);
  const int tiles = (M / 16) * (N / 16), warps_per_block = 4;
  auto k = wmma_gemm_kernel<TIn, TMem, KS, LA, LB>;
  FH_LAUNCH(k, (tiles + warps_per_block - 1) / warps_per_block, 32 * warps_per_block, 0, nullptr, dA, dB, dC, M, N, K,
            store_col_major);
  EMU_CHECK_LAUNCH();
  std::vector<float> c = dev_download(dC, (size_t)M * N);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double ref = 0, mag = 0;
      for (int kk = 0; kk < K; ++kk) {
        ref += av[(size_t)i * K + kk] * bv[(size_t)kk * N + j];
        mag += std::fabs(av[(size_t)i * K + kk] * bv[(size_t)kk * N + j]);
      }
      const float got = c[store_col_major ? (size_t)j * M + i : (size_t)i * N + j];
      cr_assert_leq(std::fabs(got - 2 * ref), 2 * K * 0x1p-23 * mag + 1e-30, "C[%d][%d] = %g, host %g", i, j, got, 2 * ref);
    }
  fh_emu_counters_t cnt = fh_emu_last_counters();
  cr_assert_eq(cnt.mma_ops, (uint64_t)tiles * (K / KS));
  cr_assert_eq(cnt.mma_flops, 2ull * M * N * K);
}

template <class TIn, class TMem, int KS>
static void check_all_layouts() {
  check_gemm<TIn, TMem, KS, wmma::row_major, wmma::row_major>(0);
  check_gemm<TIn, TMem, KS, wmma::row_major, wmma::col_major>(1);
  check_gemm<TIn, TMem, KS, wmma::col_major, wmma::row_major>(0);
  check_gemm<TIn, TMem, KS, wmma::col_major, wmma::col_major>(1);
}

Test(emu_wmma, gemm_fp16) { check_all_layouts<__half, __half, 16>(); }
Test(emu_wmma, gemm_bf16) { check_all_layouts<__nv_bfloat16, __nv_bfloat16, 16>(); }
Test(emu_wmma, gemm_tf32) { check_all_layouts<wmma::precision::tf32, float, 8>(); }

Test(emu_wmma, tf32_rounding) {
  cr_assert_eq(wmma::__float_to_tf32(1.0f + 0x1p-11f), 1.0f + 0x1p-10f, "a tie rounds away from zero");
  cr_assert_eq(wmma::__float_to_tf32(-(1.0f + 0x1p-11f)), -(1.0f + 0x1p-10f));
  cr_assert_eq(wmma::__float_to_tf32(1.0f + 0x1p-12f), 1.0f);
  cr_assert_eq(wmma::__float_to_tf32(1.0f + 0x1p-10f), 1.0f + 0x1p-10f, "representable values are kept");
  cr_assert(std::isinf(wmma::__float_to_tf32(INFINITY)));
  cr_assert(std::isnan(wmma::__float_to_tf32(NAN)));
}

/* Accumulator load with both memory layouts, and a bf16 accumulator-free round trip. */
__global__ void acc_roundtrip_kernel(const float* in, float* out_row, float* out_col) {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(acc, in, 16, wmma::mem_row_major);
  wmma::store_matrix_sync(out_row, acc, 16, wmma::mem_row_major);
  wmma::store_matrix_sync(out_col, acc, 24, wmma::mem_col_major); /* ldm 24 > 16: padded columns */
}

Test(emu_wmma, accumulator_load_store) {
  std::vector<float> h(256);
  for (int i = 0; i < 256; ++i) h[i] = (float)i;
  float* d = dev_upload(h);
  float* r = dev_alloc<float>(256);
  float* c = dev_alloc<float>(24 * 16);
  FH_LAUNCH(acc_roundtrip_kernel, 1, 32, 0, nullptr, d, r, c);
  EMU_CHECK_LAUNCH();
  std::vector<float> hr = dev_download(r, 256), hc = dev_download(c, 24 * 16);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      cr_assert_eq(hr[i * 16 + j], (float)(i * 16 + j));
      cr_assert_eq(hc[j * 24 + i], (float)(i * 16 + j));
    }
  cr_assert(std::isnan(hc[16]), "padding rows of the column-major store are untouched (NaN from cudaMalloc)");
}
