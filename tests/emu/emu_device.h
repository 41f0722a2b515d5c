/* emu_device.h: the device-code half of the SIMT emulator.
 *
 * Force-included (-include) when the kernels/ .cu files and the emulator's own tests are compiled as host
 * C++. It turns the CUDA language extensions the kernels use into host constructs whose
 * behaviour is CUDA's, executed by the fiber scheduler in emu_core.cpp:
 *   - __global__/__device__/__host__ vanish; __shared__ becomes block-scope thread_local, which
 *     is one copy per block because one OS worker runs one block at a time;
 *   - threadIdx/blockIdx/blockDim/gridDim read the running fiber's coordinates;
 *   - barriers, shuffles, votes and WMMA are collectives of the scheduler (they block the fiber
 *     until every participant arrived, and synccheck what does not add up);
 *   - atomics are real atomics, because blocks run on several OS threads at once.
 * fp16/bf16 come from CUDA's own cuda_fp16.h / cuda_bf16.h, which compile for the host. */
#ifndef FH_EMU_DEVICE_H
#define FH_EMU_DEVICE_H

#ifndef __cplusplus
#error "emu_device.h is for C++ (kernels/*.cu compiled as host code)"
#endif
#ifdef __CUDACC__
#error "emu_device.h must not be used under nvcc"
#endif

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>

#include "emu_api.h"
#include "emu_ptx.h" /* twins of kernels/engine/ptx.cuh */
#include "emu_sm90.h" /* twins of kernels/engine/ptx_sm90.cuh */

#ifndef FH_EMULATOR
#define FH_EMULATOR 1
#endif

/* ---- language extensions -------------------------------------------------------------- */
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __managed__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline
#define __launch_bounds__(...)
/* Block-scope thread_local is static storage per OS thread; a worker runs one block at a time,
 * so this is exactly one copy per resident block. Dynamic shared memory goes through
 * FH_DYNAMIC_SMEM (kernels/common.cuh), because `extern __shared__ T x[]` cannot be a macro. */
#define __shared__ thread_local


/* The running thread's coordinates come from a call into the runtime (emu_core.cpp), not from
 * the thread_local read inline: GCC's UBSan checks the address it computes for an extern
 * thread_local with a jump on the flags of an `add` that the linker relaxes to a `lea`
 * (initial-exec to local-exec), which sets none, so the check can fire on stale flags and report
 * a load of a null pointer that is not there (seen in tests/emu/test_named_bar.cu). */
#define threadIdx (::fh_emu::coords().threadIdx)
#define blockIdx (::fh_emu::coords().blockIdx)
#define blockDim (::fh_emu::coords().blockDim)
#define gridDim (::fh_emu::coords().gridDim)
#ifdef warpSize
#undef warpSize
#endif
#define warpSize 32

/* cuda_runtime.h's C++ overload (it is only declared under nvcc): a kernel passed directly. */
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, enum cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

/* ---- barriers, shuffles, votes ------------------------------------------------------------ */
inline void __syncthreads() { (void)::fh_emu::block_barrier(0); }
inline int __syncthreads_count(int pred) { return ::fh_emu::block_barrier(pred != 0); }
inline int __syncthreads_and(int pred) { return ::fh_emu::block_barrier(pred != 0) == (int)(blockDim.x * blockDim.y * blockDim.z); }
inline int __syncthreads_or(int pred) { return ::fh_emu::block_barrier(pred != 0) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  (void)::fh_emu::vote("__syncwarp", ::fh_emu::complete_nothing, mask, 0);
}

