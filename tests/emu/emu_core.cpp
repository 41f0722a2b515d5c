/* emu_core.cpp: the SIMT emulator's execution engine: fibers, the block scheduler, warp
 * collectives, synccheck and the launch.
 *
 * Model. A launch hands its blocks, in an order shuffled by a per-launch seed, to a few OS worker
 * threads. A worker runs one block at a time: every CUDA thread of the block is a fiber
 * (emu_fiber.h) on a stack the worker allocated once. The worker's scheduler resumes runnable fibers round-
 * robin; a fiber runs until it blocks in __syncthreads, in a warp collective, or exits. Barriers
 * and collectives release when the last participant arrives (that fiber goes on without a
 * switch). When no fiber is runnable but some have not exited, the block is stuck: synccheck
 * prints what every thread waits for and aborts.
 *
 * AddressSanitizer must be told about every stack switch, or it reports false stack errors.
 * The annotation protocol is: start_switch_fiber before the switch (with the target stack),
 * finish_switch_fiber right after control comes back. */
#include "emu_sched.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FH_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FH_EMU_ASAN 1
#endif
#endif
#ifdef FH_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace fh_emu {

thread_local const ThreadCoords* tls_coords = nullptr;
const ThreadCoords& coords() { return *tls_coords; }

namespace sched {

inline void asan_start(void** fake_save, const void* bottom, size_t size) {
#ifdef FH_EMU_ASAN
  __sanitizer_start_switch_fiber(fake_save, bottom, size);
#else
  (void)fake_save, (void)bottom, (void)size;
#endif
}
inline void asan_finish(void* fake_save, const void** bottom_old, size_t* size_old) {
#ifdef FH_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_save, bottom_old, size_old);
#else
  (void)fake_save, (void)bottom_old, (void)size_old;
#endif
}

thread_local Worker* tls_worker = nullptr;

std::mutex g_launch_mutex; /* one launch at a time: workers and their stacks are shared */
std::vector<std::unique_ptr<Worker>> g_workers;
std::mutex g_counter_mutex;
fh_emu_counters_t g_last, g_total;
std::atomic<uint64_t> g_seed{0};
std::atomic<uint64_t> g_launch_index{0};
std::atomic<int> g_nworkers{0};
std::atomic<double> g_yield{0.125};
std::once_flag g_env_once;

void read_env() {
  std::call_once(g_env_once, [] {
    const char* s = std::getenv("FH_EMU_SEED");
    if (s) g_seed = std::strtoull(s, nullptr, 0);
    else g_seed = 0x9e3779b97f4a7c15ull;
    const char* w = std::getenv("FH_EMU_WORKERS");
    int n = w ? std::atoi(w) : 2;
    g_nworkers = std::min(64, std::max(1, n));
    const char* y = std::getenv("FH_EMU_YIELD");
    if (y) g_yield = std::min(1.0, std::max(0.0, std::atof(y)));
  });
}

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

size_t stack_bytes_from_env() {
  const char* s = std::getenv("FH_EMU_STACK_KIB");
  long kib = s ? std::atol(s) : 256;
  if (kib < 32) kib = 32;
  return (size_t)kib * 1024;
}

Worker& worker() { return *tls_worker; }
Thread& current() { return *worker().current; }

/* ---- synccheck reports ---- */

/* "0-15,17,20-23": compact lists of thread or lane numbers. */
std::string ranges(const std::vector<int>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += std::to_string(ids[i]);
    if (j > i) out += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return out.empty() ? "none" : out;
}

std::string lanes_of(unsigned mask) {
  std::vector<int> v;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) v.push_back(l);
  return ranges(v);
}

void print_header(const char* tool, const char* what) {
  /* Every report ends in abort(): the first worker to report keeps the lock, so two blocks
   * failing at once on two workers do not interleave their lines. */
  static std::mutex report_mutex;
  report_mutex.lock();
  Worker& w = worker();
  const LaunchState& L = *w.launch;
  std::fprintf(stderr,
               "========= fh_emu %s: %s\n"
               "=========   kernel %s, grid (%u,%u,%u), block (%u,%u,%u), dynamic smem %zu B\n"
               "=========   in block (%u,%u,%u)\n",
               tool, what, L.cfg.name, L.cfg.grid.x, L.cfg.grid.y, L.cfg.grid.z, L.cfg.block.x, L.cfg.block.y,
               L.cfg.block.z, L.cfg.smem, w.block.x, w.block.y, w.block.z);
}

