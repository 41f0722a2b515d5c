/* Suite emu_ptx: the twins of kernels/engine/ptx.cuh against hand-computed expectations.
 * ldmatrix and mma fragments are assembled in the test kernels from the layouts documented in
 * ptx.cuh (PTX ISA fragment figures), so a twin with a wrong layout fails here. cp.async must
 * land at its wait and not before; the bank-conflict and sector counters must give the numbers
 * worked out by hand below. The mistakes the twins must report are in test_ptx_check.cu, the
 * ex2/rcp/lg2 bounds in test_ptx_math.cu. */
#include "emu_test.h"
#include "engine/ptx.cuh"

/* ---- ldmatrix ---- */

/* Four 8x8 b16 matrices in shared memory; element (r, c) of matrix i is i*64 + r*8 + c, and row r
 * of matrix i is the 16 bytes at (8i + r) * 16, so lane l owns (and gives the address of) row
 * l % 8 of matrix l / 8. Lanes past 8*num pass a bad address, which ldmatrix must ignore. */
__global__ void ldsm_layout_kernel(uint32_t* out, int num, int trans) {
  FH_DYNAMIC_SMEM(uint16_t, s);
  const int l = threadIdx.x;
  uint16_t row[8];
  for (int c = 0; c < 8; ++c) row[c] = (uint16_t)(l / 8 * 64 + l % 8 * 8 + c);
  uint4 v;
  std::memcpy(&v, row, 16);
  fh_ptx::sts_v4(s + l * 8, v);
  __syncwarp(); /* lanes read each other's rows: the warp must be ordered (racecheck) */
  const void* addr = l < 8 * num ? (const void*)(s + l * 8) : (const void*)(uintptr_t)0x1;
  uint32_t r[4] = {~0u, ~0u, ~0u, ~0u};
  if (num == 4 && !trans) fh_ptx::ldsm_x4(r, addr);
  else if (num == 4) fh_ptx::ldsm_x4_trans(r, addr);
  else if (num == 2 && !trans) fh_ptx::ldsm_x2(*reinterpret_cast<uint32_t(*)[2]>(r), addr);
  else if (num == 2) fh_ptx::ldsm_x2_trans(*reinterpret_cast<uint32_t(*)[2]>(r), addr);
  else ::fh_emu::ptx_ldmatrix(r, 1, trans != 0, addr); /* ptx.cuh has no .x1 wrapper */
  for (int i = 0; i < 4; ++i) out[l * 4 + i] = r[i];
}

static void check_ldsm(int num, int trans) {
  uint32_t* d = dev_alloc<uint32_t>(128);
  FH_LAUNCH(ldsm_layout_kernel, 1, 32, 512, nullptr, d, num, trans);
  EMU_CHECK_LAUNCH();
  std::vector<uint32_t> h = dev_download(d, 128);
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      uint32_t want = ~0u; /* registers past .x{num} untouched */
      if (i < num) {
        const int q = l % 4, g = l / 4;
        /* lane l: row g, columns 2q, 2q+1; .trans: column g, rows 2q, 2q+1 */
        const uint32_t lo = trans ? (uint32_t)(i * 64 + 2 * q * 8 + g) : (uint32_t)(i * 64 + g * 8 + 2 * q);
        const uint32_t hi = trans ? lo + 8 : lo + 1;
        want = lo | hi << 16;
      }
      cr_assert_eq(h[(size_t)l * 4 + i], want, ".x%d%s lane %d r[%d]: 0x%08x, want 0x%08x", num,
                   trans ? ".trans" : "", l, i, h[(size_t)l * 4 + i], want);
    }
  fh_emu_counters_t c = fh_emu_last_counters();
  cr_expect_eq(c.ldmatrix_ops, 1u);
}

Test(emu_ptx, ldmatrix_x1) { check_ldsm(1, 0); }
Test(emu_ptx, ldmatrix_x1_trans) { check_ldsm(1, 1); }
Test(emu_ptx, ldmatrix_x2) { check_ldsm(2, 0); }
Test(emu_ptx, ldmatrix_x2_trans) { check_ldsm(2, 1); }
Test(emu_ptx, ldmatrix_x4) { check_ldsm(4, 0); }
Test(emu_ptx, ldmatrix_x4_trans) { check_ldsm(4, 1); }

/* ---- mma.sync ---- */