template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
  return ::fh_emu::shuffle("__shfl_sync", ::fh_emu::complete_shfl, mask, var, srcLane, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::fh_emu::shuffle("__shfl_up_sync", ::fh_emu::complete_shfl_up, mask, var, (int)delta, width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::fh_emu::shuffle("__shfl_down_sync", ::fh_emu::complete_shfl_down, mask, var, (int)delta, width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
  return ::fh_emu::shuffle("__shfl_xor_sync", ::fh_emu::complete_shfl_xor, mask, var, laneMask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return (unsigned)::fh_emu::vote("__ballot_sync", ::fh_emu::complete_ballot, mask, pred != 0);
}
inline int __any_sync(unsigned mask, int pred) { return (__ballot_sync(mask, pred) & mask) != 0; }
inline int __all_sync(unsigned mask, int pred) { return (__ballot_sync(mask, pred) & mask) == mask; }
inline unsigned __activemask() { return ::fh_emu::active_mask(); }
#define FH_EMU_REDUCE_(fn, T, complete)                                                        \
  inline T fn(unsigned mask, T value) {                                                        \
    return (T)::fh_emu::vote(#fn, ::fh_emu::complete, mask, (uint64_t)(uint32_t)value);        \
  }
FH_EMU_REDUCE_(__reduce_add_sync, unsigned, complete_reduce_add)
FH_EMU_REDUCE_(__reduce_add_sync, int, complete_reduce_add)
FH_EMU_REDUCE_(__reduce_min_sync, unsigned, complete_reduce_min_u)
FH_EMU_REDUCE_(__reduce_max_sync, unsigned, complete_reduce_max_u)
FH_EMU_REDUCE_(__reduce_min_sync, int, complete_reduce_min_i)
FH_EMU_REDUCE_(__reduce_max_sync, int, complete_reduce_max_i)
FH_EMU_REDUCE_(__reduce_and_sync, unsigned, complete_reduce_and)
FH_EMU_REDUCE_(__reduce_or_sync, unsigned, complete_reduce_or)
FH_EMU_REDUCE_(__reduce_xor_sync, unsigned, complete_reduce_xor)
#undef FH_EMU_REDUCE_
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  return (unsigned)::fh_emu::vote("__match_any_sync", ::fh_emu::complete_match_any, mask, ::fh_emu::to_bits(value));
}

/* ---- memory ordering and misc --------------------------------------------------------------- */
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap() { ::fh_emu::report_and_abort("__trap", "the kernel executed __trap()"); }
long long clock64();

/* ---- cache-hinted loads and stores: plain accesses (no caches are modelled) ---------------- */
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

/* ---- atomics: GCC __atomic builtins, so they are atomic across the OS worker threads ------- */
#define FH_EMU_ATOMIC_RMW_(fn, T, builtin)                                                     \
  inline T fn(T* address, T val) {                                                             \
    ::fh_emu::note_atomic();                                                                   \
    return builtin(address, val, __ATOMIC_SEQ_CST);                                            \
  }
FH_EMU_ATOMIC_RMW_(atomicAdd, int, __atomic_fetch_add)
FH_EMU_ATOMIC_RMW_(atomicAdd, unsigned, __atomic_fetch_add)
FH_EMU_ATOMIC_RMW_(atomicAdd, unsigned long long, __atomic_fetch_add)
FH_EMU_ATOMIC_RMW_(atomicSub, int, __atomic_fetch_sub)
FH_EMU_ATOMIC_RMW_(atomicSub, unsigned, __atomic_fetch_sub)
FH_EMU_ATOMIC_RMW_(atomicAnd, int, __atomic_fetch_and)
FH_EMU_ATOMIC_RMW_(atomicAnd, unsigned, __atomic_fetch_and)
FH_EMU_ATOMIC_RMW_(atomicAnd, unsigned long long, __atomic_fetch_and)
FH_EMU_ATOMIC_RMW_(atomicOr, int, __atomic_fetch_or)
FH_EMU_ATOMIC_RMW_(atomicOr, unsigned, __atomic_fetch_or)
FH_EMU_ATOMIC_RMW_(atomicOr, unsigned long long, __atomic_fetch_or)
FH_EMU_ATOMIC_RMW_(atomicXor, int, __atomic_fetch_xor)
FH_EMU_ATOMIC_RMW_(atomicXor, unsigned, __atomic_fetch_xor)
FH_EMU_ATOMIC_RMW_(atomicXor, unsigned long long, __atomic_fetch_xor)
FH_EMU_ATOMIC_RMW_(atomicExch, int, __atomic_exchange_n)
FH_EMU_ATOMIC_RMW_(atomicExch, unsigned, __atomic_exchange_n)
FH_EMU_ATOMIC_RMW_(atomicExch, unsigned long long, __atomic_exchange_n)
#undef FH_EMU_ATOMIC_RMW_

namespace fh_emu {
/* Read-modify-write through a compare-and-swap loop on the bit pattern: the way CUDA itself
 * documents float atomics beyond the native ones. `op` maps the old value to the new one. */
template <class T, class Op>
inline T atomic_cas_loop(T* address, Op op) {
  note_atomic();
  T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  for (;;) {
    T want = op(old);
    if (__atomic_compare_exchange_n(address, &old, want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return old;
  }
}
template <class F, class U>
inline F atomic_float_op(F* address, F val, F (*op)(F, F)) {
  static_assert(sizeof(F) == sizeof(U), "bit type");
  U old = atomic_cas_loop(reinterpret_cast<U*>(address), [&](U bits) {
    F v = from_bits<F>(bits);
    return (U)to_bits(op(v, val));
  });
  return from_bits<F>(old);
}
inline float add_f(float a, float b) { return a + b; }
inline double add_d(double a, double b) { return a + b; }
inline float exch_f(float, float b) { return b; }
} // namespace fh_emu

inline float atomicAdd(float* a, float v) { return ::fh_emu::atomic_float_op<float, uint32_t>(a, v, ::fh_emu::add_f); }
inline double atomicAdd(double* a, double v) { return ::fh_emu::atomic_float_op<double, uint64_t>(a, v, ::fh_emu::add_d); }
inline float atomicExch(float* a, float v) { return ::fh_emu::atomic_float_op<float, uint32_t>(a, v, ::fh_emu::exch_f); }
#define FH_EMU_ATOMIC_MINMAX_(T)                                                               \
  inline T atomicMax(T* a, T v) { return ::fh_emu::atomic_cas_loop(a, [v](T o) { return o > v ? o : v; }); } \
  inline T atomicMin(T* a, T v) { return ::fh_emu::atomic_cas_loop(a, [v](T o) { return o < v ? o : v; }); }
FH_EMU_ATOMIC_MINMAX_(int)
FH_EMU_ATOMIC_MINMAX_(unsigned)
FH_EMU_ATOMIC_MINMAX_(long long)
FH_EMU_ATOMIC_MINMAX_(unsigned long long)
#undef FH_EMU_ATOMIC_MINMAX_
#define FH_EMU_ATOMIC_CAS_(T)                                                                  \
  inline T atomicCAS(T* a, T compare, T val) {                                                 \
    ::fh_emu::note_atomic();                                                                   \
    __atomic_compare_exchange_n(a, &compare, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
    return compare; /* holds the old value whether or not the swap happened */                \
  }
FH_EMU_ATOMIC_CAS_(int)
FH_EMU_ATOMIC_CAS_(unsigned)
FH_EMU_ATOMIC_CAS_(unsigned long long)
FH_EMU_ATOMIC_CAS_(unsigned short)
#undef FH_EMU_ATOMIC_CAS_
/* CUDA's wrapping increment/decrement: ((old >= val) ? 0 : old + 1), ((old == 0 || old > val) ? val : old - 1). */
inline unsigned atomicInc(unsigned* a, unsigned val) {
  return ::fh_emu::atomic_cas_loop(a, [val](unsigned o) { return o >= val ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* a, unsigned val) {
  return ::fh_emu::atomic_cas_loop(a, [val](unsigned o) { return (o == 0 || o > val) ? val : o - 1; });
}

/* ---- math intrinsics: the accurate host function stands in for each fast-math intrinsic ---- */
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; } /* NaN -> 0 */
inline float __int_as_float(int x) { return ::fh_emu::from_bits<float>((uint32_t)x); }
inline int __float_as_int(float x) { return (int)(uint32_t)::fh_emu::to_bits(x); }
inline float __uint_as_float(unsigned x) { return ::fh_emu::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return (unsigned)::fh_emu::to_bits(x); }
inline double __longlong_as_double(long long x) { return ::fh_emu::from_bits<double>((uint64_t)x); }
inline long long __double_as_longlong(double x) { return (long long)::fh_emu::to_bits(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((int64_t)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }

#include "emu_wmma.h"

#endif
