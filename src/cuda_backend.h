/* The boundary between the host C code in src/ and the CUDA side in kernels/. Everything here is
 * implemented in kernels/ (the .cu files, compiled by nvcc, or as host C++ against the SIMT emulator in
 * tests/emu) and only exists when FH_HAVE_CUDA is defined. Arguments arrive validated. */
#ifndef FH_CUDA_BACKEND_H
#define FH_CUDA_BACKEND_H

#include "fusedhead.h"

#ifdef __cplusplus
extern "C" {
#endif

struct CUstream_st;
typedef struct fh_cuda_state fh_cuda_state_t;

fh_status_t fh_cuda_state_create(int device, fh_cuda_state_t** out);
void fh_cuda_state_destroy(fh_cuda_state_t* st);
/* Synchronize `stream`, read and clear the device error flag. */
fh_status_t fh_cuda_check(fh_cuda_state_t* st, struct CUstream_st* stream);
/* Device pointer to the int flag kernels raise for data-dependent errors. */
int* fh_cuda_error_flag(fh_cuda_state_t* st);

fh_status_t fh_cuda_rows_logsumexp(fh_cuda_state_t* st, struct CUstream_st* stream,
                                   const fh_tensor_t* logits, float* lse);

#ifdef __cplusplus
}
#endif

#endif
