/* emu_ptx.cpp: the PTX twins' state, racecheck and cp.async (see emu_ptx_state.h for the model),
 * and st/ld.shared. ldmatrix, mma and bank counting are in emu_ptx_warp.cpp, ex2/rcp/lg2 in
 * emu_ptx_math.cpp.
 *
 * cp.async (PTX ISA, "Data Movement and Conversion Instructions: cp.async"): the copy is
 * asynchronous, and its writes to shared memory are only guaranteed complete, and visible to
 * the issuing thread, once a cp.async.wait_group (wait_all) retires its group; other threads
 * see them after a barrier that follows the wait. The hardware may read the source and write
 * the destination at any moment in between. The twin therefore poisons the destination at
 * issue and performs the whole copy at the wait: a kernel that reads early sees NaN, and
 * racecheck reports it; a kernel that changes the source before the wait sees its change. */
#include <link.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "emu_ptx.h"
#include "emu_ptx_state.h"
#include "emu_sm90_state.h"

namespace fh_emu {
namespace ptx {

const char* kind_name(uint8_t k) {
  switch (k) {
    case K_LDMATRIX: return "ldmatrix";
    case K_LD_SHARED: return "ld.shared";
    case K_ST_SHARED: return "st.shared";
    case K_CP_ASYNC: return "cp.async";
    case K_WGMMA: return "wgmma operand";
    default: return "?";
  }
}

namespace {

/* ---- where __shared__ variables live ----
 * __shared__ is block-scope thread_local (emu_device.h), i.e. static TLS of the executable. On
 * x86-64 Linux (TLS variant II) the static TLS blocks of the initially loaded modules lie just
 * below the thread pointer, so [tp - sum of their PT_TLS sizes, tp) bounds every __shared__
 * variable: an address outside it and outside the dynamic shared memory is not shared memory
 * (a global pointer passed where a shared one belongs, e.g. swapped cp.async operands). */
size_t g_static_tls = 0;
std::once_flag g_tls_once;

int add_tls(struct dl_phdr_info* info, size_t, void* data) {
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_TLS)
      *static_cast<size_t*>(data) += info->dlpi_phdr[i].p_memsz + info->dlpi_phdr[i].p_align;
  return 0;
}

/* -1: cannot tell on this platform; 0: not static TLS; 1: static TLS. */
int in_static_tls(const void* p, int bytes) {
#if defined(__x86_64__) && defined(__linux__)
  std::call_once(g_tls_once, [] {
    size_t n = 0;
    dl_iterate_phdr(add_tls, &n);
    g_static_tls = n + 4096; /* the TCB's alignment padding */
  });
  uintptr_t tp;
  asm("mov %%fs:0, %0" : "=r"(tp));
  const uintptr_t a = (uintptr_t)p;
  return a >= tp - g_static_tls && a + (uintptr_t)bytes <= tp;
#else
  (void)p, (void)bytes;
  return -1;
#endif
}

void activate(PtxState& s) {
  s.smem = static_cast<unsigned char*>(dynamic_smem());
  s.smem_bytes = dynamic_smem_bytes();
  const size_t words = (s.smem_bytes + 3) / 4;
  /* Grow (or renew before the 32-bit epoch could wrap): zeroed entries have epoch 0, stale. */
  if (s.shadow.size() < words || s.epoch > 0xf0000000u) {
    s.shadow.assign(std::max(words, s.shadow.size()), WordShadow{});
    s.epoch = 0;
  }
  s.base = ++s.epoch;
  s.nthreads = block_threads();
  if ((int)s.threads.size() < s.nthreads) s.threads.resize((size_t)s.nthreads);
  for (int i = 0; i < s.nthreads; ++i) {
    ThreadPtx& t = s.threads[(size_t)i];
    t.pending.clear();
    t.committed = 0;
    std::memset(t.k, 0, sizeof t.k);
    std::memset(t.vc, 0, sizeof t.vc);
    t.fence_seq = 0;
  }
  s.warps.resize((size_t)(s.nthreads + 31) / 32);
  for (WarpPtx& w : s.warps)
    for (int st = 0; st < S_COUNT; ++st) {
      w.q[st].clear();
      w.base[st] = 0;
    }
  s.copies.clear();
  s.free_copies.clear();
  s.outside_pending = 0;
  s.bulk_inflight = 0;
  s.wgmma_used = false;
  sm90_on_activate(s); /* the Hopper twins' per-block state (emu_sm90.cpp) */
}

/* Access `prev` (by thread prev_thread at its own clock prev_clock) happened before the
 * current access of `thread` in this barrier interval iff both are the same thread, or lanes of
 * one warp that both completed a collective since (the clock `thread` knows of the other lane
 * went past the one recorded). */
inline bool ordered(const PtxState& s, int prev_thread, uint32_t prev_clock, int thread) {
  if (prev_thread == thread) return true;
  if (prev_thread / 32 != thread / 32) return false;
  return s.threads[(size_t)thread].vc[prev_thread % 32] > prev_clock;
}

[[noreturn]] void report_inflight(PtxState& s, int thread, bool write, Kind kind, const void* p, int bytes,
                                  const Copy& c) {
  report_header("cp.async", write ? "write of shared bytes written by cp.async still in flight"
                                  : "read of shared bytes written by cp.async still in flight");
  std::fprintf(stderr, "=========   %s %s %s (%s)\n", thread_name(thread).c_str(), write ? "writes" : "reads",
               describe(s, p, bytes).c_str(), kind_name(kind));
  if (c.group >= 0)
    std::fprintf(stderr,
                 "=========   %s issued a cp.async to %s in commit group %d; no cp.async.wait_group retired it\n",
                 thread_name(c.thread).c_str(), describe(s, c.dst, c.size).c_str(), c.group);
  else
    std::fprintf(stderr,
                 "=========   %s issued a cp.async to %s and has not committed it (cp.async.commit_group), so no "
                 "cp.async.wait_group retired it\n",
                 thread_name(c.thread).c_str(), describe(s, c.dst, c.size).c_str());
  std::fprintf(stderr, "=========   the bytes land only at that thread's cp.async.wait_group; other threads see them "
                       "after a __syncthreads that follows the wait (or, after a cp.async.mbarrier.arrive, once they "
                       "waited for the mbarrier phase it completes)\n");
  report_die();
}

[[noreturn]] void report_race(PtxState& s, const char* hazard, int thread, bool write, Kind kind, size_t word,
                              int other, bool other_write, Kind other_kind, bool other_is_warp) {
  report_header("racecheck", hazard);
  std::fprintf(stderr, "=========   %s %s %s (%s)\n", thread_name(thread).c_str(), write ? "writes" : "reads",
               describe(s, s.smem + word * 4, 4).c_str(), kind_name(kind));
  if (other_is_warp)
    std::fprintf(stderr, "=========   a thread of warp %d read them (%s) in the same barrier interval\n", other,
                 kind_name(other_kind));
  else
    std::fprintf(stderr, "=========   %s %s them (%s%s) in the same barrier interval\n", thread_name(other).c_str(),
                 other_write ? "wrote" : "read", kind_name(other_kind),
                 other_write && other_kind == K_CP_ASYNC ? ", landed at its cp.async.wait_group" : "");
  if (!other_is_warp && other / 32 == thread / 32)
    std::fprintf(stderr, "=========   no __syncthreads, and no __syncwarp or other warp collective of both lanes, "
                         "between the two accesses\n");
  else
    std::fprintf(stderr, "=========   no __syncthreads between the two accesses\n");
  report_die();
}

void check_outside_inflight(PtxState& s, int thread, const unsigned char* p, int bytes, Kind kind, bool write) {
  if (!s.outside_pending) return;
  for (const Copy& c : s.copies)
    if (c.thread >= 0 && !c.in_dyn && p < c.dst + c.size && c.dst < p + bytes)
      report_inflight(s, thread, write, kind, p, bytes, c);
}

int alloc_copy(PtxState& s) {
  if (!s.free_copies.empty()) {
    const int id = s.free_copies.back();
    s.free_copies.pop_back();
    return id;
  }
  s.copies.push_back(Copy{});
  return (int)s.copies.size() - 1;
}

/* The copy lands: source bytes, zero fill, and the write is recorded for the issuing thread. */
void land(PtxState& s, int id) {
  Copy c = s.copies[(size_t)id];
  if (c.in_dyn) {
    const size_t w0 = (size_t)(c.dst - s.smem) / 4;
    for (size_t w = w0; w < w0 + (size_t)c.size / 4; ++w) s.shadow[w].inflight = 0;
  } else {
    --s.outside_pending;
  }
  if (c.src_bytes > 0) std::memcpy(c.dst, c.src, (size_t)c.src_bytes);
  std::memset(c.dst + c.src_bytes, 0, (size_t)(c.size - c.src_bytes));
  if (c.in_dyn) shadow_write(s, c.thread, c.dst, c.size, K_CP_ASYNC);
  s.copies[(size_t)id].thread = -1;
  s.free_copies.push_back(id);
}

} // namespace

std::string thread_name(int thread) {
  char b[64];
  std::snprintf(b, sizeof b, "thread %d (warp %d, lane %d)", thread, thread / 32, thread % 32);
  return b;
}

std::string describe(PtxState& s, const void* p, int bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  char b[128];
  if (s.smem_bytes && c >= s.smem && c < s.smem + s.smem_bytes)
    std::snprintf(b, sizeof b, "bytes %zu-%zu of dynamic shared memory", (size_t)(c - s.smem),
                  (size_t)(c - s.smem) + (size_t)bytes - 1);
  else
    std::snprintf(b, sizeof b, "%d bytes at %p (a __shared__ variable)", bytes, p);
  return b;
}

void fail(const char* what, int thread, const char* fmt, ...) {
  report_header("ptx", what);
  std::fprintf(stderr, "=========   %s: ", thread_name(thread).c_str());
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  report_die();
}

PtxState& state() {
  PtxState*& slot = worker_ptx_slot();
  if (!slot) slot = new PtxState();
  if (!worker_ptx_active()) {
    activate(*slot);
    worker_ptx_active() = true;
  }
  return *slot;
}

void check_aligned(const void* p, int align, const char* op, const char* which, int thread) {
  if ((uintptr_t)p % (uintptr_t)align != 0)
    fail("misaligned address (the hardware raises a misaligned-address error)", thread,
         "%s: %s %p is not %d-byte aligned", op, which, p, align);
}

Place locate(PtxState& s, const void* p, int bytes, const char* op, int thread) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (s.smem_bytes && c < s.smem + s.smem_bytes && c + bytes > s.smem) {
    if (c < s.smem || c + bytes > s.smem + s.smem_bytes)
      fail("shared access out of range", thread,
           "%s: %d bytes at %p run outside the %zu bytes of dynamic shared memory at %p", op, bytes, p,
           s.smem_bytes, (const void*)s.smem);
    return Place{true, (size_t)(c - s.smem)};
  }
  const int tls = in_static_tls(p, bytes);
  if (tls != 1 && s.smem_bytes && c >= s.smem && c < s.smem + s.smem_bytes + 4096)
    fail("shared access out of range", thread, "%s: %d bytes at byte offset %zu, past the end of the %zu bytes of dynamic "
         "shared memory", op, bytes, (size_t)(c - s.smem), s.smem_bytes);
  if (tls == 0)
    fail("address is not shared memory", thread,
         "%s: %p is neither in the block's dynamic shared memory (%zu bytes at %p) nor a __shared__ variable", op,
         p, s.smem_bytes, (const void*)s.smem);
  return Place{false, 0};
}

