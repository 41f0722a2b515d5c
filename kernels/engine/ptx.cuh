/* engine/ptx.cuh: every raw PTX instruction fusedhead's kernels use, behind one wrapper each.
 *
 * Under nvcc each wrapper is inline PTX. Without nvcc (the SIMT emulator, tests/emu) each calls a
 * twin in namespace fh_emu (tests/emu/emu_ptx.h) written from the PTX ISA's documented
 * semantics: fragment layouts exact (kernels index fragment registers directly), cp.async
 * deferred until its wait with the destination poisoned, misaligned accesses trapping, shared
 * accesses checked for races and counted for bank conflicts. docs/engine.md describes the layouts
 * the engine relies on.
 *
 * Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16" and "mma.m16n8k8"), with
 * g = lane / 4 and t = lane % 4:
 *   m16n8k16 (f16/bf16), A [16 x 16] in 4 x b32 (two 16-bit elements each, low half first):
 *     a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1], a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]
 *   B [16 x 8] in 2 x b32: b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
 *   m16n8k8 (tf32), A [16 x 8] in 4 x b32: a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4], a[3] = A[g+8][t+4]
 *   B [8 x 8]: b[0] = B[t][g], b[1] = B[t+4][g]
 *   C/D [16 x 8] fp32 (both shapes): d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1]
 * ldmatrix (.x1/.x2/.x4, 8 x 8 matrices of b16, one 16-byte row address per lane: lanes 0-7 give
 * matrix 0's rows, 8-15 matrix 1's, 16-23 matrix 2's, 24-31 matrix 3's): r[i] of lane l holds
 * matrix i's row l/4, elements 2(l%4) and 2(l%4)+1; with .trans, column l/4, rows 2(l%4), 2(l%4)+1. */
#ifndef FH_KERNELS_ENGINE_PTX_CUH
#define FH_KERNELS_ENGINE_PTX_CUH

#include <stdint.h>

/* Loop unrolling hints for nvcc; the emulator's host compiler gets none (g++ would warn). */
#ifdef __CUDACC__
#define FH_UNROLL _Pragma("unroll")
#define FH_UNROLL4 _Pragma("unroll 4")
#define FH_NO_UNROLL _Pragma("unroll 1")
#else
#define FH_UNROLL
#define FH_UNROLL4
#define FH_NO_UNROLL
#endif

namespace fh_ptx {

#ifdef __CUDACC__
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}
#endif

/* cp.async.cg.shared.global, 16 bytes. src_bytes in [0, 16]: bytes past src_bytes are zero-filled
 * (src_bytes 0 reads no global memory at all, so an out-of-range source is never touched).
 * Both addresses must be 16-byte aligned. */
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#ifdef __CUDACC__
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes)
               : "memory");
#else
  ::fh_emu::ptx_cp_async(smem, gmem, 16, src_bytes);
#endif
}
/* cp.async.commit_group: the copies issued since the last commit form one group. */
__device__ __forceinline__ void cp_async_commit() {
#ifdef __CUDACC__
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  ::fh_emu::ptx_cp_async_commit();
#endif
}
/* cp.async.wait_group N: returns when at most N of this thread's committed groups are pending.
 * The copies become visible to other threads only after a barrier that follows the wait. */
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef __CUDACC__
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  ::fh_emu::ptx_cp_async_wait(N);
#endif
}

/* Named barriers (bar.sync / bar.arrive with a thread count): barrier id 1-15 (0 is the one of
 * __syncthreads) for `count` threads, a multiple of 32, arriving as whole warps. bar_sync waits
 * for the phase to complete; bar_arrive counts the caller's warp and goes on (a producer's
 * signal to consumers that bar_sync). Ordering as __syncthreads among the participants.
 * docs/hopper.md "Named barriers". */
__device__ __forceinline__ void bar_sync(int id, int count) {
#ifdef __CUDACC__
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#else
  ::fh_emu::named_barrier(id, count, true);
#endif
}
__device__ __forceinline__ void bar_arrive(int id, int count) {
#ifdef __CUDACC__
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#else
  ::fh_emu::named_barrier(id, count, false);
#endif
}

/* bar.red.or.pred on barrier id for `count` threads: bar_sync that also returns whether any
 * participant's pred was nonzero (__syncthreads_or for a subset of the CTA's warps). Every
 * arrival of a phase must be a bar.red.or. */
__device__ __forceinline__ int bar_red_or(int id, int count, int pred) {
#ifdef __CUDACC__
  uint32_t r;
  asm volatile(
      "{\n.reg .pred c, p;\nsetp.ne.u32 c, %1, 0;\nbar.red.or.pred p, %2, %3, c;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(r)
      : "r"(pred), "r"(id), "r"(count)
      : "memory");
  return (int)r;
#else
  return ::fh_emu::named_barrier_or(id, count, pred);
#endif
}

/* ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16 (warp collective, all 32 lanes). */
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
#ifdef __CUDACC__
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
#else
  ::fh_emu::ptx_ldmatrix(r, 4, false, row);
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
#ifdef __CUDACC__
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
#else
  ::fh_emu::ptx_ldmatrix(r, 4, true, row);
#endif
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* row) {
#ifdef __CUDACC__
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
#else
  ::fh_emu::ptx_ldmatrix(r, 2, false, row);
#endif
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&r)[2], const void* row) {
#ifdef __CUDACC__
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
#else
  ::fh_emu::ptx_ldmatrix(r, 2, true, row);
#endif
}

/* mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: d = a·b + d (warp collective). */
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef __CUDACC__
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  ::fh_emu::ptx_mma(d, a, b, ::fh_emu::MMA_BF16_16816);
#endif
}
__device__ __forceinline__ void mma_f16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef __CUDACC__
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  ::fh_emu::ptx_mma(d, a, b, ::fh_emu::MMA_F16_16816);
#endif
}
/* mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (not used by the kernels, whose fp32 path is
 * the bf16 split of sm80.cuh; kept with its emulator twin for tests; operands: fp32 bit patterns already
 * rounded to tf32; the tensor core ignores the low 13 mantissa bits). */
__device__ __forceinline__ void mma_tf32_1688(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef __CUDACC__
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  ::fh_emu::ptx_mma(d, a, b, ::fh_emu::MMA_TF32_1688);
#endif
}

/* cvt.rn.bf16x2.f32: two fp32 values rounded to bf16 (to nearest, ties to even; NaN gives the
 * canonical NaN) packed in one register, `lo` in bits 0-15 and `hi` in bits 16-31: the
 * element order of a bf16x2 mma operand register. */
__device__ __forceinline__ uint32_t cvt_bf16x2(float lo, float hi) {
#ifdef __CUDACC__
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return ::fh_emu::ptx_cvt_bf16x2(lo, hi);
#endif
}

/* Shared-memory accesses of the engine's own buffers (epilogue tiles), so the emulator can check
 * them for races and bank conflicts. 4, 8 and 16 bytes, naturally aligned. */
__device__ __forceinline__ void sts_u32(void* p, uint32_t v) {
#ifdef __CUDACC__
  *(uint32_t*)p = v;
#else
  ::fh_emu::ptx_st_shared(p, &v, 4);
#endif
}
__device__ __forceinline__ uint32_t lds_u32(const void* p) {
#ifdef __CUDACC__
  return *(const uint32_t*)p;
#else
  uint32_t v;
  ::fh_emu::ptx_ld_shared(p, &v, 4);
  return v;
#endif
}
__device__ __forceinline__ void sts_v2(void* p, uint2 v) {
#ifdef __CUDACC__
  *(uint2*)p = v;
#else
  ::fh_emu::ptx_st_shared(p, &v, 8);
#endif
}
__device__ __forceinline__ uint2 lds_v2(const void* p) {
#ifdef __CUDACC__
  return *(const uint2*)p;
#else
  uint2 v;
  ::fh_emu::ptx_ld_shared(p, &v, 8);
  return v;
#endif
}
__device__ __forceinline__ void sts_v4(void* p, uint4 v) {
#ifdef __CUDACC__
  *(uint4*)p = v;
#else
  ::fh_emu::ptx_st_shared(p, &v, 16);
#endif
}
__device__ __forceinline__ uint4 lds_v4(const void* p) {
#ifdef __CUDACC__
  return *(const uint4*)p;
#else
  uint4 v;
  ::fh_emu::ptx_ld_shared(p, &v, 16);
  return v;
#endif
}

/* ex2.approx.ftz.f32: 2^x, max relative error 2^-22 (PTX ISA); subnormal results flush to 0,
 * ex2(-inf) = 0, ex2(+inf) = +inf, NaN gives NaN. One MUFU operation. */
__device__ __forceinline__ float ex2(float x) {
#ifdef __CUDACC__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return ::fh_emu::ptx_ex2_approx(x);
#endif
}
/* rcp.approx.ftz.f32: 1/x, max relative error 2^-23 (one MUFU operation). */
__device__ __forceinline__ float rcp(float x) {
#ifdef __CUDACC__
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return ::fh_emu::ptx_rcp_approx(x);
#endif
}
/* lg2.approx.ftz.f32: log2(x), max absolute error 2^-22 for x in [0.5, 2], relative 2^-22 elsewhere. */
__device__ __forceinline__ float lg2(float x) {
#ifdef __CUDACC__
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return ::fh_emu::ptx_lg2_approx(x);
#endif
}

} /* namespace fh_ptx */

#endif
