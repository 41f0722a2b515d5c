/* Shared by the kernel_linear_ce_* suites: problem set-up in any dtype, the fp64 reference (the
 * CPU backend's core), a naive same-precision computation (the yardstick of docs/testing.md)
 * and comparisons that print their error budget.
 *
 * The tolerance rule. For every output x with fp64 reference r and naive value n:
 *     max |x − r| <= F · max |n − r| + atol,   F = 2 (flash-attention / CCE rule),
 *     atol = 2^-24 · (D + V) · max|r|      (the γ_n bound of reordering n = D + V fp32 terms:
 *                                           the kernel and the naive loop sum in different
 *                                           orders, so where the naive error happens to be ~0
 *                                           the kernel may still differ by this much)
 * The naive computation: logits E·Cᵀ from the inputs (exact: fp16/bf16 products are exact in
 * fp32, and fp32 inputs reach the tensor cores as three bf16 pieces, docs/engine.md), summed in
 * fp32 in k order; lse, p, G in fp32; G rounded to the input dtype (fp32 stays fp32) before the
 * gradient GEMMs, which sum in fp32; gradients rounded once to the output dtype. */
#ifndef TEST_LINEAR_CE_COMMON_H
#define TEST_LINEAR_CE_COMMON_H

#include <stdint.h>

#include "fusedhead.h"
#include "lce_fixture.h"

typedef struct lk_spec {
  int64_t N, V, D;
  fh_dtype_t dtype;
  uint64_t seed;
  int bias, class_weights, token_weights;
  int every_peaked, every_ignored;
  double peak;
  int nan_row; /* >= 0: E row set to NaN */
  int pad;     /* > 0: E, C, dE, dC stored with row_stride = D + pad, NaN in the padding */
  double e_mul; /* > 0: E's entries multiplied by it (logit-scale tests) */
} lk_spec_t;

lk_spec_t lk_default(int64_t N, int64_t V, int64_t D, fh_dtype_t dtype);

typedef struct lk_problem {
  lk_spec_t s;
  lce_fix_t f;         /* fp32 data, options in f.opt */
  void *E, *C, *bias;  /* the inputs in s.dtype (host memory: the emulator runs on it) */
  fh_tensor_t tE, tC, tb;
  double *e64, *c64, *b64; /* what the tensor core reads, as double (naive) */
} lk_problem_t;

void lk_init(lk_problem_t* P, const lk_spec_t* s);
void lk_free(lk_problem_t* P);
fh_lce_problem_t lk_ref_problem(const lk_problem_t* P);

/* Forward results as doubles (kernel, reference, naive share this shape). */
typedef struct lk_fwd {
  double *lse, *entropy, *loss_rows, *zloss_rows; /* [N] (loss_rows: none-reduction loss) */
  int64_t* argmax;
  double loss, z_loss, accuracy; /* scalar outputs (mean/sum) */
} lk_fwd_t;
void lk_fwd_alloc(lk_fwd_t* o, int64_t N);
void lk_fwd_free(lk_fwd_t* o);

/* The CUDA forward through the public API (outputs in guarded buffers; guards asserted).
 * Returns the status of fh_linear_ce_forward; the fp32 lse/entropy are kept in lse32/ent32 for
 * the backward. */
fh_status_t lk_run_forward(fh_context_t* ctx, const lk_problem_t* P, lk_fwd_t* out, float* lse32, float* ent32);
/* The fp64 reference forward (also fills lse/entropy as fp64). */
void lk_ref_forward(const lk_problem_t* P, lk_fwd_t* out);
/* The naive forward (fp32 math on the tensor-core view of the inputs). */
void lk_naive_forward(const lk_problem_t* P, lk_fwd_t* out);

/* Gradients as doubles: dE [N x D], dC [V x D], db [V]. */
typedef struct lk_grads {
  double *dE, *dC, *db;
} lk_grads_t;
void lk_grads_alloc(lk_grads_t* g, const lk_problem_t* P);
void lk_grads_free(lk_grads_t* g);

/* Backward inputs: grad_loss ([1] or [N]) and optional grad_lse [N]. */
typedef struct lk_bwd_in {
  double* gl;
  double* glse; /* or NULL */
} lk_bwd_in_t;
void lk_bwd_in_make(lk_bwd_in_t* b, const lk_problem_t* P, int with_glse, uint64_t seed);
void lk_bwd_in_free(lk_bwd_in_t* b);

/* CUDA backward through the public API, given the CUDA forward's fp32 lse/entropy. want: bit 0
 * dE, bit 1 dC, bit 2 dbias. `init` (may be NULL) preloads the gradient buffers (for the
 * accumulate flag). Guards asserted. */
