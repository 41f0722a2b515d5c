/* emu_named_bar.cpp: named barriers, the twin of `bar.sync a, b` and `bar.arrive a, b` (PTX ISA,
 * "Parallel Synchronization and Communication Instructions: bar, barrier"), which let a subset
 * of a CTA's warps synchronize: the consumer warpgroups of a warp-specialized kernel among
 * themselves while a producer warp runs on, or a producer's bar.arrive that consumers wait on
 * with bar.sync. docs/hopper.md "Named barriers" has the rules the library follows.
 *
 *   - Barrier a is one of 1-15: 0 is the barrier of __syncthreads, which the kernels keep for
 *     the whole block (the twin refuses 0 rather than model the mix).
 *   - b, the thread count, is a positive multiple of the warp size and at most the block's
 *     threads; every arrival of one phase gives the same b (the ISA leaves a mix undefined).
 *   - The hardware counts a warp's arrival as 32 threads, so whole warps must arrive, as the
 *     .aligned forms require; here each thread counts one, so a partial warp never completes a
 *     phase and shows as a deadlock.
 *   - bar.sync waits for the phase it arrived on; bar.arrive does not wait. A thread that
 *     arrives twice before the phase completes is a report (on the hardware its warp would count
 *     twice).
 *   - bar.red.or.pred (named_barrier_or) is bar.sync that also ORs a predicate over the phase's
 *     arrivals and gives the result to every participant. One phase's arrivals are all bar.red
 *     or all bar.sync / bar.arrive (the ISA requires it: a mix is a report).
 *   - Completion orders the participants' shared-memory accesses. Racecheck (emu_ptx.cpp) keeps
 *     one barrier epoch per block, so a completed named barrier starts a new epoch for every
 *     thread: a race between a participant and a thread outside the barrier goes unreported
 *     (docs/hopper.md lists it among the checks not made). */
#include <cstdio>

#include "emu_ptx.h"
#include "emu_sched.h"

namespace fh_emu {
namespace sched {

const NamedBar* named_bar_of(const Worker& w, const void* obj) {
  const NamedBar* b = static_cast<const NamedBar*>(obj);
  return b >= w.nbar && b < w.nbar + kNamedBars ? b : nullptr;
}

void describe_named_bar(const Worker& w, const NamedBar& b, const char* ids) {
  std::fprintf(stderr,
               "=========   threads %s wait in bar.sync %d (thread count %d, phase %u): %d arrived so far; the "
               "other %d never arrive (whole warps must arrive, and an exited thread never does)\n",
               ids, (int)(&b - w.nbar), b.count, b.phase, b.arrived, b.count - b.arrived);
}

} // namespace sched

using namespace sched;

namespace {
/* One arrival of the calling thread at barrier id (count threads); red: a bar.red.or arrival with
 * predicate pred. Returns the phase's OR to a bar.red waiter. */
int arrive(int id, int count, bool wait, bool red, int pred) {
  Worker& w = worker();
  Thread& t = current();
  const char* op = red ? "bar.red.or" : wait ? "bar.sync" : "bar.arrive";
  if (id < 1 || id >= kNamedBars)
    report_and_abort("invalid named barrier", "%s %d, %d: named barriers are 1-%d (barrier 0 is the one of "
                     "__syncthreads)", op, id, count, kNamedBars - 1);
  if (count <= 0 || count % 32 != 0 || count > w.nthreads)
    report_and_abort("invalid named barrier thread count", "%s %d, %d: the thread count must be a positive multiple "
                     "of the warp size (32) and at most the block's %d threads", op, id, count, w.nthreads);
  NamedBar& b = w.nbar[id];
  if (b.count && b.count != count)
    report_and_abort("named barrier arrivals with different thread counts", "%s %d, %d: thread %d arrived at this "
                     "phase (%u) with thread count %d", op, id, count, b.first, b.phase, b.count);
  if (t.nbar_in >> id & 1)
    report_and_abort("thread arrives twice at a named barrier in one phase", "%s %d, %d: the thread already arrived "
                     "at phase %u (%d of %d arrivals so far); it must wait for the phase to complete first", op, id,
                     count, b.phase, b.arrived, b.count);
  const int kind = red ? 2 : 1;
  if (b.kind && b.kind != kind)
    report_and_abort("bar.red mixed with bar.sync / bar.arrive in one phase", "%s %d, %d: thread %d arrived at this "
                     "phase (%u) with %s; every arrival of a phase must be a bar.red with the same operation, or none",
                     op, id, count, b.first, b.phase, b.kind == 2 ? "bar.red.or" : "bar.sync or bar.arrive");
  if (!b.count) b.count = count, b.first = t.linear, b.kind = kind;
  b.acc |= pred != 0;
  t.nbar_in = (uint16_t)(t.nbar_in | 1u << id);
  const uint32_t phase = b.phase;
  if (++b.arrived == b.count) {
    /* Last arrival: the next phase, and the OR kept for this one's waiters. No thread can
     * complete the next phase (and overwrite result) before all of them have read it. */
    b = NamedBar{0, 0, -1, phase + 1, 0, 0, b.acc};
    uint64_t warps = 0; /* the participants' warps */
    for (int i = 0; i < w.nthreads; ++i) {
      if (w.threads[i].nbar_in >> id & 1u) warps |= 1ull << (i / 32);
      w.threads[i].nbar_in = (uint16_t)(w.threads[i].nbar_in & ~(1u << id));
    }
    async_wake(&b);
    ++w.counters.named_barriers;
    /* a new racecheck interval (see the file comment), and the participants' accesses regrouped */
    if (w.ptx_active) ptx_on_named_barrier(*w.ptx, warps);
  } else if (wait) {
    while (b.phase == phase) async_sleep(&b);
  }
  return b.result;
}
} // namespace

void named_barrier(int id, int count, bool wait) { (void)arrive(id, count, wait, false, 0); }

int named_barrier_or(int id, int count, int pred) { return arrive(id, count, true, true, pred); }

} // namespace fh_emu
