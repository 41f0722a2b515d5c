/* emu_report.cpp: the per-launch counter summary (fh_emu.h), for test and bench logs. */
#include <cstdio>

#include "fh_emu.h"

namespace {
unsigned long long u(uint64_t v) { return (unsigned long long)v; }
} // namespace

extern "C" {

int fh_emu_format_counters(const fh_emu_counters_t* c, char* buf, unsigned long n) {
  if (!c) return 0;
  /* Conflict-free shared access means one wavefront per phase: replays / wavefronts is the share
   * of shared-memory bandwidth lost to bank conflicts. */
  const double lost = c->smem_wavefronts ? (double)c->bank_conflict_replays / (double)c->smem_wavefronts : 0.0;
  const double sectors_per_request = c->global_requests ? (double)c->global_sectors / (double)c->global_requests : 0.0;
  return std::snprintf(
      buf, buf ? n : 0,
      "fh_emu counters: kernel %s, %llu launch(es)\n"
      "  blocks %llu, threads %llu, barriers %llu, warp collectives %llu (shuffles %llu), atomics %llu\n"
      "  mma %llu (%llu FLOP), ldmatrix %llu, mufu %llu\n"
      "  cp.async %llu (%llu bytes global->shared, %llu from the watched range), %llu warp requests, %llu sectors "
      "(%.2f per request)\n"
      "  shared requests %llu, wavefronts %llu, bank-conflict replays %llu (%.1f%%), worst phase %llu-way\n",
      c->kernel[0] ? c->kernel : "-", u(c->launches), u(c->blocks), u(c->threads), u(c->barriers),
      u(c->warp_collectives), u(c->shuffles), u(c->atomics), u(c->mma_ops), u(c->mma_flops), u(c->ldmatrix_ops),
      u(c->mufu_ops), u(c->cp_async_ops), u(c->bytes_g2s), u(c->bytes_g2s_watched), u(c->global_requests), u(c->global_sectors),
      sectors_per_request, u(c->smem_requests), u(c->smem_wavefronts), u(c->bank_conflict_replays), 100.0 * lost,
      u(c->bank_conflict_max_ways));
}

void fh_emu_print_counters(const fh_emu_counters_t* c) {
  char buf[1024];
  fh_emu_format_counters(c, buf, sizeof buf);
  std::fputs(buf, stderr);
}

} // extern "C"
