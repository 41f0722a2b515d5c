/* The boundary between the host C code in src/ and the CUDA side in kernels/. Everything here is
 * implemented in kernels/ (the .cu files, compiled by nvcc, or as host C++ against the SIMT emulator in
 * tests/emu) and only exists when FH_HAVE_CUDA is defined. Arguments arrive validated. */
#ifndef FH_CUDA_BACKEND_H
#define FH_CUDA_BACKEND_H

#include "fusedhead.h"
#include "decode.h"
#include "distill.h"
#include "linear_ce.h"

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

/* Exact top-k (kernels/topk.cu): from logits (H, C, bias NULL) or fused (logits NULL). k must be
 * <= FH_CUDA_TOPK_MAX_K (larger: FH_ERR_UNSUPPORTED). The workspace (fused only) is
 * fh_cuda_topk_workspace(B, V, D, k) bytes; 0 when D == 0 (from logits). */
#define FH_CUDA_TOPK_MAX_K 256
size_t fh_cuda_topk_workspace(int64_t B, int64_t V, int64_t D, int64_t k);
fh_status_t fh_cuda_topk(fh_cuda_state_t* st, struct CUstream_st* stream, const char* fn, const fh_tensor_t* logits,
                         const fh_tensor_t* H, const fh_tensor_t* C, const fh_tensor_t* bias, int64_t k, float* values,
                         int64_t* ids, void* workspace);

/* Decoding from logits (kernels/decode.cu): every sampler, per-row arrays and sparse lists in
 * device memory (checked on the device: FH_DEVERR_DECODE_PARAM). The workspace is
 * fh_cuda_decode_workspace(B, V) bytes; B x V must be < 2^31 (else FH_ERR_UNSUPPORTED). */
fh_status_t fh_cuda_decode_workspace(int64_t B, int64_t V, const char* fn, size_t* bytes);
fh_status_t fh_cuda_decode(fh_cuda_state_t* st, struct CUstream_st* stream, const fh_decode_problem_t* p,
                           const fh_decode_outputs_t* out, void* workspace);
/* Fused decoding (kernels/decode_fused.cu): the head's logits never written, an exact fallback
 * for rows the candidates do not decide. Workspace fh_cuda_decode_fused_workspace(B, V, D,
 * lists) bytes, lists nonzero when the options carry a bias or ban list (B x V < 2^31). */
fh_status_t fh_cuda_decode_fused_workspace(int64_t B, int64_t V, int64_t D, int lists, const char* fn, size_t* bytes);
fh_status_t fh_cuda_decode_fused(fh_cuda_state_t* st, struct CUstream_st* stream, const fh_decode_problem_t* p,
                                 const fh_decode_outputs_t* out, void* workspace);

/* Probability rows (kernels/decode_probs.cu): chain speculative acceptance, and sampling from
 * probabilities with every filter off (src/decode_probs.c checks that); draft ids and indices
 * are checked on the device (FH_DEVERR_DECODE_PARAM). No workspace. */
fh_status_t fh_cuda_spec_accept(fh_cuda_state_t* st, struct CUstream_st* stream, const fh_spec_problem_t* p,
                                const fh_spec_outputs_t* out);
fh_status_t fh_cuda_from_probs(fh_cuda_state_t* st, struct CUstream_st* stream, const fh_filter_problem_t* p,
                               const fh_decode_outputs_t* out, int32_t* tokens_i32);

/* Linear cross-entropy (kernels/linear_ce*.cu). Workspace sizes are exact byte counts for the
 * problem; the compute calls get a workspace at least that large (checked by the caller). */
fh_status_t fh_cuda_linear_ce_forward_workspace(const fh_cuda_state_t* st, const fh_linear_ce_options_t* opt,
                                                int64_t N, int64_t V, int64_t D, fh_dtype_t dtype, size_t* bytes);
/* The backward's size assumes every gradient is wanted, in the input dtype. */
fh_status_t fh_cuda_linear_ce_backward_workspace(const fh_cuda_state_t* st, const fh_linear_ce_options_t* opt,
                                                 int64_t N, int64_t V, int64_t D, fh_dtype_t dtype, size_t* bytes);
fh_status_t fh_cuda_linear_ce_forward(fh_cuda_state_t* st, struct CUstream_st* stream, const fh_lce_problem_t* p,
                                      const fh_linear_ce_outputs_t* out, void* workspace, size_t workspace_bytes);
fh_status_t fh_cuda_linear_ce_backward(fh_cuda_state_t* st, struct CUstream_st* stream, const fh_lce_problem_t* p,
                                       const fh_linear_ce_grad_inputs_t* in, const fh_linear_ce_grads_t* grads,
                                       void* workspace, size_t workspace_bytes);

/* Distillation (kernels/distill.cu), dense teacher; the problem arrives validated by
 * src/distill.c. The forward's workspace is fh_cuda_distill_forward_workspace bytes. */
fh_status_t fh_cuda_distill_forward_workspace(int64_t N, int64_t V, size_t* bytes);
/* What a sparse teacher adds to either pass's workspace (kernels/distill_sparse.cu), after it. */
fh_status_t fh_cuda_distill_sparse_workspace(int64_t N, int64_t K, int backward, size_t* bytes);
fh_status_t fh_cuda_distill_forward(fh_cuda_state_t* st, struct CUstream_st* stream, const fh_distill_problem_t* p,
                                    const fh_distill_outputs_t* out, void* workspace);
/* The backward (kernels/distill_bwd.cu): workspace for every gradient wanted, in the student's
 * dtype, under accumulation mode `mode`. */
fh_status_t fh_cuda_distill_backward_workspace(int64_t N, int64_t V, int64_t D_s, fh_dtype_t dtype,
                                               fh_accum_mode_t mode, size_t* bytes);
fh_status_t fh_cuda_distill_backward(fh_cuda_state_t* st, struct CUstream_st* stream, const fh_distill_problem_t* p,
                                     const fh_distill_grad_inputs_t* in, const fh_distill_grads_t* grads,
                                     void* workspace);

#ifdef __cplusplus
}
#endif

#endif