fh_status_t lk_run_backward(fh_context_t* ctx, const lk_problem_t* P, const lk_bwd_in_t* in, const float* lse32,
                            const float* ent32, int want, const lk_grads_t* init, lk_grads_t* out);
void lk_ref_backward(const lk_problem_t* P, const lk_bwd_in_t* in, const lk_fwd_t* ref_fwd, lk_grads_t* out);
/* skip_E/skip_C (may be NULL): per element, Σ over entries the filter may drop
 * (|p − δ| < eps) of |G_ij|·|C_jk| (dE) or |G_ij|·|E_ik| (dC), |G_ij| for dbias (in skip_b). */
void lk_naive_backward(const lk_problem_t* P, const lk_bwd_in_t* in, const lk_fwd_t* naive_fwd, lk_grads_t* out,
                       double filter_eps, lk_grads_t* skip);

/* The comparison of the header comment. `factor` multiplies the naive error (2 by default;
 * more only where a stated reason exists), `extra` (may be NULL) adds a per-element bound.
 * Prints the line and returns 1 when it passes. */
int lk_compare(const char* name, const double* x, const double* ref, const double* naive, int64_t n, double factor,
               double atol_terms, const double* extra);

/* Where lk_run_forward/lk_run_backward put the CUDA backend's buffers. By default (NULL hooks)
 * the host buffers themselves: the emulator runs on host memory. A gpu suite installs hooks
 * that allocate device memory and copy, so the same runs work on a real device. */
typedef struct lk_memory {
  void* (*alloc)(size_t bytes);                              /* NULL on failure */
  void (*release)(void* p);
  int (*to_device)(void* dst, const void* src, size_t bytes); /* 0 on success */
  int (*to_host)(void* dst, const void* src, size_t bytes);
} lk_memory_t;
void lk_set_memory(const lk_memory_t* m); /* NULL: back to host memory */
/* The buffer the backend gets for `host` (bytes, plus the guard words when guarded): host
 * itself, or a device copy under the installed hooks; lk_back copies a mirror back over host
 * (guards included) and releases it, lk_drop releases an input's mirror. */
void* lk_mirror(const void* host, size_t bytes, int guarded);
void lk_back(void* host, void* mirror, size_t bytes, int guarded);
void lk_drop(const void* host, const void* mirror);


/* Bitwise equality of two double arrays (NaN == NaN). */
int lk_same_bits(const double* a, const double* b, int64_t n);

/* Tensor-core FLOPs the engine issues for one logit GEMM of `nv` rows x V classes over D
 * (docs/engine.md "Cost model"): per 128 x 128 CTA tile, each warp (2 x 4 of 64 x 32) issues
 * the m16n8 tiles that hold a live row and class, over ceil(D·size/64) stages of 2 k-steps. */
/* 1 when the emulated launches of this dtype take the sm_90a mainloop (docs/hopper.md): 16-bit
 * operands with 16-byte rows (dense, D % 8 == 0) on the emulator's compute capability 9.0,
 * unless FH_ENGINE=sm80. */
int lk_engine_sm90(fh_dtype_t dtype, int64_t D);
/* 1 unless FH_MULTICAST=0 or FH_EMU_MAX_CLUSTERS=0 (the emulated device schedules no cluster):
 * sm_90a launches of two row blocks or more go in clusters of 2 CTAs that multicast the
 * classifier tile (docs/hopper.md "Multicast of the classifier tile"). */
int lk_multicast_on(void);
/* The mainloop of the linear CE forward of N rows: 0 sm_80, 1 sm_90a, 2 sm_90a in clusters of 2
 * (its grid has two row blocks or more). */
int lk_fwd_engine(int64_t N, fh_dtype_t dtype, int64_t D);
/* How many times that forward reads the classifier for nv valid rows: once per row block, or
 * once per cluster of two row blocks with multicast. */
int64_t lk_fwd_c_reads(int64_t N, int64_t nv, fh_dtype_t dtype, int64_t D);
/* The forward's tile FLOPs (lk_tile_gemm_flops with lk_fwd_engine). */
uint64_t lk_engine_gemm_flops(int64_t N, int64_t nv, int64_t V, int64_t D, fh_dtype_t dtype);
/* The same for the mainloop named by sm90 (0: sm_80, 1: sm_90a, 2: sm_90a in clusters of 2),
 * whatever the launches take. */
uint64_t lk_tile_gemm_flops(int64_t nv, int64_t V, int64_t D, fh_dtype_t dtype, int sm90);

#endif
