/* emu_internal.h: what the emulator's runtime files share (not seen by kernels). */
#ifndef FH_EMU_INTERNAL_H
#define FH_EMU_INTERNAL_H

#include <atomic>
#include <cstdint>

#include "emu_api.h"
#include "fh_emu.h"

namespace fh_emu {

struct LaunchState {
  LaunchConfig cfg;
  std::function<void()> body;
};

/* Run every block of a validated launch to completion (emu_core.cpp). */
void run_launch(const LaunchState& L);
/* The calling host thread's cudaGetLastError state (emu_runtime.cpp). */
cudaError_t set_last_error(cudaError_t e);

/* ---- between the scheduler (emu_core.cpp) and the PTX twins (emu_ptx*.cpp) ---- */

/* The twins' per-worker state; created by the first twin call, activated per block. */
struct PtxState;
void ptx_state_free(PtxState* s);
/* Hooks the scheduler calls while the block's PTX state is active. */
void ptx_on_barrier(PtxState& s);                        /* a __syncthreads completed */
void ptx_on_named_barrier(PtxState& s, uint64_t warps);  /* a named barrier of these warps (bit w) completed */
void ptx_on_warp_sync(PtxState& s, int warp, unsigned mask); /* a warp collective completed */
void ptx_on_block_end(PtxState& s);                      /* every thread exited */

struct RunningThread {
  int linear, lane, warp;
};
RunningThread running_thread();
bool in_kernel(); /* a CUDA thread (fiber) is running on this OS thread */
int block_threads();
unsigned warp_live_mask(int warp); /* lanes that exist and have not exited */
size_t dynamic_smem_bytes();
PtxState*& worker_ptx_slot();
bool& worker_ptx_active();
fh_emu_counters_t& worker_counters();
/* The range fh_emu_watch_global set ([lo, hi), empty when hi == 0). */
extern std::atomic<uintptr_t> g_watch_lo, g_watch_hi;
/* Maybe hand the fiber back to the scheduler (FH_EMU_YIELD probability, seeded per block). */
void maybe_yield();
/* ---- between the scheduler and the Hopper twins (emu_sm90*.cpp) ----
 * A thread waiting on an mbarrier phase sleeps (neither runnable nor at a barrier) until the
 * phase completes; when every live thread sleeps or waits, the scheduler first lets an async
 * copy in flight land (it would, eventually, on the hardware) and only then reports a deadlock. */
void async_sleep(const void* obj);  /* the running thread sleeps until async_wake(obj) */
void async_wake(const void* obj);   /* every thread sleeping on obj becomes runnable */
void fiber_yield();                 /* back to the scheduler, still runnable */
bool ptx_async_progress(PtxState& s); /* lands one async copy; false when none is in flight */
/* ---- clusters (emu_core.cpp). A launch without the cluster attribute is a cluster of one CTA:
 * rank 0, size 1, member 0 is the running CTA. */
int cluster_rank();
int cluster_size();
PtxState* member_ptx(int r);     /* rank r's twin state; nullptr if it has none yet or finished */
unsigned char* member_smem(int r); /* rank r's dynamic shared memory (same size as ours) */
bool member_exited(int r);       /* every thread of rank r exited */
uint3 member_block(int r);
void member_wake(int r, const void* obj); /* async_wake in rank r */
void cluster_barrier_arrive();   /* barrier.cluster.arrive */
void cluster_barrier_wait();     /* barrier.cluster.wait */
/* One line of the deadlock report for the threads (a list, "0-127") sleeping on obj. */
void ptx_describe_sleepers(PtxState& s, const void* obj, const char* threads);
/* A report: "========= fh_emu <tool>: <what>", kernel, launch, block; report_die ends it. */
void report_header(const char* tool, const char* what);
[[noreturn]] void report_die();

} // namespace fh_emu

#endif
