/* emu_internal.h: what the emulator's runtime files share (not seen by kernels). */
#ifndef FH_EMU_INTERNAL_H
#define FH_EMU_INTERNAL_H

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

} // namespace fh_emu

#endif