void print_block_header(const char* what) { print_header("synccheck", what); }

[[noreturn]] void die() {
  std::fprintf(stderr, "=========   (threads are numbered x + y*blockDim.x + z*blockDim.x*blockDim.y; "
                       "lane = thread %% 32, warp = thread / 32)\n");
  std::fflush(stderr);
  std::abort();
}

/* The waits of w's threads, for a deadlock report. */
void describe_waits(Worker& w) {
  std::vector<int> barrier, exited, asleep;
  for (int i = 0; i < w.nthreads; ++i) {
    if (w.threads[i].state == State::AtBarrier) barrier.push_back(i);
    if (w.threads[i].state == State::Exited) exited.push_back(i);
    if (w.threads[i].state == State::Asleep) asleep.push_back(i);
  }
  /* Sleepers grouped by the object they wait on, one line each (emu_sm90.cpp words it). */
  std::vector<const void*> objs;
  for (int i : asleep)
    if (std::find(objs.begin(), objs.end(), w.threads[i].sleep_obj) == objs.end()) objs.push_back(w.threads[i].sleep_obj);
  for (const void* o : objs) {
    std::vector<int> ids;
    for (int i : asleep)
      if (w.threads[i].sleep_obj == o) ids.push_back(i);
    const ClusterBar& cb = cluster_bar(w);
    if (o == &cb)
      std::fprintf(stderr, "=========   threads %s wait in barrier.cluster.wait (phase %u): %u arrivals so far; every "
                           "thread of every CTA of the cluster that has not exited must arrive\n",
                   ranges(ids).c_str(), cb.phase, cb.arrived);
    else if (const NamedBar* nb = named_bar_of(w, o))
      describe_named_bar(w, *nb, ranges(ids).c_str());
    else if (w.ptx_active) ptx_describe_sleepers(*w.ptx, o, ranges(ids).c_str());
  }
  std::fprintf(stderr, "=========   waiting at __syncthreads: threads %s\n", ranges(barrier).c_str());
  std::fprintf(stderr, "=========   exited: threads %s\n", ranges(exited).c_str());
  for (size_t wi = 0; wi < w.warps.size(); ++wi)
    for (const Episode& e : w.warps[wi].pending)
      std::fprintf(stderr, "=========   warp %zu: lanes %s wait in %s(mask 0x%08x); lanes %s of the mask never arrive\n",
                   wi, lanes_of(e.arrived).c_str(), e.name, e.mask, lanes_of(e.mask & ~e.arrived).c_str());
}

const char* stuck_what(Worker& w) {
  bool barrier = false, asleep = false, cluster = false, named = false;
  for (int i = 0; i < w.nthreads; ++i) {
    barrier |= w.threads[i].state == State::AtBarrier;
    asleep |= w.threads[i].state == State::Asleep;
    cluster |= w.threads[i].state == State::Asleep && w.threads[i].sleep_obj == &cluster_bar(w);
    named |= w.threads[i].state == State::Asleep && named_bar_of(w, w.threads[i].sleep_obj);
  }
  return cluster    ? "barrier.cluster wait can never complete (deadlock)"
         : named    ? "named barrier (bar.sync with a thread count) can never complete (deadlock)"
         : asleep   ? "mbarrier wait can never complete (deadlock)"
         : !barrier ? "warp collective can never complete (deadlock)"
                    : "__syncthreads not reached by every live thread of the block";
}

/* Nothing can run: describe every waiting thread and abort. */
[[noreturn]] void report_stuck_block() {
  Worker& w = worker();
  print_block_header(stuck_what(w));
  describe_waits(w);
  die();
}

/* ---- fibers ---- */

void switch_to(Worker& w, Thread& t) {
  w.current = &t;
  tls_coords = &t.coords;
  asan_start(&w.sched_fake, t.stack, w.stack_bytes);
  fiber_switch(w.sched_ctx, t.ctx);
  asan_finish(w.sched_fake, nullptr, nullptr);
  w.current = nullptr;
  tls_coords = nullptr;
}

