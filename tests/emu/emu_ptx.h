/* emu_ptx.h: the emulator's twins of the raw PTX instructions behind kernels/engine/ptx.cuh.
 *
 * ptx.cuh wraps each PTX instruction the engine uses; compiled without nvcc, each wrapper calls
 * the twin declared here (emu_ptx.cpp, emu_ptx_warp.cpp, emu_ptx_math.cpp). The twins are written
 * from the PTX ISA's documented semantics, and check what the hardware leaves undefined or traps
 * on (tests/emu/README.md, "PTX twins"):
 *   - ldmatrix and mma.sync are warp collectives of all 32 lanes with the hardware's exact
 *     fragment layouts (ptx.cuh's top comment), because kernels index fragment registers;
 *   - cp.async is deferred: the destination is poisoned (0xFF bytes) and marked in flight at
 *     issue, the source is read and the bytes land at the cp.async.wait_group that retires them;
 *     touching bytes in flight, never waiting, and misaligned addresses are reported;
 *   - shared accesses through the twins are checked for races (racecheck) and counted for bank
 *     conflicts; each one may yield the fiber (FH_EMU_YIELD) to expose other interleavings;
 *   - ex2/rcp/lg2.approx return the exact result perturbed deterministically within the
 *     documented error bound, with ftz.
 * Reports go to stderr as "========= fh_emu <tool>: ..." and abort. */
#ifndef FH_EMU_PTX_H
#define FH_EMU_PTX_H

#include <cstdint>

namespace fh_emu {

enum MmaKind { MMA_BF16_16816, MMA_F16_16816, MMA_TF32_1688 };

/* cp.async.{ca,cg}.shared.global [smem], [gmem], cp_size, src_bytes: cp_size 4, 8 or 16 (the
 * engine uses 16), both addresses cp_size-aligned, src_bytes in [0, cp_size]; the bytes past
 * src_bytes are zero-filled. Per thread, deferred until the wait that retires it. */
void ptx_cp_async(void* smem, const void* gmem, int cp_size, int src_bytes);
/* Bytes of [g, g + n) inside the range fh_emu_watch_global names (0 without one). */
uint64_t watched_overlap(const unsigned char* g, int n);
/* cp.async.commit_group: the thread's uncommitted copies become one group. */
void ptx_cp_async_commit();
/* cp.async.wait_group n: lands all of the thread's committed groups but the newest n.
 * Uncommitted copies are not waited for (PTX ISA), they stay in flight. */
void ptx_cp_async_wait(int n);

/* ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16 (warp collective): num = 1, 2, 4;
 * row_addr is this lane's 16-byte row (lanes 8i..8i+7 give matrix i's rows). */
void ptx_ldmatrix(uint32_t* r, int num, bool trans, const void* row_addr);
/* mma.sync.aligned.{m16n8k16 bf16/f16, m16n8k8 tf32}.row.col.f32 (warp collective):
 * d[0..3] += a[0..3] * b[0..1] in the documented fragment layouts. */
void ptx_mma(float* d, const uint32_t* a, const uint32_t* b, MmaKind kind);

/* st.shared / ld.shared of 4 or 16 bytes, naturally aligned, through the checks. */
void ptx_st_shared(void* p, const void* src, int bytes);
void ptx_ld_shared(const void* p, void* dst, int bytes);
/* bar.sync id, count (wait) and bar.arrive id, count (no wait) on named barrier id 1-15
 * (emu_named_bar.cpp). */
void named_barrier(int id, int count, bool wait);
int named_barrier_or(int id, int count, int pred); /* bar.red.or.pred: waits, returns the OR */

/* ex2/rcp/lg2.approx.ftz.f32. */
float ptx_ex2_approx(float x);
float ptx_rcp_approx(float x);
float ptx_lg2_approx(float x);
/* cvt.rn.bf16x2.f32: lo in bits 0-15, hi in bits 16-31. */
uint32_t ptx_cvt_bf16x2(float lo, float hi);

} // namespace fh_emu

#endif
