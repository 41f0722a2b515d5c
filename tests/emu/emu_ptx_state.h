/* emu_ptx_state.h: what the PTX twins (emu_ptx.cpp, emu_ptx_warp.cpp) keep per worker and per
 * block; not seen by kernels.
 *
 * Racecheck model. Every 4-byte word of the block's dynamic shared memory has a shadow entry
 * (all twin accesses are whole, 4-byte aligned words: 4/16-byte st/ld.shared, 16-byte ldmatrix
 * rows, cp.async chunks) with the last writer and the last reader. Two accesses of different
 * threads are ordered when a __syncthreads completed between them (the block's barrier epoch
 * differs) or, for two lanes of one warp, when a warp collective both took part in completed
 * after the first one (a vector clock per lane over the lanes of its warp). A write that is not
 * ordered after the previous write or read of another thread, or a read not ordered after the
 * previous write, is a hazard. Epochs grow monotonically per worker, so entries left by earlier
 * blocks are stale (epoch < the block's base) without clearing the shadow per block.
 *
 * cp.async. A copy is in flight from its issue to the cp.async.wait_group that retires it: its
 * destination words carry the copy's id, and any twin access to them is reported. At the wait
 * it lands (source read, zero fill) and is recorded as a write of the issuing thread then.
 *
 * Proxies (PTX ISA, "Memory Consistency Model: Proxies", "membar/fence": fence.proxy.async).
 * st.shared and cp.async write through the generic proxy, wgmma reads its operands through the
 * async proxy, which need not see a generic write unless a fence.proxy.async lies between them.
 * Every generic write stamps its words with a per-worker sequence number (g_seq), a TMA box
 * clears them (an async-proxy write), and fence.proxy.async records the sequence number of the
 * executing thread's moment (fence_seq). A wgmma operand word is in order when the reading thread
 * fenced after the write, or the writing thread did (the write before its own fence, then a
 * barrier or mbarrier to the reader: racecheck and the in-flight checks cover that part). The
 * other direction (generic accesses after async-proxy ones) is not modelled. */
#ifndef FH_EMU_PTX_STATE_H
#define FH_EMU_PTX_STATE_H

#include <deque>
#include <string>
#include <vector>

#include "emu_internal.h"

namespace fh_emu {
namespace sm90 {
struct Sm90State; /* the Hopper twins' per-block state (emu_sm90_state.h) */
}
namespace ptx {

/* How a word was accessed, for reports. */
enum Kind : uint8_t { K_NONE, K_LDMATRIX, K_LD_SHARED, K_ST_SHARED, K_CP_ASYNC, K_WGMMA };
const char* kind_name(uint8_t k);

struct WordShadow {
  uint32_t w_epoch, w_clock; /* last write: barrier epoch and the writer's own clock then */
  uint32_t r_epoch, r_clock; /* last read */
  uint32_t r_warps;          /* warps (bit warp % 32) that read the word in r_epoch */
  uint16_t w_thread, r_thread;
  uint8_t w_kind, r_kind;
  int32_t inflight; /* id + 1 of the cp.async in flight to this word, 0 if none */
  uint64_t g_seq;   /* the last write, when through the generic proxy: its sequence number, else 0 */
};

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int size, src_bytes, thread;
  int group;   /* the thread's commit group, -1 until committed */
  bool in_dyn; /* destination in dynamic shared memory (shadowed) */
};

/* The three per-lane streams of shared instructions grouped warp-wide for bank counting: the
 * k-th ld.shared (st.shared, cp.async) of each lane since the last barrier is one instruction. */
enum Stream { S_LD, S_ST, S_CP, S_COUNT };

struct ThreadPtx {
  std::vector<int> pending; /* ids of copies in flight, in issue order */
  int committed;            /* commit groups closed so far */
  uint32_t k[S_COUNT];
  uint32_t vc[32]; /* vector clock over the lanes of the warp */
  uint64_t fence_seq; /* PtxState::gseq at this thread's last fence.proxy.async (0: none) */
};

struct Instr {
  uint32_t mask;        /* lanes that contributed */
  uint32_t saddr[32];   /* low 32 bits of the shared address (banks depend on the low bits) */
  uint8_t sbytes[32];
  uint64_t gaddr[32];   /* cp.async: global source */
  uint8_t gbytes[32];   /* cp.async: src_bytes */
};

struct WarpPtx {
  std::deque<Instr> q[S_COUNT];
  uint32_t base[S_COUNT]; /* k of q[s].front() */
};

/* Where a shared address lies. */
struct Place {
  bool dyn;      /* in the block's dynamic shared memory */
  size_t offset; /* byte offset there */
};

} // namespace ptx

