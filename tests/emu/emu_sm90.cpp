/* emu_sm90.cpp: the Hopper twins' state, mbarrier, the bulk tensor copy's asynchrony, clusters
 * (see emu_sm90_state.h for the model; the copy's data movement and the tensor map are in
 * emu_sm90_tma.cpp, wgmma in emu_sm90_wgmma.cpp).
 *
 * mbarrier (PTX ISA, "Parallel Synchronization and Communication Instructions: mbarrier"): a
 * phase completes when its pending arrival count and its transaction count are both zero; then
 * the phase bit flips and the arrival count is reloaded. try_wait.parity P is true when the
 * current phase's parity differs from P, i.e. the phase of parity P completed. The twin keeps
 * that state beside the 8 bytes of the barrier, makes a waiting thread sleep until the phase
 * completes (or returns false once, as the hardware may after its time limit, so a caller that
 * does not loop is caught), and reports a wait that nothing can complete any more. */
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <memory>

#include "emu_sm90_state.h"

namespace fh_emu {
namespace sm90 {

namespace {

uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

[[noreturn]] void fail(const char* tool, const char* what, int thread, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));
void fail(const char* tool, const char* what, int thread, const char* fmt, ...) {
  report_header(tool, what);
  if (thread >= 0) std::fprintf(stderr, "=========   %s: ", ptx::thread_name(thread).c_str());
  else std::fprintf(stderr, "=========   ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  report_die();
}

Mbar& get_bar(PtxState& s, void* bar, const char* op, int t) {
  ptx::check_aligned(bar, 8, op, "mbarrier", t);
  ptx::locate(s, bar, 8, op, t);
  Mbar* m = find_bar_in(st_of(s), bar);
  if (!m)
    fail("mbarrier", "mbarrier used before mbarrier.init", t, "%s on the mbarrier at %s, which no mbarrier.init "
         "initialized in this block", op, bar_name(s, bar).c_str());
  return *m;
}

/* The phase completes: next phase, arrivals reloaded, sleepers woken (in the CTA of cluster
 * rank `owner`, which holds the barrier). */
void complete_phase(Mbar& m, const void* bar, int owner) {
  ++m.phase;
  m.pending = m.count;
  m.tx = 0;
  member_wake(owner, bar);
}

void check_tx_range(PtxState& s, const Mbar& m, const void* bar, int t) {
  if (m.tx > 0xFFFFF || m.tx < -0xFFFFF)
    fail("mbarrier", "transaction count out of range", t, "the tx-count of the mbarrier at %s is %" PRId64
         " bytes, outside [-(2^20 - 1), 2^20 - 1] (PTX ISA)", bar_name(s, bar).c_str(), m.tx);
}

/* bytes > 0: a copy's complete_tx; 0: the last arrival found more bytes landed than announced. */
[[noreturn]] void report_excess(PtxState& s, const Mbar& m, const void* bar, int t, uint32_t bytes) {
  char how[96];
  if (bytes) std::snprintf(how, sizeof how, "received complete_tx of %u bytes", bytes);
  else std::snprintf(how, sizeof how, "got its last arrival after the copies had landed");
  fail("mbarrier", "expect_tx mismatch: more bytes completed than the phase expected", t,
       "the mbarrier at %s (phase %u, all %u arrivals done) %s, %" PRId64
       " bytes more than its expect_tx announced; the phase would complete early and the rest count into the next "
       "one. Make arrive.expect_tx announce exactly the bytes of the copies that complete on this phase.",
       bar_name(s, bar).c_str(), m.phase, m.count, how, -m.tx);
}

} // namespace

Sm90State& st_of(PtxState& s) {
  if (!s.sm90) s.sm90 = new Sm90State();
  return *s.sm90;
}
Sm90State& st() { return st_of(ptx::state()); }

uint64_t next_rand() {
  Sm90State& S = st();
  S.rng += 0x9e3779b97f4a7c15ull;
  return mix(S.rng);
}

Mbar* find_bar_in(Sm90State& S, const void* bar) {
  auto it = S.bars.find((uintptr_t)bar);
  return it == S.bars.end() ? nullptr : &it->second;
}
Mbar* find_bar(const void* bar) { return find_bar_in(st(), bar); }

std::string bar_name(PtxState& s, const void* bar) { return ptx::describe(s, bar, 8); }

void complete_tx(PtxState& s, void* bar, uint32_t bytes, int thread) {
  Mbar* m = find_bar(bar);
  if (!m) fail("mbarrier", "bulk copy completed on an mbarrier that is no longer initialized", thread, "%s",
               bar_name(s, bar).c_str());
  m->tx -= bytes;
  check_tx_range(s, *m, bar, thread);
  if (m->pending == 0) {
    if (m->tx < 0) report_excess(s, *m, bar, thread, bytes);
    if (m->tx == 0) complete_phase(*m, bar, cluster_rank());
  }
}

void land_bulk(PtxState& s, size_t i) {
  Sm90State& S = st();
  const Bulk b = S.bulks[i];
  S.bulks.erase(S.bulks.begin() + (long)i);
  --s.bulk_inflight;
  tma_fill(b);
  complete_tx(s, b.bar, b.bytes, b.thread);
}

/* One of the bulk copies and cp.async arrivals in flight, at random; false when none is. */
static bool land_one(PtxState& s) {
  Sm90State& S = st_of(s);
  const size_t n = S.bulks.size() + S.cparrives.size();
  if (!n) return false;
  const size_t i = (size_t)(next_rand() % n);
  if (i < S.bulks.size()) land_bulk(s, i);
  else land_cparrive(s, i - S.bulks.size());
  return true;
}

void maybe_land(PtxState& s, double p) {
  Sm90State& S = st();
  if (S.bulks.empty() && S.cparrives.empty()) return;
  if ((double)(next_rand() >> 11) * 0x1.0p-53 >= p) return;
  land_one(s);
}

void check_bulk(PtxState& s, int thread, const unsigned char* p, int bytes, bool write, const char* op) {
  for (const Bulk& b : st_of(s).bulks)
    if (p < b.dst + b.bytes && b.dst < p + bytes) {
      report_header("cp.async.bulk", write ? "write of shared bytes a bulk tensor copy (TMA) has not landed yet"
                                           : "read of shared bytes a bulk tensor copy (TMA) has not landed yet");
      std::fprintf(stderr, "=========   %s %s %s (%s)\n", ptx::thread_name(thread).c_str(), write ? "writes" : "reads",
                   ptx::describe(s, p, bytes).c_str(), op);
      const std::string who = b.rank == cluster_rank() ? std::string() : " of cluster rank " + std::to_string(b.rank);
      std::fprintf(stderr, "=========   %s%s issued cp.async.bulk.tensor to %s (the box at {%d, %d}), completing on the "
                           "mbarrier at %s in its phase %u\n",
                   ptx::thread_name(b.thread).c_str(), who.c_str(), ptx::describe(s, b.dst, (int)b.bytes).c_str(), b.c0,
                   b.c1, bar_name(s, b.bar).c_str(), b.phase);
      std::fprintf(stderr, "=========   the bytes are only there once that phase completed: wait on it with "
                           "mbarrier.try_wait.parity %u first (a wrong parity returns at once)\n", b.phase & 1);
      report_die();
    }
}

} // namespace sm90

using namespace sm90;

/* ---- hooks ---- */

void sm90_on_activate(PtxState& s) {
  Sm90State& S = st_of(s);
  S.bars.clear();
  S.bulks.clear();
  S.cparrives.clear();
  S.any_wgmma = false;
  const int n = block_threads();
  S.threads.assign((size_t)n, WgThread{});
  /* Seeded per block from the launch seed: a seed reproduces where the copies land. */
  const uint3 b = tls_coords ? tls_coords->blockIdx : make_uint3(0, 0, 0);
  S.rng = fh_emu_get_seed() ^ mix(((uint64_t)b.z << 42) ^ ((uint64_t)b.y << 21) ^ b.x);
}

void sm90_check_bulk_access(PtxState& s, int thread, const unsigned char* p, int bytes, bool write, uint8_t kind) {
  check_bulk(s, thread, p, bytes, write, ptx::kind_name(kind));
}

bool ptx_async_progress(PtxState& s) { return land_one(s); }

void ptx_describe_sleepers(PtxState& s, const void* obj, const char* threads) {
  Mbar* m = find_bar_in(st_of(s), obj);
  if (!m) return;
  std::fprintf(stderr, "=========   threads %s wait in mbarrier.try_wait.parity %u on the mbarrier at %s\n", threads,
               (m->phase & 1), bar_name(s, obj).c_str());
  std::fprintf(stderr, "=========   its current phase (%u completed so far) still misses %u of %u arrivals and %" PRId64
                       " transaction bytes (expect_tx), and no thread or copy in flight can provide them\n",
               m->phase, m->pending, m->count, m->tx);
  if (m->pending == 0 && m->tx > 0)
    std::fprintf(stderr, "=========   all arrivals are in: expect_tx announced %" PRId64 " bytes more than the copies "
                         "completing on this phase deliver (expect_tx mismatch)\n", m->tx);
  else
    std::fprintf(stderr, "=========   a missing arrive, or a wait for the wrong parity (phase parity flips each "
                         "completion; the first wait is for parity 0)\n");
}

void sm90_on_block_end(PtxState& s) {
  Sm90State& S = st_of(s);
  if (!S.bulks.empty()) {
    const Bulk& b = S.bulks.front();
    fail("cp.async.bulk", "bulk tensor copies still in flight when the block finished", -1,
         "%zu copies, the first issued by %s to %s; every copy must complete on its mbarrier, and someone must wait "
         "for that phase, before the block ends", S.bulks.size(), ptx::thread_name(b.thread).c_str(),
         ptx::describe(s, b.dst, (int)b.bytes).c_str());
  }
  if (!S.cparrives.empty()) {
    const CpArrive& c = S.cparrives.front();
    fail("mbarrier", "cp.async.mbarrier.arrive still pending when the block finished", c.thread,
         "its arrival on the mbarrier at %s (phase %u) waits for %zu cp.async copies; someone must wait for that "
         "phase before the block ends", bar_name(s, c.bar).c_str(), c.phase, c.copies.size());
  }
  for (size_t t = 0; t < S.threads.size(); ++t)
    if (!S.threads[t].ops.empty()) {
      const WgOp& o = S.threads[t].ops.front();
      fail("wgmma", "wgmma.mma_async still in flight when the thread exited", (int)t,
           "%zu mma_async not retired, the first (m64n%dk16) %s; wgmma.wait_group must retire every group before "
           "its accumulators are used or the thread ends",
           S.threads[t].ops.size(), o.n,
           o.group < 0 ? "never committed (wgmma.commit_group)" : ("in commit group " + std::to_string(o.group)).c_str());
    }
}

/* ---- the twins ---- */

uint32_t sm90_smem_offset(const void* p) {
  PtxState& s = ptx::state();
  const int t = running_thread().linear;
  const ptx::Place pl = ptx::locate(s, p, 1, "shared address", t);
  if (!pl.dyn)
    fail("ptx", "operand not in dynamic shared memory", t,
         "%p is a __shared__ variable; the emulator's shared window for TMA, mbarrier descriptors and wgmma is the "
         "block's dynamic shared memory (docs/hopper.md)", p);
  return (uint32_t)pl.offset;
}

void sm90_mbar_init(void* bar, uint32_t count) {
  PtxState& s = ptx::state();
  const int t = running_thread().linear;
  ptx::check_aligned(bar, 8, "mbarrier.init", "mbarrier", t);
  ptx::locate(s, bar, 8, "mbarrier.init", t);
  if (count < 1 || count > 0xFFFFF)
    fail("mbarrier", "invalid mbarrier.init count", t, "count %u is outside [1, 2^20 - 1]", count);
  Mbar m;
  m.count = m.pending = count;
  m.init_thread = t;
  st().bars[(uintptr_t)bar] = m;
  std::memset(bar, 0, 8); /* the object's bytes: opaque, but no longer NaN */
}

/* mbarrier.inval: the object stops being an mbarrier (its bytes may be reused). A phase with
 * arrivals or transaction bytes outstanding is a report: the hardware would lose them. */
void sm90_mbar_inval(void* bar) {
  PtxState& s = ptx::state();
  const int t = running_thread().linear;
  Mbar& m = get_bar(s, bar, "mbarrier.inval", t);
  if (m.pending != m.count || m.tx != 0)
    fail("mbarrier", "mbarrier.inval with a phase in progress", t,
         "the mbarrier at %s still misses %u of %u arrivals and %" PRId64 " transaction bytes of phase %u",
         bar_name(s, bar).c_str(), m.pending, m.count, m.tx, m.phase);
  st().bars.erase((uintptr_t)bar);
}

namespace {
/* One arrival (after adding expect_tx bytes) by thread t on the mbarrier at bar, which belongs to
 * the CTA of cluster rank `owner`, whose twin state is s. */
uint64_t arrive_on(PtxState& s, void* bar, uint32_t expect_tx, int t, int owner, const char* op) {
  Mbar& m = get_bar(s, bar, op, t);
  if (m.pending == 0)
    fail("mbarrier", "arrival beyond the expected count", t,
         "%s on the mbarrier at %s: all %u arrivals of its current phase (%u) are in and it waits only for %" PRId64
         " transaction bytes; another arrival (a producer that did not wait for the stage to be released?) would "
         "underflow the count", op, bar_name(s, bar).c_str(), m.count, m.phase, m.tx);
  const uint64_t token = m.phase;
  m.tx += expect_tx;
  check_tx_range(s, m, bar, t);
  --m.pending;
  if (m.pending == 0) {
    if (m.tx < 0) report_excess(s, m, bar, t, 0);
    if (m.tx == 0) complete_phase(m, bar, owner);
  }
  return token;
}
} // namespace

uint64_t sm90_mbar_arrive(void* bar, uint32_t expect_tx) {
  PtxState& s = ptx::state();
  const int t = running_thread().linear;
  const uint64_t token = arrive_on(s, bar, expect_tx, t, cluster_rank(),
                                   expect_tx ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive");
  maybe_yield();
  return token;
}

namespace sm90 {
void land_cparrive(PtxState& s, size_t i) {
  Sm90State& S = st_of(s);
  const CpArrive c = S.cparrives[i];
  S.cparrives.erase(S.cparrives.begin() + (long)i);
  std::vector<int>& pend = s.threads[(size_t)c.thread].pending;
  for (const auto& cp : c.copies)
    for (size_t k = 0; k < pend.size(); ++k)
      if (pend[k] == cp.first && s.copies[(size_t)cp.first].dst == cp.second) {
        ptx::land_copy(s, cp.first);
        pend.erase(pend.begin() + (long)k);
        break;
      }
  arrive_on(s, c.bar, 0, c.thread, cluster_rank(), "cp.async.mbarrier.arrive.noinc (when its copies landed)");
}
} // namespace sm90

/* cp.async.mbarrier.arrive.noinc.shared::cta.b64 (PTX ISA, "cp.async.mbarrier.arrive"): an
 * arrival on the mbarrier once every cp.async this thread issued before it has completed; .noinc:
 * the barrier's init count must include it. The copies land, and the arrival happens, at a random
 * later point while someone waits (or when every thread sleeps), as the bulk copies do. */
void sm90_cp_async_mbar_arrive(void* bar) {
  PtxState& s = ptx::state();
  const int t = running_thread().linear;
  const Mbar& m = get_bar(s, bar, "cp.async.mbarrier.arrive.noinc", t);
  CpArrive c{bar, t, m.phase, {}};
  for (int id : s.threads[(size_t)t].pending) c.copies.emplace_back(id, s.copies[(size_t)id].dst);
  st().cparrives.push_back(std::move(c));
  maybe_yield();
}

bool sm90_mbar_try_wait(void* bar, uint32_t parity) {
  PtxState& s = ptx::state();
  const int t = running_thread().linear;
  Mbar* m = &get_bar(s, bar, "mbarrier.try_wait.parity", t);
  if ((m->phase & 1) != (parity & 1)) return true;
  WgThread& me = st().threads[(size_t)t];
  if (me.false_bar != bar || me.false_phase != m->phase) {
    /* The hardware may give up after a time limit: the caller must loop. Once per wait. */
    me.false_bar = bar;
    me.false_phase = m->phase;
    fiber_yield();
    return false;
  }
  /* Copies land at random points while someone really waits (the retry of a try_wait), and at
   * the latest when every thread sleeps (emu_core.cpp). Never earlier: a consumer that does not
   * wait, waits on the wrong parity, or does not retry, always meets the in-flight report. */
  maybe_land(s, 0.5);
  while ((m->phase & 1) == (parity & 1)) {
    async_sleep(bar);
    m = find_bar(bar);
    if (!m) fail("mbarrier", "mbarrier re-initialized while a thread waits on it", t, "%s", bar_name(s, bar).c_str());
  }
  return true;
}

void sm90_fence_proxy_async() {
  /* Generic-to-async ordering: what the executing thread has seen so far may be read through the
   * async proxy (emu_ptx_state.h, "Proxies"). */
  ptx::fence_proxy(ptx::state(), running_thread().linear);
}

void sm90_setmaxnreg(int n, bool inc) {
  ptx::state();
  const int t = running_thread().linear;
  if (n < 24 || n > 256 || n % 8)
    fail("ptx", "invalid setmaxnreg count", t, "setmaxnreg.%s %d: N must be in [24, 256] and a multiple of 8",
         inc ? "inc" : "dec", n);
  if (block_threads() % 128)
    fail("ptx", "setmaxnreg outside a full warpgroup", t, "the block has %d threads, not a multiple of 128",
         block_threads());
}

/* Clusters (emu_cluster.cpp runs a cluster's CTAs together). A launch without the cluster
 * attribute is a cluster of one CTA. mapa maps addresses in the dynamic shared memory only: a
 * __shared__ variable is thread_local in the emulator, so another CTA's copy has no address here. */
uint32_t sm90_cluster_ctarank() { return (uint32_t)cluster_rank(); }
uint32_t sm90_cluster_nctarank() { return (uint32_t)cluster_size(); }

namespace sm90 {
/* Checks that `rank` names a CTA of the cluster; returns p's offset in the dynamic shared memory. */
uint32_t remote_offset(const void* p, uint32_t rank, const char* op, int t) {
  PtxState& s = ptx::state();
  const ptx::Place pl = ptx::locate(s, p, 1, op, t);
  if ((int)rank >= cluster_size())
    fail("ptx", "mapa to a CTA outside the cluster", t, "%s: rank %u, but the cluster has %d CTA%s (ranks 0-%d)", op, rank,
         cluster_size(), cluster_size() > 1 ? "s" : "", cluster_size() - 1);
  if (!pl.dyn)
    fail("ptx", "mapa of a __shared__ variable", t, "%s of %p: the emulator maps the dynamic shared memory only "
         "(docs/hopper.md \"Clusters in the emulator\")", op, p);
  return (uint32_t)pl.offset;
}

/* The twin state of the CTA of `rank`, which a remote operation reaches: it must still run and
 * have used a twin (initialized an mbarrier, for instance). */
PtxState& remote_state(uint32_t rank, const char* op, int t) {
  PtxState* r = member_ptx((int)rank);
  if (!r) {
    const uint3 b = member_block((int)rank);
    if (member_exited((int)rank))
      fail("ptx", "remote access to a CTA that has exited", t, "%s reaches cluster rank %u (block (%u,%u,%u)), whose "
           "threads have all exited: its shared memory is gone. Keep every CTA of the cluster alive (barrier.cluster) "
           "until the others are done with it", op, rank, b.x, b.y, b.z);
    fail("mbarrier", "mbarrier used before mbarrier.init", t, "%s reaches cluster rank %u (block (%u,%u,%u)), which "
         "has not initialized any mbarrier yet: initialize, fence.mbarrier_init, and barrier.cluster before another "
         "CTA uses them", op, rank, b.x, b.y, b.z);
  }
  return *r;
}
} // namespace sm90

void* sm90_mapa(void* p, uint32_t rank) {
  const int t = running_thread().linear;
  const uint32_t off = remote_offset(p, rank, "mapa", t);
  return member_smem((int)rank) + off;
}

void sm90_mbar_arrive_cluster(void* bar, uint32_t rank) {
  const int t = running_thread().linear;
  const char* op = "mbarrier.arrive.shared::cluster";
  ptx::check_aligned(bar, 8, op, "mbarrier", t);
  const uint32_t off = remote_offset(bar, rank, op, t);
  PtxState& r = remote_state(rank, op, t);
  arrive_on(r, member_smem((int)rank) + off, 0, t, (int)rank, op);
  maybe_yield();
}

} // namespace fh_emu