/* Back to the scheduler until this thread is runnable again. */
void yield_thread() {
  Worker& w = worker();
  Thread& t = current();
  asan_start(&t.fake_stack, w.sched_bottom, w.sched_size);
  fiber_switch(t.ctx, w.sched_ctx);
  asan_finish(t.fake_stack, &w.sched_bottom, &w.sched_size);
}

void thread_exit() {
  Worker& w = worker();
  Thread& t = current();
  Warp& wp = w.warps[t.warp];
  for (const Episode& e : wp.pending)
    if (e.mask >> t.lane & 1) {
      print_block_header("thread exited while other lanes wait for it in a warp collective");
      std::fprintf(stderr, "=========   thread %d (warp %d, lane %d) exited; lanes %s wait in %s(mask 0x%08x)\n", t.linear,
                   t.warp, t.lane, lanes_of(e.arrived).c_str(), e.name, e.mask);
      die();
    }
  t.state = State::Exited;
  wp.exited |= 1u << t.lane;
  --w.live;
  /* An exited thread no longer takes part in barrier.cluster (arrived or not). */
  ClusterBar& cb = cluster_bar(w);
  if (t.cbar_pending) --cb.arrived, t.cbar_pending = false;
  if (cb.arrived) cluster_bar_check(w);
}

} // namespace sched
} // namespace fh_emu

/* Where every fiber starts (called from fh_emu_fiber_start or makecontext); never returns. */
extern "C" __attribute__((visibility("hidden"))) void fh_emu_fiber_entry() {
  using namespace fh_emu;
  using namespace fh_emu::sched;
  Worker& w = worker();
  asan_finish(nullptr, &w.sched_bottom, &w.sched_size);
  w.launch->body();
  thread_exit();
  /* A dying fiber passes a NULL fake-stack slot so ASan frees its fake stack. */
  asan_start(nullptr, w.sched_bottom, w.sched_size);
  FiberContext dead;
  fiber_switch(dead, w.sched_ctx);
  __builtin_unreachable();
}