void land_copy(PtxState& s, int id) { land(s, id); }

void check_cp_landed(PtxState& s, int thread, const unsigned char* p, int bytes, Kind kind) {
  if (!(s.smem_bytes && p >= s.smem && p < s.smem + s.smem_bytes)) return;
  const size_t w0 = (size_t)(p - s.smem) / 4, w1 = ((size_t)(p - s.smem) + (size_t)bytes + 3) / 4;
  for (size_t w = w0; w < w1; ++w)
    if (s.shadow[w].inflight) report_inflight(s, thread, false, kind, p, bytes, s.copies[(size_t)s.shadow[w].inflight - 1]);
}

void shadow_read(PtxState& s, int thread, const unsigned char* p, int bytes, Kind kind) {
  if (s.bulk_inflight) sm90_check_bulk_access(s, thread, p, bytes, false, kind);
  if (!(s.smem_bytes && p >= s.smem && p < s.smem + s.smem_bytes)) {
    check_outside_inflight(s, thread, p, bytes, kind, false);
    return; /* static __shared__: no shadow */
  }
  const size_t w0 = (size_t)(p - s.smem) / 4, w1 = ((size_t)(p - s.smem) + (size_t)bytes + 3) / 4;
  const uint32_t E = s.epoch, clock = s.threads[(size_t)thread].vc[thread % 32];
  for (size_t w = w0; w < w1; ++w) {
    WordShadow& x = s.shadow[w];
    if (x.inflight) report_inflight(s, thread, false, kind, p, bytes, s.copies[(size_t)x.inflight - 1]);
    if (x.w_epoch == E && !ordered(s, x.w_thread, x.w_clock, thread))
      report_race(s, "read-after-write hazard on shared memory", thread, false, kind, w, x.w_thread, true,
                  (Kind)x.w_kind, false);
    if (x.r_epoch != E) {
      x.r_epoch = E;
      x.r_warps = 0;
    }
    x.r_warps |= 1u << (thread / 32 % 32);
    x.r_thread = (uint16_t)thread;
    x.r_clock = clock;
    x.r_kind = kind;
  }
}

