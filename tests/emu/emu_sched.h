/* emu_sched.h: the scheduler's state, shared by emu_core.cpp (fibers, blocks, barriers, warp
 * collectives, the launch) and emu_cluster.cpp (clusters of several CTAs); not seen by kernels
 * or twins, which go through emu_internal.h. */
#ifndef FH_EMU_SCHED_H
#define FH_EMU_SCHED_H

#include "emu_fiber.h"
#include "emu_internal.h"

#include <sys/mman.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace fh_emu {
namespace sched {

enum class State { Runnable, AtBarrier, InCollective, Asleep, Exited };

struct Thread {
  ThreadCoords coords;
  FiberContext ctx;
  State state;
  int linear, lane, warp;
  const void* sleep_obj; /* Asleep: the mbarrier waited on (async_sleep) */
  bool cbar_pending;     /* arrived at barrier.cluster, not yet past its wait */
  uint32_t cbar_phase;   /* the cluster barrier's phase at that arrival */
  uint16_t nbar_in;      /* named barriers (bit id) this thread arrived at in their phase in flight */
  LaneSlot slot;
  void* fake_stack;
  char* stack;
};

/* A warp collective in progress: the lanes of `mask` that arrived so far. */
struct Episode {
  const char* name;
  CompleteFn fn;
  unsigned mask;
  unsigned arrived;
};

struct Warp {
  unsigned exists;  /* lanes that exist (a partial last warp has fewer) */
  unsigned exited;
  std::vector<Episode> pending;
};

/* A named barrier (bar.sync / bar.arrive with a thread count, ids 1-15; emu_named_bar.cpp): the
 * phase in flight expects `count` arrivals (0: none yet), the first arrival set the count. */
struct NamedBar {
  int count = 0, arrived = 0, first = -1;
  uint32_t phase = 0;
  int kind = 0;       /* this phase's arrivals: 0 none yet, 1 bar.sync / bar.arrive, 2 bar.red.or */
  int acc = 0;        /* bar.red.or: the OR of this phase's predicates so far */
  int result = 0;     /* bar.red.or: the OR of the last completed phase (read by its waiters) */
};
constexpr int kNamedBars = 16;

/* barrier.cluster: arrivals of the current phase (every non-exited thread of the cluster). */
struct ClusterBar {
  uint32_t phase = 0, arrived = 0;
};

struct Worker;

/* The OS threads that run the CTAs of one cluster together, one CTA each (so that each CTA has
 * its own static __shared__ variables, which are thread_local, its own dynamic shared memory and
 * its own twin state). Only one of them runs at a time: the turn passes round the ranks after
 * every scheduling pass, so remote accesses (distributed shared memory, remote mbarrier arrivals,
 * multicast copies) need no locking and a seed reproduces the interleaving. */
struct ClusterGroup {
  int size = 1;
  std::vector<Worker*> members; /* by cluster rank */
  std::mutex m;
  std::condition_variable cv;
  int sync_count = 0;
  uint64_t sync_gen = 0;
  bool end = false;
  uint64_t cluster = 0; /* linear index of the cluster in flight */
  int turn = 0;
  int idle = 0;         /* consecutive turns in which no member made progress */
  uint64_t rng = 0;     /* per cluster, from the launch seed: how long each turn lasts */
  bool all_done = false;
  ClusterBar bar;
};

struct Worker {
  size_t stack_bytes = 0;
  char* arena = nullptr;
  size_t arena_threads = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  FiberContext sched_ctx;
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  Thread* current = nullptr;
  fh_emu_counters_t counters;
  /* the block in flight */
  const LaunchState* launch = nullptr;
  uint3 block;
  int nthreads = 0, live = 0, at_barrier = 0, barrier_pred = 0, barrier_result = 0;
  void* dyn_smem = nullptr;
  /* the PTX twins' per-block state (emu_ptx.cpp), active once a twin ran in the current block */
  PtxState* ptx = nullptr;
  bool ptx_active = false;
  uint64_t launch_seed = 0;
  uint64_t yield_rng = 0; /* seeded per block from the launch seed: schedules are reproducible */
  /* clusters: this worker's rank in its group (group == nullptr: a launch without clusters) */
  int crank = 0;
  ClusterGroup* group = nullptr;
  ClusterBar solo_bar; /* barrier.cluster of a cluster of one CTA */
  NamedBar nbar[kNamedBars];
  bool block_done = false;

  ~Worker() {
    if (arena) munmap(arena, arena_threads * stack_bytes);
    ptx_state_free(ptx);
  }
  /* Stacks for n threads, reused by every later block; one guard page under each stack turns
   * an overflow into a SIGSEGV instead of silent corruption of the neighbour. */
  void ensure_stacks(size_t n, size_t bytes) {
    if (arena && n <= arena_threads && bytes == stack_bytes) return;
    if (arena) munmap(arena, arena_threads * stack_bytes);
    void* p = mmap(nullptr, n * bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) report_and_abort("internal", "cannot map %zu fiber stacks of %zu bytes", n, bytes);
    arena = static_cast<char*>(p);
    arena_threads = n;
    stack_bytes = bytes;
    for (size_t i = 0; i < n; ++i) mprotect(arena + i * bytes, 4096, PROT_NONE);
  }
};

extern thread_local Worker* tls_worker;
extern std::vector<std::unique_ptr<Worker>> g_workers;
Worker& worker();
Thread& current();

/* reports (emu_core.cpp) */
void print_header(const char* tool, const char* what);
[[noreturn]] void die();
void describe_waits(Worker& w);      /* what every waiting thread of w waits for */
const char* stuck_what(Worker& w);

/* blocks (emu_core.cpp) */
void setup_block(Worker& w, const LaunchState& L, uint3 bi, uint64_t linear_block);
bool run_pass(Worker& w);            /* every runnable fiber once; false when none was */
void finish_block(Worker& w);
uint3 block_of(const dim3& g, uint64_t linear_block);
void worker_begin(Worker& w, const LaunchState& L, uint64_t launch_seed);
void worker_end(Worker& w);

/* named barriers (emu_named_bar.cpp) */
const NamedBar* named_bar_of(const Worker& w, const void* obj); /* obj is w's barrier: which, else null */
void describe_named_bar(const Worker& w, const NamedBar& b, const char* ids);

/* clusters (emu_cluster.cpp) */
inline ClusterBar& cluster_bar(Worker& w) { return w.group ? w.group->bar : w.solo_bar; }
void cluster_bar_check(Worker& w);   /* completes the phase once every non-exited thread arrived */
void cluster_worker_loop(int wid, int rank, ClusterGroup& g, const LaunchState& L, const std::vector<uint64_t>& order,
                         std::atomic<size_t>& next, uint64_t launch_seed);

} // namespace sched
} // namespace fh_emu

#endif
