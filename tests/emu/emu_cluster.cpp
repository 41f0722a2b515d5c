/* emu_cluster.cpp: clusters of several CTAs (a launch with cudaLaunchAttributeClusterDimension,
 * FH_LAUNCH_CLUSTER): co-scheduling, the members' state for the twins' remote operations
 * (distributed shared memory, remote mbarrier arrivals, multicast copies), barrier.cluster and
 * the deadlock report of a cluster. docs/hopper.md "Clusters in the emulator" has the model.
 *
 * Each CTA of a cluster runs on its own OS thread of a group (its static __shared__ variables
 * are thread_local, its dynamic shared memory and twin state are its worker's), and only one
 * member runs at a time: after a scheduling pass the turn goes to the next rank, or stays (with
 * probability 7/8 when the pass made progress, so that a CTA sometimes runs far ahead of its
 * peers). So a remote operation touches a member that is not running, needs no lock, and the
 * launch's seed reproduces the interleaving. A whole round of turns in which no member ran a
 * thread or landed a copy is a deadlock. */
#include "emu_sched.h"

#include <cstdio>

namespace fh_emu {
namespace sched {

/* No CTA of the cluster can run: describe every member's waits and abort. */
[[noreturn]] void report_stuck_cluster(ClusterGroup& g) {
  print_header("synccheck", "no CTA of the cluster can make progress (deadlock)");
  for (Worker* m : g.members) {
    std::fprintf(stderr, "=========   CTA rank %d, block (%u,%u,%u), %d live threads%s%s\n", m->crank, m->block.x,
                 m->block.y, m->block.z, m->live, m->live ? ": " : " (exited)", m->live ? stuck_what(*m) : "");
    if (m->live) describe_waits(*m);
  }
  die();
}

/* Every member of the group waits here until all have arrived. */
void group_sync(ClusterGroup& g) {
  std::unique_lock<std::mutex> lk(g.m);
  const uint64_t gen = g.sync_gen;
  if (++g.sync_count == g.size) {
    g.sync_count = 0;
    ++g.sync_gen;
    g.cv.notify_all();
  } else {
    g.cv.wait(lk, [&] { return g.sync_gen != gen; });
  }
}

/* Rank r's CTA of cluster c: the cluster's first block plus r's offset (x fastest, as
 * %cluster_ctarank counts). */
uint3 cluster_block(const LaunchConfig& cfg, uint64_t c, int r) {
  const dim3 cd = cfg.cluster, cg(cfg.grid.x / cd.x, cfg.grid.y / cd.y, cfg.grid.z / cd.z);
  const uint3 k = block_of(cg, c);
  return make_uint3(k.x * cd.x + (unsigned)r % cd.x, k.y * cd.y + (unsigned)r / cd.x % cd.y,
                    k.z * cd.z + (unsigned)r / (cd.x * cd.y));
}

/* This worker's CTA of the group's current cluster, taking turns with the other members. */
void run_cluster_member(Worker& w, const LaunchState& L, ClusterGroup& g) {
  const uint3 bi = cluster_block(L.cfg, g.cluster, w.crank);
  const dim3 gd = L.cfg.grid;
  setup_block(w, L, bi, bi.x + (uint64_t)gd.x * (bi.y + (uint64_t)gd.y * bi.z));
  group_sync(g); /* every CTA of the cluster exists before any runs (they may reach each other) */
  std::unique_lock<std::mutex> lk(g.m);
  for (;;) {
    g.cv.wait(lk, [&] { return g.turn == w.crank || g.all_done; });
    if (g.all_done) return;
    lk.unlock();
    bool progress = false;
    if (!w.block_done) {
      progress = run_pass(w) || (w.ptx_active && ptx_async_progress(*w.ptx));
      if (w.live == 0) {
        finish_block(w);
        progress = true;
      }
    }
    lk.lock();
    g.idle = progress ? 0 : g.idle + 1;
    bool done = true;
    for (const Worker* m : g.members) done &= m->block_done;
    if (done) {
      g.all_done = true;
      g.cv.notify_all();
      return;
    }
    /* A whole round without progress: every live member waits for something nobody provides. */
    if (g.idle >= g.size) report_stuck_cluster(g);
    /* A member that progressed keeps the turn for another pass with probability 7/8, so a CTA
     * runs ahead of its peers by many passes at times (as far as its waits let it): a missing
     * wait for a peer's release then lets it overwrite what the peer still reads. */
    g.rng += 0x9e3779b97f4a7c15ull;
    uint64_t z = (g.rng ^ (g.rng >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    if (progress && ((z ^ (z >> 31)) & 7u) != 0) continue;
    g.turn = (w.crank + 1) % g.size;
    g.cv.notify_all();
  }
}

void cluster_worker_loop(int wid, int rank, ClusterGroup& g, const LaunchState& L, const std::vector<uint64_t>& order,
                         std::atomic<size_t>& next, uint64_t launch_seed) {
  Worker& w = *g_workers[wid];
  worker_begin(w, L, launch_seed);
  w.group = &g;
  w.crank = rank;
  for (;;) {
    if (rank == 0) {
      const size_t i = next.fetch_add(1);
      g.end = i >= order.size();
      if (!g.end) g.cluster = order[i];
      g.turn = 0;
      g.idle = 0;
      g.rng = launch_seed ^ (g.cluster * 0xd1b54a32d192ed03ull);
      g.all_done = false;
      g.bar = ClusterBar{};
    }
    group_sync(g); /* the leader's choice is published */
    if (g.end) break;
    run_cluster_member(w, L, g);
    group_sync(g); /* every member left the cluster before the leader picks the next */
  }
  worker_end(w);
}

Worker& member(int r) { return worker().group ? *worker().group->members[(size_t)r] : worker(); }

} // namespace sched

using namespace sched;


int cluster_rank() { return worker().crank; }
int cluster_size() { return worker().group ? worker().group->size : 1; }
PtxState* member_ptx(int r) {
  Worker& m = member(r);
  return m.ptx_active && !m.block_done ? m.ptx : nullptr;
}
unsigned char* member_smem(int r) { return static_cast<unsigned char*>(member(r).dyn_smem); }
bool member_exited(int r) { return member(r).live == 0; }
uint3 member_block(int r) { return member(r).block; }
void member_wake(int r, const void* obj) {
  Worker& m = member(r);
  for (int i = 0; i < m.nthreads; ++i)
    if (m.threads[i].state == State::Asleep && m.threads[i].sleep_obj == obj) {
      m.threads[i].state = State::Runnable;
      m.threads[i].sleep_obj = nullptr;
    }
}

namespace sched {
/* The phase completes when every non-exited thread of the cluster arrived. */
void cluster_bar_check(Worker& w) {
  ClusterBar& cb = cluster_bar(w);
  int live = 0;
  if (w.group)
    for (const Worker* m : w.group->members) live += m->live;
  else
    live = w.live;
  if (cb.arrived == 0 || (int)cb.arrived < live) return;
  ++cb.phase;
  cb.arrived = 0;
  const int n = w.group ? w.group->size : 1;
  for (int r = 0; r < n; ++r) {
    member_wake(r, &cb);
    Worker& m = member(r);
    if (m.ptx_active && !m.block_done) ptx_on_barrier(*m.ptx); /* a new interval for racecheck */
  }
}
} // namespace sched

/* barrier.cluster.arrive: one arrival of the calling thread (PTX ISA, "barrier.cluster"). */
void cluster_barrier_arrive() {
  Worker& w = worker();
  Thread& t = current();
  if (t.cbar_pending)
    report_and_abort("barrier.cluster.arrive twice without barrier.cluster.wait",
                     "a thread must wait for the phase it arrived on before it arrives again (phase %u)",
                     cluster_bar(w).phase);
  ClusterBar& cb = cluster_bar(w);
  t.cbar_pending = true;
  t.cbar_phase = cb.phase;
  ++cb.arrived;
  cluster_bar_check(w);
  maybe_yield();
}

/* barrier.cluster.wait: sleeps until the phase of the thread's last arrival completed. */
void cluster_barrier_wait() {
  Worker& w = worker();
  Thread& t = current();
  if (!t.cbar_pending)
    report_and_abort("barrier.cluster.wait without barrier.cluster.arrive",
                     "the thread has no arrival on the cluster barrier to wait for");
  ClusterBar& cb = cluster_bar(w);
  while (cb.phase == t.cbar_phase) async_sleep(&cb);
  t.cbar_pending = false;
}

} // namespace fh_emu
