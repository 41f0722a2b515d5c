/* fh_emu.h: the C-callable control surface of the SIMT emulator (tests/emu), for the kernel
 * test suites and bench programs built against the `fusedhead_emu` target.
 *
 * The emulator runs the kernels/ .cu files on the CPU; see tests/emu/README.md for what it models. All
 * functions here are thread-safe. Counters describe kernel launches made through FH_LAUNCH. */
#ifndef FH_EMU_H
#define FH_EMU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fh_emu_counters {
  uint64_t launches;         /* kernel launches that ran (1 in fh_emu_last_counters) */
  uint64_t blocks;           /* thread blocks executed */
  uint64_t threads;          /* CUDA threads executed (blocks x threads per block) */
  uint64_t barriers;         /* completed __syncthreads* barriers (barrier 0), summed over blocks */
  uint64_t warp_collectives; /* completed warp collectives: shuffles, votes, __syncwarp, reduces */
  uint64_t shuffles;         /* of which __shfl*_sync */
  uint64_t atomics;          /* atomic* calls, per thread */
  uint64_t mma_ops;          /* wmma::mma_sync calls, per warp (one tensor-core MMA each) */
  uint64_t mma_flops;        /* 2*M*N*K per MMA: the FLOPs the kernel really issued */
  char kernel[96];           /* name of the (last) kernel, as written in FH_LAUNCH */
  /* The PTX twins (kernels/engine/ptx.cuh, tests/emu/emu_ptx.h): the cost model's inputs. */
  uint64_t ldmatrix_ops;           /* ldmatrix instructions, per warp */
  uint64_t cp_async_ops;           /* cp.async calls, per thread */
  uint64_t bytes_g2s;              /* bytes cp.async (src_bytes) and TMA (in-bound box bytes) read from global */
  uint64_t global_requests;        /* warp-wide cp.async instructions (k-th call of each lane) */
  uint64_t global_sectors;         /* distinct 32-byte global sectors those instructions read */
  uint64_t smem_requests;          /* warp-wide shared instructions: ldmatrix, st/ld.shared, cp.async */
  uint64_t smem_wavefronts;        /* sum over their phases of the bank "ways" (1 = conflict-free) */
  uint64_t bank_conflict_replays;  /* wavefronts beyond one per phase: sum of (ways - 1) */
  uint64_t bank_conflict_max_ways; /* worst phase of any instruction (a maximum, not a sum) */
  uint64_t mufu_ops;               /* ex2/rcp/lg2.approx calls, per thread */
  uint64_t bytes_g2s_watched;      /* of bytes_g2s, those read from the watched range (below) */
  uint64_t named_barriers;         /* completed phases of named barriers (bar.sync / bar.arrive with
                                      an id of 1-15); `barriers` counts __syncthreads only */
} fh_emu_counters_t;

/* Counters of the most recent launch that ran (zeros before any launch). */
fh_emu_counters_t fh_emu_last_counters(void);
/* Counters summed over every launch since the last fh_emu_reset_counters(). */
fh_emu_counters_t fh_emu_total_counters(void);
void fh_emu_reset_counters(void);
/* The watched global range [base, base + bytes) (one at a time; bytes 0 clears it): cp.async
 * bytes read from it are counted in bytes_g2s_watched, so a test can check how many times a
 * kernel streams one operand (say the classifier C) apart from the others. Only cp.async and
 * bulk tensor (TMA) reads are seen: kernels on the scalar (non-16-byte) path load with ordinary
 * instructions. */
void fh_emu_watch_global(const void* base, uint64_t bytes);

/* Block order: every launch shuffles its blocks with a seed derived from this base seed and
 * the launch index; setting the seed also resets the launch index, so a test is reproducible.
 * Default: FH_EMU_SEED from the environment, else a fixed constant. */
void fh_emu_set_seed(uint64_t seed);
uint64_t fh_emu_get_seed(void);

/* OS threads that execute the blocks of a launch (default: FH_EMU_WORKERS, else 2; 1..64). */
void fh_emu_set_workers(int n);
int fh_emu_get_workers(void);

/* Probability that a shared-memory twin call (emu_ptx.h) hands its fiber back to the scheduler,
 * so other threads of the block run in between (default: FH_EMU_YIELD, else 0.125; 0 disables).
 * The choices come from the block-order seed: a seed gives one schedule. */
void fh_emu_set_yield(double p);
double fh_emu_get_yield(void);

/* One line per counter group, for a test's or bench program's log: writes at most n bytes
 * (NUL included) to buf and returns the length it needed, like snprintf. */
int fh_emu_format_counters(const fh_emu_counters_t* c, char* buf, unsigned long n);
/* fh_emu_format_counters to stderr. */
void fh_emu_print_counters(const fh_emu_counters_t* c);

#ifdef __cplusplus
}
#endif

#endif