void shadow_write(PtxState& s, int thread, const unsigned char* p, int bytes, Kind kind, int claim) {
  if (s.bulk_inflight) sm90_check_bulk_access(s, thread, p, bytes, true, kind);
  if (!(s.smem_bytes && p >= s.smem && p < s.smem + s.smem_bytes)) {
    check_outside_inflight(s, thread, p, bytes, kind, true);
    return;
  }
  const size_t w0 = (size_t)(p - s.smem) / 4, w1 = ((size_t)(p - s.smem) + (size_t)bytes + 3) / 4;
  const uint32_t E = s.epoch, clock = s.threads[(size_t)thread].vc[thread % 32];
  const int warp = thread / 32;
  const uint64_t gseq = claim < 0 ? ++s.gseq : 0; /* st.shared and cp.async: the generic proxy */
  for (size_t w = w0; w < w1; ++w) {
    WordShadow& x = s.shadow[w];
    if (x.inflight) report_inflight(s, thread, true, kind, p, bytes, s.copies[(size_t)x.inflight - 1]);
    if (x.w_epoch == E && !ordered(s, x.w_thread, x.w_clock, thread))
      report_race(s, "write-after-write hazard on shared memory", thread, true, kind, w, x.w_thread, true,
                  (Kind)x.w_kind, false);
    if (x.r_epoch == E) {
      const uint32_t others = x.r_warps & ~(1u << (warp % 32));
      if (others) {
        /* Readers in other warps: name the last reader if it is one of them. */
        const bool named = x.r_thread / 32 != warp;
        report_race(s, "write-after-read hazard on shared memory", thread, true, kind, w,
                    named ? (int)x.r_thread : __builtin_ctz(others), false, (Kind)x.r_kind, !named);
      }
      if (!ordered(s, x.r_thread, x.r_clock, thread))
        report_race(s, "write-after-read hazard on shared memory", thread, true, kind, w, x.r_thread, false,
                    (Kind)x.r_kind, false);
    }
    if (claim >= 0) {
      x.inflight = claim + 1;
    } else {
      x.w_epoch = E;
      x.w_clock = clock;
      x.w_thread = (uint16_t)thread;
      x.w_kind = kind;
      x.g_seq = gseq;
    }
  }
}

