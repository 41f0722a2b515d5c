/* emu_sm90_state.h: what the Hopper twins (emu_sm90*.cpp) keep per worker and block; not seen by
 * kernels. One Sm90State per PtxState (so per worker, and per CTA of a cluster: another CTA's is
 * reached through its PtxState), reset whenever the PTX state is activated for a new block
 * (emu_ptx.cpp, activate), so nothing leaks from one block into the next.
 *
 * mbarriers live in a map keyed by address, because the hardware's 64-bit encoding is opaque:
 * the twin keeps the documented state (PTX ISA, "mbarrier": expected arrival count, pending
 * arrivals, transaction count, current phase) beside it.
 * Bulk tensor copies in flight are a list: their destination is poisoned at issue and they land
 * at a random later point (a twin call, or when every thread of the block sleeps), never after
 * the barrier phase they complete.
 * wgmma: per thread, the mma_asyncs not yet retired, each with the result it will deliver. */
#ifndef FH_EMU_SM90_STATE_H
#define FH_EMU_SM90_STATE_H

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "emu_ptx_state.h"
#include "emu_sm90.h"

namespace fh_emu {
namespace sm90 {

/* The twin's tensor map, stored in the 128 opaque bytes of a CUtensorMap. */
struct TensorMapTwin {
  uint32_t magic; /* kTmapMagic: written by the twin of cuTensorMapEncodeTiled */
  uint8_t dtype, rank, esize, swizzle_bytes; /* swizzle span in bytes, 0 for none */
  uint8_t oob_nan, pad0[3];
  uint8_t estride[5], pad1[3];
  uint16_t box[5], pad2[3];
  uint64_t addr;
  uint64_t dim[5];
  uint64_t stride[5]; /* bytes; stride[0] is the element size */
};
constexpr uint32_t kTmapMagic = 0x54a90d5eu;

struct Mbar {
  uint32_t count = 0;   /* arrivals per phase (init) */
  uint32_t pending = 0; /* arrivals still missing in the current phase */
  int64_t tx = 0;       /* transaction bytes still expected in the current phase */
  uint32_t phase = 0;   /* phases completed so far; the current phase's parity is phase & 1 */
  int init_thread = -1;
};

struct Bulk {
  unsigned char* dst;
  uint32_t dst_off, bytes;
  void* bar;
  TensorMapTwin map;
  int32_t c0, c1;
  int thread;
  uint32_t phase; /* the barrier's phase at issue (for reports) */
  int rank;       /* cluster rank of the issuing CTA (a multicast lands in its peers too) */
};

/* cp.async.mbarrier.arrive.noinc: an arrival that fires once the issuing thread's cp.async copies
 * in flight at the call have landed. Each copy is named by its id and its destination (an id is
 * reused after its copy lands, and a later copy under the same id is not this one). */
struct CpArrive {
  void* bar;
  int thread;
  uint32_t phase; /* the barrier's phase at the call (for reports) */
  std::vector<std::pair<int, unsigned char*>> copies;
};

struct WgOp {
  float* d;
  int n;                      /* N of m64nNk16: d has n / 2 registers */
  int group;                  /* the thread's commit group, -1 until committed */
  std::vector<float> result;  /* what the registers hold once the group retires */
  uint64_t desc_a, desc_b;    /* the operands, read again when the group retires ... */
  int kind;
  uint64_t operand_hash;      /* ... and compared with what the mma_async read */
};

struct WgThread {
  std::vector<WgOp> ops; /* not yet retired, in issue order */
  int committed = 0;
  bool fenced = false;   /* a wgmma.fence since the accumulators were last ordinary registers */
  int retired = 0;       /* groups retired so far (for reports) */
  /* try_wait returned false once for this (barrier, phase): the next call sleeps instead */
  const void* false_bar = nullptr;
  uint32_t false_phase = 0;
};

struct Sm90State {
  std::unordered_map<uintptr_t, Mbar> bars;
  std::vector<Bulk> bulks;
  std::vector<CpArrive> cparrives;
  std::vector<WgThread> threads;
  uint64_t rng = 0;
  bool any_wgmma = false;
};

Sm90State& st();        /* the running block's state (PtxState activated first) */
Sm90State& st_of(PtxState& s); /* the state that belongs to the PtxState s (another CTA's, too) */
uint64_t next_rand();   /* per block, seeded from the launch seed and the block index */
/* emu_sm90.cpp: called by the copy when it lands */
void complete_tx(PtxState& s, void* bar, uint32_t bytes, int thread);
Mbar* find_bar(const void* bar);
Mbar* find_bar_in(Sm90State& S, const void* bar);
/* emu_sm90_tma.cpp: the data movement of one box (OOB fill, swizzle) */
void tma_fill(const Bulk& b);
/* Lands copy i of st().bulks (data, then complete_tx). */
void land_bulk(PtxState& s, size_t i);
/* Lands the copies of st().cparrives[i], then performs its arrival. */
void land_cparrive(PtxState& s, size_t i);
/* Lands one copy (a bulk copy, or the copies behind a cp.async arrival) chosen at random with
 * probability p (the "random point" of landing). */
void maybe_land(PtxState& s, double p);
/* Reports a twin access to bytes of a bulk copy in flight (to the CTA whose twin state is s). */
void check_bulk(PtxState& s, int thread, const unsigned char* p, int bytes, bool write, const char* op);
/* The swizzle of the shared address `a` for a pattern of `span` bytes (32, 64, 128): the 16-byte
 * chunk index (bits 4..) XOR the row within the 8-row repeat (bits 7..). */
inline uint32_t swizzle(uint32_t a, uint32_t span) {
  if (!span) return a;
  const uint32_t mask = span / 16 - 1;
  return a ^ (((a >> 7) & mask) << 4);
}
std::string bar_name(PtxState& s, const void* bar);
/* Clusters (emu_sm90.cpp): the offset of p in the dynamic shared memory, after checking that
 * rank is in the cluster (mapa's rules); the twin state of the CTA of rank, which must still run
 * and have used a twin. */
uint32_t remote_offset(const void* p, uint32_t rank, const char* op, int t);
PtxState& remote_state(uint32_t rank, const char* op, int t);

} // namespace sm90

/* Hooks for emu_ptx.cpp and emu_core.cpp. */
void sm90_on_activate(PtxState& s);
void sm90_on_block_end(PtxState& s);
void sm90_check_bulk_access(PtxState& s, int thread, const unsigned char* p, int bytes, bool write, uint8_t kind);
void sm90_check_taint(const void* src, int bytes, const char* op);

} // namespace fh_emu

#endif