namespace fh_emu {
namespace sched {

/* Prepares block `bi` (its linear index `linear_block`) on w: threads, warps, fresh shared memory. */
void setup_block(Worker& w, const LaunchState& L, uint3 bi, uint64_t linear_block) {
  const dim3 g = L.cfg.grid, b = L.cfg.block;
  w.launch = &L;
  w.block = bi;
  const int n = (int)(b.x * b.y * b.z);
  w.nthreads = w.live = n;
  w.at_barrier = w.barrier_pred = 0;
  w.ptx_active = false;
  w.block_done = false;
  w.solo_bar = ClusterBar{};
  for (NamedBar& nb : w.nbar) nb = NamedBar{};
  /* Per block, not per worker: which worker runs a block must not change its schedule. */
  w.yield_rng = w.launch_seed ^ (linear_block * 0xbf58476d1ce4e5b9ull);
  w.warps.assign((size_t)(n + 31) / 32, Warp{0, 0, {}});
  for (int i = 0; i < n; ++i) w.warps[i / 32].exists |= 1u << (i % 32);
  /* Uninitialized shared memory reads as NaN, like fresh global memory. */
  if (L.cfg.smem) std::memset(w.dyn_smem, 0xff, L.cfg.smem);
  for (int i = 0; i < n; ++i) {
    Thread& t = w.threads[i];
    t.coords.threadIdx = make_uint3((unsigned)(i % b.x), (unsigned)(i / b.x % b.y), (unsigned)(i / (b.x * b.y)));
    t.coords.blockIdx = w.block;
    t.coords.blockDim = b;
    t.coords.gridDim = g;
    t.state = State::Runnable;
    t.linear = i;
    t.lane = i % 32;
    t.warp = i / 32;
    t.fake_stack = nullptr;
    t.sleep_obj = nullptr;
    t.cbar_pending = false;
    t.cbar_phase = 0;
    t.nbar_in = 0;
    t.stack = w.arena + (size_t)i * w.stack_bytes;
#ifdef FH_EMU_ASAN
    /* The frame a fiber dies in (fh_emu_fiber_entry, never returned from) leaves its redzones
     * near the top of the stack; the next fiber's first frame goes there. */
    __asan_unpoison_memory_region(t.stack + w.stack_bytes - 16384, 16384);
#endif
    fiber_prepare(t.ctx, t.stack, w.stack_bytes);
  }
}

/* One scheduling pass: every runnable fiber runs until it blocks. False when none was runnable. */
bool run_pass(Worker& w) {
  bool ran = false;
  for (int i = 0; i < w.nthreads; ++i)
    if (w.threads[i].state == State::Runnable) {
      switch_to(w, w.threads[i]);
      ran = true;
    }
  return ran;
}

void finish_block(Worker& w) {
  if (w.ptx_active) ptx_on_block_end(*w.ptx); /* copies never waited for are reported here */
  w.block_done = true;
  w.counters.blocks += 1;
  w.counters.threads += (uint64_t)w.nthreads;
}

uint3 block_of(const dim3& g, uint64_t linear_block) {
  return make_uint3((unsigned)(linear_block % g.x), (unsigned)(linear_block / g.x % g.y),
                    (unsigned)(linear_block / ((uint64_t)g.x * g.y)));
}

void run_block(Worker& w, const LaunchState& L, uint64_t linear_block) {
  setup_block(w, L, block_of(L.cfg.grid, linear_block), linear_block);
  while (w.live > 0) {
    const bool ran = run_pass(w);
    /* Nothing runnable: an async copy in flight may still land and wake a sleeper. */
    if (!ran && w.live > 0 && !(w.ptx_active && ptx_async_progress(*w.ptx))) report_stuck_block();
  }
  finish_block(w);
}

/* Per launch, before the first block: stacks, counters, the dynamic shared memory. */
void worker_begin(Worker& w, const LaunchState& L, uint64_t launch_seed) {
  tls_worker = &w;
  w.launch_seed = launch_seed;
  const size_t n = (size_t)L.cfg.block.x * L.cfg.block.y * L.cfg.block.z;
  w.ensure_stacks(n, stack_bytes_from_env());
  if (w.threads.size() < n) w.threads.resize(n);
  std::memset(&w.counters, 0, sizeof w.counters);
  /* posix_memalign keeps the exact size, so ASan flags an access one byte past the launch's
   * dynamic shared memory. */
  w.dyn_smem = nullptr;
  /* 1024-byte aligned: the repeat of the 128-byte swizzle pattern, which Hopper kernels align
   * their TMA / wgmma stages to (docs/hopper.md). */
  if (posix_memalign(&w.dyn_smem, 1024, L.cfg.smem ? L.cfg.smem : 1) != 0)
    report_and_abort("internal", "cannot allocate %zu bytes of dynamic shared memory", L.cfg.smem);
}

void worker_end(Worker& w) {
  std::free(w.dyn_smem);
  w.dyn_smem = nullptr;
  w.launch = nullptr;
  w.group = nullptr;
  w.crank = 0;
  tls_worker = nullptr;
}

void worker_loop(int wid, const LaunchState& L, const std::vector<uint64_t>& order, std::atomic<size_t>& next,
                 uint64_t launch_seed) {
  Worker& w = *g_workers[wid];
  worker_begin(w, L, launch_seed);
  for (size_t i; (i = next.fetch_add(1)) < order.size();) run_block(w, L, order[i]);
  worker_end(w);
}

void add_counters(fh_emu_counters_t& to, const fh_emu_counters_t& c) {
  to.launches += c.launches;
  to.blocks += c.blocks;
  to.threads += c.threads;
  to.barriers += c.barriers;
  to.warp_collectives += c.warp_collectives;
  to.shuffles += c.shuffles;
  to.atomics += c.atomics;
  to.mma_ops += c.mma_ops;
  to.mma_flops += c.mma_flops;
  to.ldmatrix_ops += c.ldmatrix_ops;
  to.cp_async_ops += c.cp_async_ops;
  to.bytes_g2s += c.bytes_g2s;
  to.global_requests += c.global_requests;
  to.global_sectors += c.global_sectors;
  to.smem_requests += c.smem_requests;
  to.smem_wavefronts += c.smem_wavefronts;
  to.bank_conflict_replays += c.bank_conflict_replays;
  to.bank_conflict_max_ways = std::max(to.bank_conflict_max_ways, c.bank_conflict_max_ways);
  to.mufu_ops += c.mufu_ops;
  to.bytes_g2s_watched += c.bytes_g2s_watched;
  to.named_barriers += c.named_barriers;
}

} // namespace sched

using namespace sched;

/* ---- called from device code ---- */

LaneSlot& lane_slot() { return current().slot; }
int lane_id() { return current().lane; }

void* dynamic_smem() { return worker().dyn_smem; }
size_t dynamic_smem_bytes() { return worker().launch->cfg.smem; }
RunningThread running_thread() {
  const Thread& t = current();
  return RunningThread{t.linear, t.lane, t.warp};
}
int block_threads() { return worker().nthreads; }
bool in_kernel() { return tls_worker && tls_worker->current; }
unsigned warp_live_mask(int warp) {
  const Warp& wp = worker().warps[warp];
  return wp.exists & ~wp.exited;
}
PtxState*& worker_ptx_slot() { return worker().ptx; }
bool& worker_ptx_active() { return worker().ptx_active; }
fh_emu_counters_t& worker_counters() { return worker().counters; }
void report_header(const char* tool, const char* what) { print_header(tool, what); }
void report_die() { die(); }

/* A random preemption point: the fiber goes back to the scheduler still runnable and the others
 * of the block run first. Cooperative scheduling alone runs a thread until it blocks, which
 * hides interleavings (a reader that always runs after the writer); the twins call this at
 * every shared-memory access so that races show in the data too, not only in racecheck. */
void maybe_yield() {
  Worker& w = worker();
  const double p = g_yield.load(std::memory_order_relaxed);
  if (p <= 0.0) return;
  if ((double)(splitmix64(w.yield_rng) >> 11) * 0x1.0p-53 >= p) return;
  yield_thread();
}
void async_sleep(const void* obj) {
  Thread& t = current();
  t.state = State::Asleep;
  t.sleep_obj = obj;
  yield_thread();
}
void async_wake(const void* obj) {
  Worker& w = worker();
  for (int i = 0; i < w.nthreads; ++i)
    if (w.threads[i].state == State::Asleep && w.threads[i].sleep_obj == obj) {
      w.threads[i].state = State::Runnable;
      w.threads[i].sleep_obj = nullptr;
    }
}
void fiber_yield() { yield_thread(); }

void note_atomic() { ++worker().counters.atomics; }
void note_mma(uint64_t flops) {
  ++worker().counters.mma_ops;
  worker().counters.mma_flops += flops;
}

unsigned active_mask() {
  /* Without a model of divergence, the lanes that have not exited are the best answer. */
  Worker& w = worker();
  const Warp& wp = w.warps[current().warp];
  return wp.exists & ~wp.exited;
}

int block_barrier(int pred) {
  Worker& w = worker();
  Thread& t = current();
  t.state = State::AtBarrier;
  w.barrier_pred += pred;
  if (++w.at_barrier == w.live && w.live == w.nthreads) {
    /* Last arrival releases everyone. The count is published before any thread can reach the
     * next barrier, and no thread can arrive there before all have read it. */
    w.barrier_result = w.barrier_pred;
    w.barrier_pred = 0;
    w.at_barrier = 0;
    for (int i = 0; i < w.nthreads; ++i) w.threads[i].state = State::Runnable;
    ++w.counters.barriers;
    if (w.ptx_active) ptx_on_barrier(*w.ptx); /* a new barrier interval for racecheck */
  } else {
    yield_thread(); /* if some thread exited, the block gets stuck here and synccheck reports */
  }
  return w.barrier_result;
}

void warp_collective(const char* name, unsigned mask, CompleteFn fn, int kind) {
  Worker& w = worker();
  Thread& t = current();
  Warp& wp = w.warps[t.warp];
  const unsigned me = 1u << t.lane;
  const char* problem = nullptr;
  if (!(mask & me)) problem = "the mask does not name the calling lane";
  else if (mask & ~wp.exists) problem = "the mask names lanes that do not exist in this block";
  else if (mask & wp.exited) problem = "the mask names lanes that have exited";
  else if (kind == 2 && mask != 0xffffffffu) problem = "WMMA needs a full warp";
  else if (kind == 3 && mask != 0xffffffffu) problem = "a .sync.aligned PTX instruction needs the full warp";
  if (problem) {
    print_block_header("invalid warp collective mask");
    std::fprintf(stderr, "=========   thread %d (warp %d, lane %d) called %s(mask 0x%08x): %s (lanes %s)\n", t.linear,
                 t.warp, t.lane, name, mask, problem,
                 lanes_of(mask & ~me & (~wp.exists | wp.exited)).c_str());
    die();
  }
  Episode* ep = nullptr;
  for (Episode& e : wp.pending)
    if (e.mask == mask) ep = &e;
  if (!ep) {
    wp.pending.push_back(Episode{name, fn, mask, 0});
    ep = &wp.pending.back();
  } else if (ep->fn != fn) {
    print_block_header("lanes of one warp collective call different operations (divergence)");
    std::fprintf(stderr, "=========   warp %d: lanes %s wait in %s(mask 0x%08x); thread %d (lane %d) calls %s\n", t.warp,
                 lanes_of(ep->arrived).c_str(), ep->name, mask, t.linear, t.lane, name);
    die();
  }
  ep->arrived |= me;
  t.state = State::InCollective;
  if (ep->arrived == mask) {
    LaneSlot* lanes[32] = {};
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1) lanes[l] = &w.threads[t.warp * 32 + l].slot;
    fn(lanes, mask);
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1) w.threads[t.warp * 32 + l].state = State::Runnable;
    wp.pending.erase(wp.pending.begin() + (ep - wp.pending.data()));
    /* Every collective orders the shared accesses its lanes made before it (racecheck). */
    if (w.ptx_active) ptx_on_warp_sync(*w.ptx, t.warp, mask);
    if (kind < 2) ++w.counters.warp_collectives;
    if (kind == 1) ++w.counters.shuffles;
  } else {
    yield_thread();
  }
}