void note_async_write(PtxState& s, const unsigned char* p, uint32_t bytes) {
  if (!(s.smem_bytes && p >= s.smem && p < s.smem + s.smem_bytes)) return;
  const size_t w0 = (size_t)(p - s.smem) / 4, w1 = std::min(((size_t)(p - s.smem) + bytes + 3) / 4, s.shadow.size());
  for (size_t w = w0; w < w1; ++w) s.shadow[w].g_seq = 0;
}

void fence_proxy(PtxState& s, int thread) { s.threads[(size_t)thread].fence_seq = s.gseq; }

void check_async_read(PtxState& s, int thread, const unsigned char* p, int bytes, const char* what) {
  if (!(s.smem_bytes && p >= s.smem && p < s.smem + s.smem_bytes)) return;
  const size_t w0 = (size_t)(p - s.smem) / 4, w1 = ((size_t)(p - s.smem) + (size_t)bytes + 3) / 4;
  for (size_t w = w0; w < w1; ++w) {
    const WordShadow& x = s.shadow[w];
    if (!x.g_seq || x.w_epoch < s.base) continue; /* async-proxy write, none, or an earlier block's */
    if (s.threads[(size_t)thread].fence_seq >= x.g_seq || s.threads[(size_t)x.w_thread].fence_seq >= x.g_seq) continue;
    fail("async-proxy read of a generic-proxy write without fence.proxy.async", thread,
         "%s reads bytes %zu-%zu of dynamic shared memory, last written by %s (%s), and neither that thread after "
         "its write nor this one before the read executed fence.proxy.async: the async proxy (wgmma, TMA) need "
         "not see generic-proxy writes (st.shared, cp.async) without it", what, 4 * w, 4 * w + 3,
         thread_name(x.w_thread).c_str(), kind_name(x.w_kind));
  }
}

} // namespace ptx