struct PtxState {
  std::vector<ptx::WordShadow> shadow;
  uint32_t epoch = 0; /* current barrier epoch of the running block */
  uint32_t base = 0;  /* first epoch of the running block */
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  int nthreads = 0;
  std::vector<ptx::ThreadPtx> threads;
  std::vector<ptx::WarpPtx> warps;
  std::vector<ptx::Copy> copies; /* in flight; slots reused through free_copies */
  std::vector<int> free_copies;
  int outside_pending = 0; /* copies in flight to static __shared__ variables */
  uint64_t gseq = 0;       /* generic-proxy shared writes so far (see Proxies above) */
  /* Hopper twins (emu_sm90*.cpp): bulk tensor copies in flight, and whether any wgmma ran in
   * this block (only then are st.shared values checked for accumulator poison) */
  int bulk_inflight = 0;
  bool wgmma_used = false;
  sm90::Sm90State* sm90 = nullptr; /* owned; created by the first Hopper twin (emu_sm90.cpp) */
};

namespace ptx {

/* emu_ptx.cpp */
PtxState& state(); /* the running block's state, activated on first use */
/* Checks that [p, p + bytes) is shared memory (reports and aborts otherwise). */
Place locate(PtxState& s, const void* p, int bytes, const char* op, int thread);
void check_aligned(const void* p, int align, const char* op, const char* which, int thread);
/* Race and in-flight checks of one access by `thread`, then the access is recorded. With
 * claim >= 0 the write is a cp.async issue: checked as a write, the words are marked in flight
 * for copy `claim`, and the write itself is recorded when the copy lands. */
void shadow_read(PtxState& s, int thread, const unsigned char* p, int bytes, Kind kind);
/* Reports a read of dynamic shared bytes whose cp.async has not landed (a reader outside the
 * racecheck's shadow: the wgmma operands). */
void check_cp_landed(PtxState& s, int thread, const unsigned char* p, int bytes, Kind kind);
/* Lands cp.async copy `id` now (its data, the shadow); the caller drops it from the issuing
 * thread's pending list. */
void land_copy(PtxState& s, int id);
void shadow_write(PtxState& s, int thread, const unsigned char* p, int bytes, Kind kind, int claim = -1);
/* Proxies (see above): an async-proxy write of [p, p + bytes) (a TMA box), a thread's
 * fence.proxy.async, and an async-proxy read by `thread` (what names the operand in a report). */
void note_async_write(PtxState& s, const unsigned char* p, uint32_t bytes);
void fence_proxy(PtxState& s, int thread);
void check_async_read(PtxState& s, int thread, const unsigned char* p, int bytes, const char* what);
/* "bytes 16-31 of dynamic shared memory" / "16 bytes at 0x... (a __shared__ variable)" */
std::string describe(PtxState& s, const void* p, int bytes);
std::string thread_name(int thread); /* "thread 37 (warp 1, lane 5)" */
/* A twin misuse (misalignment, bad operand): report naming `thread` and abort. */
[[noreturn]] void fail(const char* what, int thread, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

/* emu_ptx_warp.cpp: bank conflicts and global sectors */
/* The ways of one phase: max over the 32 banks of the distinct 4-byte words it touches there. */
int bank_ways(const uint32_t* word_addr, int n);
void note_phase(int ways);
/* Adds this lane's k-th access of stream `st` to its warp's instruction; complete
 * instructions are counted at once, partial ones at the next barrier or the block's end. */
void group_access(PtxState& s, Stream st, const void* saddr, int sbytes, const void* gaddr, int gbytes);
void flush_instructions(PtxState& s);
/* The same for one warp: its partial instructions counted, its lanes' access counts restarted. */
void flush_warp(PtxState& s, int warp);

} // namespace ptx
} // namespace fh_emu

#endif