void report_and_abort(const char* what, const char* fmt, ...) {
  if (tls_worker && tls_worker->current) {
    print_block_header(what);
    std::fprintf(stderr, "=========   thread %d: ", current().linear);
  } else {
    std::fprintf(stderr, "========= fh_emu: %s: ", what);
  }
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  die();
}

/* ---- the launch ---- */

#ifdef FH_EMU_ASAN
/* ASan's report names host frames only; say which CUDA thread was running. */
static void on_sanitizer_death() {
  Worker* w = tls_worker;
  if (!w || !w->current || !w->launch) return;
  const Thread& t = *w->current;
  std::fprintf(stderr, "========= fh_emu: the error above happened in kernel %s, block (%u,%u,%u), thread (%u,%u,%u)\n",
               w->launch->cfg.name, w->block.x, w->block.y, w->block.z, t.coords.threadIdx.x, t.coords.threadIdx.y,
               t.coords.threadIdx.z);
}
#endif

void run_launch(const LaunchState& L) {
  read_env();
#ifdef FH_EMU_ASAN
  static std::once_flag death_once;
  std::call_once(death_once, [] { __sanitizer_set_death_callback(on_sanitizer_death); });
#endif
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const dim3 cd = L.cfg.cluster;
  const int csize = (int)(cd.x * cd.y * cd.z);
  /* Without clusters the unit of scheduling is a block, with them a cluster. */
  const uint64_t nunits = (uint64_t)L.cfg.grid.x * L.cfg.grid.y * L.cfg.grid.z / (uint64_t)csize;
  uint64_t s = g_seed.load() ^ (g_launch_index.fetch_add(1) * 0xd1b54a32d192ed03ull);
  const uint64_t launch_seed = s;
  std::vector<uint64_t> order(nunits);
  for (uint64_t i = 0; i < nunits; ++i) order[i] = i;
  for (uint64_t i = nunits; i > 1; --i) std::swap(order[i - 1], order[splitmix64(s) % i]);
  /* Clusters: groups of csize OS threads, as many groups as the workers allow (at least one). */
  const int ngroups = (int)std::min<uint64_t>((uint64_t)std::max(1, g_nworkers.load() / csize), nunits);
  const int nw = csize > 1 ? ngroups * csize : (int)std::min<uint64_t>((uint64_t)g_nworkers.load(), nunits);
  while ((int)g_workers.size() < nw) g_workers.emplace_back(new Worker());
  std::atomic<size_t> next{0};
  std::vector<std::thread> pool;
  if (csize > 1) {
    std::vector<std::unique_ptr<ClusterGroup>> groups;
    for (int gi = 0; gi < ngroups; ++gi) {
      groups.emplace_back(new ClusterGroup());
      groups.back()->size = csize;
      for (int r = 0; r < csize; ++r) groups.back()->members.push_back(g_workers[(size_t)(gi * csize + r)].get());
    }
    for (int i = 1; i < nw; ++i)
      pool.emplace_back(cluster_worker_loop, i, i % csize, std::ref(*groups[(size_t)(i / csize)]), std::cref(L),
                        std::cref(order), std::ref(next), launch_seed);
    cluster_worker_loop(0, 0, *groups[0], L, order, next, launch_seed);
    for (std::thread& th : pool) th.join();
  } else {
    for (int i = 1; i < nw; ++i)
      pool.emplace_back(worker_loop, i, std::cref(L), std::cref(order), std::ref(next), launch_seed);
    worker_loop(0, L, order, next, launch_seed); /* the launching thread is worker 0 */
    for (std::thread& th : pool) th.join();
  }

  fh_emu_counters_t c;
  std::memset(&c, 0, sizeof c);
  c.launches = 1;
  for (int i = 0; i < nw; ++i) add_counters(c, g_workers[i]->counters);
  std::snprintf(c.kernel, sizeof c.kernel, "%s", L.cfg.name);
  std::lock_guard<std::mutex> lock2(g_counter_mutex);
  g_last = c;
  add_counters(g_total, c);
  std::snprintf(g_total.kernel, sizeof g_total.kernel, "%s", L.cfg.name);
}