/* ---- hooks called by the scheduler (emu_core.cpp) ---- */

void ptx_state_free(PtxState* s) {
  if (s) delete s->sm90;
  delete s;
}

void ptx_on_barrier(PtxState& s) {
  ++s.epoch;
  ptx::flush_instructions(s);
}

/* Only the participants' warps are realigned: a warp outside the barrier (a producer running
 * on) may have lanes at different accesses right now, and restarting their counts would group
 * one lane's n-th access with another's m-th (false bank conflicts). */
void ptx_on_named_barrier(PtxState& s, uint64_t warps) {
  ++s.epoch;
  for (size_t w = 0; w < s.warps.size() && w < 64; ++w)
    if (warps >> w & 1u) ptx::flush_warp(s, (int)w);
}

/* Vector clocks: every lane of the collective ticks its own clock, then all learn the maximum
 * of what any of them knew, so an access a lane made before the collective is ordered before
 * whatever the others do after it. */
void ptx_on_warp_sync(PtxState& s, int warp, unsigned mask) {
  uint32_t m[32] = {};
  for (int l = 0; l < 32; ++l) {
    const int t = warp * 32 + l;
    if (!(mask >> l & 1) || t >= s.nthreads) continue;
    uint32_t* vc = s.threads[(size_t)t].vc;
    ++vc[l];
    for (int j = 0; j < 32; ++j) m[j] = std::max(m[j], vc[j]);
  }
  for (int l = 0; l < 32; ++l) {
    const int t = warp * 32 + l;
    if ((mask >> l & 1) && t < s.nthreads) std::memcpy(s.threads[(size_t)t].vc, m, sizeof m);
  }
}

void ptx_on_block_end(PtxState& s) {
  sm90_on_block_end(s); /* bulk copies and wgmma groups never waited for */
  ptx::flush_instructions(s);
  int first = -1, nthreads = 0;
  for (int t = 0; t < s.nthreads; ++t)
    if (!s.threads[(size_t)t].pending.empty()) {
      if (first < 0) first = t;
      ++nthreads;
    }
  if (first < 0) return;
  report_header("cp.async", "copies still in flight when the block finished (never waited for)");
  int shown = 0;
  for (int t = 0; t < s.nthreads && shown < 8; ++t) {
    const ptx::ThreadPtx& th = s.threads[(size_t)t];
    if (th.pending.empty()) continue;
    ++shown;
    const ptx::Copy& c = s.copies[(size_t)th.pending.front()];
    int uncommitted = 0;
    for (int id : th.pending) uncommitted += s.copies[(size_t)id].group < 0;
    std::fprintf(stderr, "=========   %s: %zu copies in flight (%d not committed), the first to %s%s\n",
                 ptx::thread_name(t).c_str(), th.pending.size(), uncommitted, ptx::describe(s, c.dst, c.size).c_str(),
                 c.group >= 0 ? (" in commit group " + std::to_string(c.group)).c_str() : "");
  }
  if (nthreads > shown) std::fprintf(stderr, "=========   ... and %d more threads\n", nthreads - shown);
  std::fprintf(stderr, "=========   every cp.async needs a cp.async.wait_group that retires its group (after a "
                       "cp.async.commit_group) before the kernel ends\n");
  report_die();
}

/* ---- the twins ---- */

/* Bytes of [g, g + n) inside the watched range (fh_emu_watch_global); the TMA twin uses it too. */
uint64_t watched_overlap(const unsigned char* g, int n) {
  const uintptr_t lo = g_watch_lo.load(std::memory_order_relaxed), hi = g_watch_hi.load(std::memory_order_relaxed);
  const uintptr_t a = std::max((uintptr_t)g, lo), b = std::min((uintptr_t)g + (uintptr_t)n, hi);
  return b > a ? (uint64_t)(b - a) : 0u;
}

