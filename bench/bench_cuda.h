/* bench_cuda.h: the CUDA-runtime side of the benchmark programs (bench/bench_cuda.cu), as C
 * functions, so that the bench programs stay C. Compiled and linked only when the CUDA backend is built
 * (FH_HAVE_CUDA); the programs call it only after a CUDA context was created. Every function
 * returns 0 on success (or a non-NULL pointer) and prints nothing. */
#ifndef FH_BENCH_CUDA_H
#define FH_BENCH_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "fusedhead.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bc_device_info {
  char name[256];
  int cc_major, cc_minor;
  int sm_clock_mhz, mem_clock_mhz; /* peak clocks the runtime reports */
  int driver_version, runtime_version; /* e.g. 12040 */
  size_t total_mem, l2_bytes;
} bc_device_info_t;

int bc_device_info(int device, bc_device_info_t* info);
int bc_mem_info(size_t* free_bytes, size_t* total_bytes);
void* bc_malloc(size_t bytes); /* NULL when the device is out of memory (the error is cleared) */
void bc_free(void* p);
int bc_memset(void* p, int value, size_t bytes); /* async on the default stream */
int bc_copy_to_host(void* dst, const void* src, size_t bytes);
int bc_copy_to_device(void* dst, const void* src, size_t bytes);
int bc_sync(void);
/* n values scale·u, u uniform in [-1, 1) from a hash of (seed, index), in dtype. */
int bc_fill_uniform(void* p, fh_dtype_t dtype, int64_t n, float scale, uint64_t seed);
/* n targets uniform in [0, V). */
int bc_fill_targets(int64_t* p, int64_t n, int64_t V, uint64_t seed);

/* CUDA-event timing on the default stream (the stream fusedhead's context uses). */
typedef struct bc_timer bc_timer_t;
bc_timer_t* bc_timer_create(void);
void bc_timer_destroy(bc_timer_t* t);
int bc_timer_start(bc_timer_t* t);
/* Records the end event, waits for it, returns the elapsed milliseconds (< 0 on error). */
double bc_timer_stop_ms(bc_timer_t* t);

#ifdef __cplusplus
}
#endif

#endif