std::atomic<uintptr_t> g_watch_lo{0}, g_watch_hi{0};

} // namespace fh_emu

#ifdef FH_EMU_ASM_SWITCH
/* fh_emu_switch(save_sp, new_sp): push the callee-saved state, swap stacks, pop the other's. */
asm(R"(
  .text
  .globl fh_emu_switch
  .hidden fh_emu_switch
  .type fh_emu_switch, @function
fh_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fh_emu_switch, .-fh_emu_switch

  .globl fh_emu_fiber_start
  .hidden fh_emu_fiber_start
  .type fh_emu_fiber_start, @function
fh_emu_fiber_start:
  call fh_emu_fiber_entry
  ud2
  .size fh_emu_fiber_start, .-fh_emu_fiber_start
)");
#endif

long long clock64() {
  return (long long)std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

extern "C" {
fh_emu_counters_t fh_emu_last_counters(void) {
  std::lock_guard<std::mutex> lock(fh_emu::g_counter_mutex);
  return fh_emu::g_last;
}
fh_emu_counters_t fh_emu_total_counters(void) {
  std::lock_guard<std::mutex> lock(fh_emu::g_counter_mutex);
  return fh_emu::g_total;
}
void fh_emu_reset_counters(void) {
  std::lock_guard<std::mutex> lock(fh_emu::g_counter_mutex);
  std::memset(&fh_emu::g_total, 0, sizeof fh_emu::g_total);
  std::memset(&fh_emu::g_last, 0, sizeof fh_emu::g_last);
}
void fh_emu_watch_global(const void* base, uint64_t bytes) {
  const uintptr_t lo = bytes ? (uintptr_t)base : 0;
  fh_emu::g_watch_lo.store(lo);
  fh_emu::g_watch_hi.store(bytes ? lo + (uintptr_t)bytes : 0);
}
void fh_emu_set_seed(uint64_t seed) {
  fh_emu::read_env();
  fh_emu::g_seed = seed;
  fh_emu::g_launch_index = 0;
}
uint64_t fh_emu_get_seed(void) {
  fh_emu::read_env();
  return fh_emu::g_seed.load();
}
void fh_emu_set_workers(int n) {
  fh_emu::read_env();
  fh_emu::g_nworkers = std::min(64, std::max(1, n));
}
int fh_emu_get_workers(void) {
  fh_emu::read_env();
  return fh_emu::g_nworkers.load();
}
void fh_emu_set_yield(double p) {
  fh_emu::read_env();
  fh_emu::g_yield = p < 0.0 ? 0.0 : (p > 1.0 ? 1.0 : p);
}
double fh_emu_get_yield(void) {
  fh_emu::read_env();
  return fh_emu::g_yield.load();
}
}