void ptx_cp_async(void* smem, const void* gmem, int cp_size, int src_bytes) {
  PtxState& s = ptx::state();
  maybe_yield();
  const int t = running_thread().linear;
  if (cp_size != 4 && cp_size != 8 && cp_size != 16)
    ptx::fail("invalid cp.async operand", t, "cp.async: cp-size %d is not 4, 8 or 16", cp_size);
  if (src_bytes < 0 || src_bytes > cp_size)
    ptx::fail("invalid cp.async operand", t, "cp.async: src-size %d is outside [0, cp-size %d]", src_bytes, cp_size);
  ptx::check_aligned(smem, cp_size, "cp.async", "shared destination", t);
  ptx::check_aligned(gmem, cp_size, "cp.async", "global source", t);
  const ptx::Place pl = ptx::locate(s, smem, cp_size, "cp.async destination", t);
  const unsigned char* g = static_cast<const unsigned char*>(gmem);
  if ((s.smem_bytes && g < s.smem + s.smem_bytes && g + cp_size > s.smem) || ptx::in_static_tls(gmem, cp_size) == 1)
    ptx::fail("cp.async source is shared memory", t, "cp.async: source %p is shared memory, not global", gmem);
  const int id = ptx::alloc_copy(s);
  s.copies[(size_t)id].thread = -1; /* not in flight yet: the checks below must not see it */
  /* Checked as a write now: the hardware may write the destination at any time after issue. */
  ptx::shadow_write(s, t, static_cast<unsigned char*>(smem), cp_size, ptx::K_CP_ASYNC, id);
  s.copies[(size_t)id] = ptx::Copy{static_cast<unsigned char*>(smem), g, cp_size, src_bytes, t, -1, pl.dyn};
  if (!pl.dyn) ++s.outside_pending;
  std::memset(smem, 0xff, (size_t)cp_size); /* poisoned (NaN) until it lands */
  s.threads[(size_t)t].pending.push_back(id);
  fh_emu_counters_t& c = worker_counters();
  ++c.cp_async_ops;
  c.bytes_g2s += (uint64_t)src_bytes;
  c.bytes_g2s_watched += watched_overlap(g, src_bytes);
  ptx::group_access(s, ptx::S_CP, smem, cp_size, gmem, src_bytes);
}

void ptx_cp_async_commit() {
  PtxState& s = ptx::state();
  ptx::ThreadPtx& me = s.threads[(size_t)running_thread().linear];
  for (int id : me.pending)
    if (s.copies[(size_t)id].group < 0) s.copies[(size_t)id].group = me.committed;
  ++me.committed; /* an empty group is a group too (PTX ISA) */
}

void ptx_cp_async_wait(int n) {
  PtxState& s = ptx::state();
  maybe_yield();
  ptx::ThreadPtx& me = s.threads[(size_t)running_thread().linear];
  if (n < 0) ptx::fail("invalid cp.async.wait_group operand", running_thread().linear, "N = %d is negative", n);
  const int retire_below = me.committed - n; /* groups older than the newest n */
  size_t kept = 0; /* compacted in place: no allocation per wait */
  for (size_t i = 0; i < me.pending.size(); ++i) {
    const int id = me.pending[i];
    const int g = s.copies[(size_t)id].group;
    if (g >= 0 && g < retire_below) ptx::land(s, id);
    else me.pending[kept++] = id;
  }
  me.pending.resize(kept);
}

void ptx_st_shared(void* p, const void* src, int bytes) {
  PtxState& s = ptx::state();
  maybe_yield();
  const int t = running_thread().linear;
  if (bytes != 4 && bytes != 8 && bytes != 16)
    ptx::fail("invalid st.shared width", t, "st.shared of %d bytes (4, 8 or 16)", bytes);
  ptx::check_aligned(p, bytes, "st.shared", "address", t);
  ptx::locate(s, p, bytes, "st.shared", t);
  if (s.wgmma_used) sm90_check_taint(src, bytes, "st.shared"); /* an in-flight accumulator stored */
  ptx::shadow_write(s, t, static_cast<unsigned char*>(p), bytes, ptx::K_ST_SHARED);
  std::memcpy(p, src, (size_t)bytes);
  ptx::group_access(s, ptx::S_ST, p, bytes, nullptr, 0);
}

void ptx_ld_shared(const void* p, void* dst, int bytes) {
  PtxState& s = ptx::state();
  maybe_yield();
  const int t = running_thread().linear;
  if (bytes != 4 && bytes != 8 && bytes != 16)
    ptx::fail("invalid ld.shared width", t, "ld.shared of %d bytes (4, 8 or 16)", bytes);
  ptx::check_aligned(p, bytes, "ld.shared", "address", t);
  ptx::locate(s, p, bytes, "ld.shared", t);
  ptx::shadow_read(s, t, static_cast<const unsigned char*>(p), bytes, ptx::K_LD_SHARED);
  std::memcpy(dst, p, (size_t)bytes);
  ptx::group_access(s, ptx::S_LD, p, bytes, nullptr, 0);
}

} // namespace fh_emu