/* A (16 x K) and B (K x 8) row-major as 16-bit patterns (bf16/f16) or 32-bit (tf32), C and D
 * 16 x 8 fp32, one warp; the fragments are built exactly as ptx.cuh documents them. */
__global__ void mma_layout_kernel(const uint16_t* A16, const uint16_t* B16, const uint32_t* A32, const uint32_t* B32,
                                  const float* C, float* D, int kind) {
  const int l = threadIdx.x, g = l / 4, t = l % 4;
  uint32_t a[4], b[2];
  if (kind == ::fh_emu::MMA_TF32_1688) {
    a[0] = A32[g * 8 + t];
    a[1] = A32[(g + 8) * 8 + t];
    a[2] = A32[g * 8 + t + 4];
    a[3] = A32[(g + 8) * 8 + t + 4];
    b[0] = B32[t * 8 + g];
    b[1] = B32[(t + 4) * 8 + g];
  } else {
    auto pair = [](uint16_t lo, uint16_t hi) { return (uint32_t)lo | (uint32_t)hi << 16; };
    a[0] = pair(A16[g * 16 + 2 * t], A16[g * 16 + 2 * t + 1]);
    a[1] = pair(A16[(g + 8) * 16 + 2 * t], A16[(g + 8) * 16 + 2 * t + 1]);
    a[2] = pair(A16[g * 16 + 2 * t + 8], A16[g * 16 + 2 * t + 9]);
    a[3] = pair(A16[(g + 8) * 16 + 2 * t + 8], A16[(g + 8) * 16 + 2 * t + 9]);
    b[0] = pair(B16[(2 * t) * 8 + g], B16[(2 * t + 1) * 8 + g]);
    b[1] = pair(B16[(2 * t + 8) * 8 + g], B16[(2 * t + 9) * 8 + g]);
  }
  float d[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  if (kind == ::fh_emu::MMA_BF16_16816) fh_ptx::mma_bf16_16816(d, a, b);
  else if (kind == ::fh_emu::MMA_F16_16816) fh_ptx::mma_f16_16816(d, a, b);
  else fh_ptx::mma_tf32_1688(d, a, b);
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

static uint32_t f32_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
static uint16_t f16_bits(float x) {
  const __half h = __float2half_rn(x);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

/* Small distinct integers: every product and sum is exact, so D must equal the naive product
 * bit for bit, and any permutation of fragment elements shows. */
static void check_mma(::fh_emu::MmaKind kind) {
  const int K = kind == ::fh_emu::MMA_TF32_1688 ? 8 : 16;
  std::vector<float> a(16 * (size_t)K), b((size_t)K * 8), c(128);
  uint64_t s = 99 + (uint64_t)kind;
  auto next = [&s]() { s = s * 6364136223846793005ull + 1442695040888963407ull; return (int)(s >> 33) % 9 - 4; };
  for (float& v : a) v = (float)next();
  for (float& v : b) v = (float)next();
  for (float& v : c) v = (float)(next() * 16);
  std::vector<uint16_t> a16(a.size()), b16(b.size());
  std::vector<uint32_t> a32(a.size()), b32(b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    a16[i] = kind == ::fh_emu::MMA_BF16_16816 ? (uint16_t)(f32_bits(a[i]) >> 16) : f16_bits(a[i]);
    a32[i] = f32_bits(a[i]) | 0x1fffu; /* the tensor core ignores the low 13 bits of a tf32 operand */
  }
  for (size_t i = 0; i < b.size(); ++i) {
    b16[i] = kind == ::fh_emu::MMA_BF16_16816 ? (uint16_t)(f32_bits(b[i]) >> 16) : f16_bits(b[i]);
    b32[i] = f32_bits(b[i]) | 0x1000u;
  }
  float* dD = dev_alloc<float>(128);
  FH_LAUNCH(mma_layout_kernel, 1, 32, 0, nullptr, dev_upload(a16), dev_upload(b16), dev_upload(a32), dev_upload(b32),
            dev_upload(c), dD, (int)kind);
  EMU_CHECK_LAUNCH();
  std::vector<float> d = dev_download(dD, 128);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double ref = c[(size_t)i * 8 + j];
      for (int k = 0; k < K; ++k) ref += (double)a[(size_t)i * K + k] * b[(size_t)k * 8 + j];
      cr_assert_eq(d[(size_t)i * 8 + j], (float)ref, "kind %d D[%d][%d] = %g, want %g", (int)kind, i, j,
                   d[(size_t)i * 8 + j], ref);
    }
  fh_emu_counters_t cnt = fh_emu_last_counters();
  cr_expect_eq(cnt.mma_ops, 1u);
  cr_expect_eq(cnt.mma_flops, 2u * 16 * 8 * (unsigned)K);
}

Test(emu_ptx, mma_bf16_m16n8k16) { check_mma(::fh_emu::MMA_BF16_16816); }
Test(emu_ptx, mma_f16_m16n8k16) { check_mma(::fh_emu::MMA_F16_16816); }
Test(emu_ptx, mma_tf32_m16n8k8) { check_mma(::fh_emu::MMA_TF32_1688); }

/* ---- cp.async ---- */

/* Lane l copies 16 bytes with src-size l % 17 into chunk l; what it reads back after the wait
 * must be the first src-size source bytes, then zeros. */
__global__ void cp_async_zfill_kernel(const unsigned char* src, unsigned char* out) {
  FH_DYNAMIC_SMEM(unsigned char, s);
  const int l = threadIdx.x;
  fh_ptx::cp_async_16(s + l * 16, src + l * 16, l % 17);
  fh_ptx::cp_async_commit();
  fh_ptx::cp_async_wait<0>();
  uint4 v = fh_ptx::lds_v4(s + l * 16); /* its own chunk: the wait made it visible to this thread */
  std::memcpy(out + l * 16, &v, 16);
}

Test(emu_ptx, cp_async_lands_with_zero_fill) {
  std::vector<unsigned char> h(512);
  for (size_t i = 0; i < h.size(); ++i) h[i] = (unsigned char)(i * 7 + 1);
  unsigned char* out = dev_alloc<unsigned char>(512);
  FH_LAUNCH(cp_async_zfill_kernel, 1, 32, 512, nullptr, dev_upload(h), out);
  EMU_CHECK_LAUNCH();
  std::vector<unsigned char> o = dev_download(out, 512);
  uint64_t requested = 0;
  for (int l = 0; l < 32; ++l) {
    requested += (uint64_t)(l % 17);
    for (int j = 0; j < 16; ++j)
      cr_assert_eq(o[(size_t)l * 16 + j], j < l % 17 ? h[(size_t)l * 16 + j] : 0, "lane %d byte %d", l, j);
  }
  fh_emu_counters_t c = fh_emu_last_counters();
  cr_expect_eq(c.cp_async_ops, 32u);
  cr_expect_eq(c.bytes_g2s, requested);
}

/* Deferral, observed with plain loads (which bypass the checks): wait_group N leaves the newest
 * N groups poisoned, uncommitted copies are not waited for at all, and the source is read when
 * the copy lands, not when it is issued. */
__global__ void cp_async_deferred_kernel(unsigned char* src, uint32_t* out) {
  FH_DYNAMIC_SMEM(uint32_t, s);
  if (threadIdx.x != 0) return;
  fh_ptx::cp_async_16(s + 0, src + 0, 16); /* group 0 */
  fh_ptx::cp_async_commit();
  fh_ptx::cp_async_16(s + 4, src + 16, 16); /* group 1 */
  fh_ptx::cp_async_commit();
  fh_ptx::cp_async_16(s + 8, src + 32, 16); /* not committed */
  src[16] = 0x5a;                           /* before group 1 lands */
  fh_ptx::cp_async_wait<1>();               /* lands group 0 only */
  out[0] = s[0];
  out[1] = s[4];
  fh_ptx::cp_async_wait<0>(); /* lands group 1; the uncommitted copy stays in flight */
  out[2] = s[4];
  out[3] = s[8];
  fh_ptx::cp_async_commit();
  fh_ptx::cp_async_wait<0>();
  out[4] = s[8];
}

Test(emu_ptx, cp_async_deferred_until_its_group_is_waited) {
  std::vector<unsigned char> h(48);
  for (size_t i = 0; i < h.size(); ++i) h[i] = (unsigned char)(i + 1);
  uint32_t* out = dev_alloc<uint32_t>(5);
  FH_LAUNCH(cp_async_deferred_kernel, 1, 32, 48, nullptr, dev_upload(h), out);
  EMU_CHECK_LAUNCH();
  std::vector<uint32_t> o = dev_download(out, 5);
  cr_expect_eq(o[0], 0x04030201u, "group 0 landed at wait_group 1");
  cr_expect_eq(o[1], 0xffffffffu, "group 1 still in flight (poisoned) after wait_group 1");
  cr_expect_eq(o[2], 0x1413125au, "group 1 landed at wait_group 0, with the source as it was then");
  cr_expect_eq(o[3], 0xffffffffu, "an uncommitted copy is not waited for");
  cr_expect_eq(o[4], 0x24232221u, "landed once committed and waited for");
}

/* The engine's mainloop shape, race-free: every warp copies a tile slice, waits, barrier, then
 * each warp ldmatrix-reads rows another warp copied; two stages, several iterations, under
 * random yields. Must not report, and the data must arrive. */
__global__ void pipeline_kernel(const uint16_t* g, uint32_t* out, int iters) {
  FH_DYNAMIC_SMEM(uint16_t, s); /* 2 stages x 64 rows x 8 b16 */
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  uint32_t acc = 0;
  auto issue = [&](int it) {
    fh_ptx::cp_async_16(s + (it % 2) * 512 + tid * 8, g + (size_t)it * 512 + tid * 8, 16);
    fh_ptx::cp_async_commit();
  };
  issue(0);
  for (int it = 0; it < iters; ++it) {
    if (it + 1 < iters) issue(it + 1);
    else fh_ptx::cp_async_commit(); /* an empty group keeps the count uniform */
    fh_ptx::cp_async_wait<1>();
    __syncthreads();
    uint32_t r[4];
    fh_ptx::ldsm_x4(r, s + (it % 2) * 512 + ((1 - warp) * 32 + lane) * 8); /* the other warp's rows */
    for (int i = 0; i < 4; ++i) acc += r[i];
    __syncthreads(); /* the stage is refilled in the next iteration */
  }
  out[tid] = acc;
}

Test(emu_ptx, cp_async_pipeline_without_races) {
  const int iters = 5;
  std::vector<uint16_t> h((size_t)iters * 512);
  for (size_t i = 0; i < h.size(); ++i) h[i] = (uint16_t)(i % 251);
  uint32_t* out = dev_alloc<uint32_t>(64);
  fh_emu_set_yield(0.5);
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    fh_emu_set_seed(seed);
    FH_LAUNCH(pipeline_kernel, 1, 64, 2048, nullptr, dev_upload(h), out, iters);
    EMU_CHECK_LAUNCH();
  }
  std::vector<uint32_t> o = dev_download(out, 64);
  for (int tid = 0; tid < 64; ++tid) {
    const int warp = tid / 32, lane = tid % 32;
    uint32_t want = 0;
    for (int it = 0; it < iters; ++it)
      for (int i = 0; i < 4; ++i) {
        const int row = (1 - warp) * 32 + 8 * i + lane / 4, col = 2 * (lane % 4); /* matrix i = rows 8i.. */
        want += (uint32_t)h[(size_t)it * 512 + (size_t)row * 8 + col] |
                (uint32_t)h[(size_t)it * 512 + (size_t)row * 8 + col + 1] << 16;
      }
    cr_assert_eq(o[(size_t)tid], want, "thread %d", tid);
  }
}

/* cp.async into a static __shared__ array: deferred and checked too (no shadow, a list). */
__global__ void cp_async_static_kernel(const uint32_t* g, uint32_t* out) {
  __shared__ __align__(16) uint32_t buf[32 * 4];
  fh_ptx::cp_async_16(buf + threadIdx.x * 4, g + threadIdx.x * 4, 16);
  fh_ptx::cp_async_commit();
  fh_ptx::cp_async_wait<0>();
  __syncthreads();
  out[threadIdx.x] = fh_ptx::lds_u32(buf + (31 - threadIdx.x) * 4);
}

Test(emu_ptx, cp_async_static_shared) {
  std::vector<uint32_t> h(128);
  for (size_t i = 0; i < h.size(); ++i) h[i] = (uint32_t)i * 3u;
  uint32_t* out = dev_alloc<uint32_t>(32);
  FH_LAUNCH(cp_async_static_kernel, 2, 32, 0, nullptr, dev_upload(h), out);
  EMU_CHECK_LAUNCH();
  std::vector<uint32_t> o = dev_download(out, 32);
  for (int t = 0; t < 32; ++t) cr_assert_eq(o[(size_t)t], h[(size_t)(31 - t) * 4]);
}
