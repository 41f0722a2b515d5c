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
/* A report: "========= fh_emu <tool>: <what>", kernel, launch, block; report_die ends it. */
void report_header(const char* tool, const char* what);
[[noreturn]] void report_die();

} // namespace fh_emu

#endif
