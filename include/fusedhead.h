/*
 * fusedhead: fused LM-head kernels (linear cross-entropy, distillation, decoding).
 *
 * This header is the whole public API and its contract. It is C11, compiles as C++ too, and
 * needs no CUDA header: the stream is passed as `struct CUstream_st*`, which is what
 * `cudaStream_t` is.
 *
 * Conventions that hold for every call:
 *   - Every function returns fh_status_t; FH_SUCCESS is 0. On failure fh_last_error() returns
 *     a thread-local message naming the function and the argument.
 *   - The library never exits, aborts or prints.
 *   - Tensors are described by fh_tensor_t (row-major, row stride in elements). For the CPU
 *     backend pointers are host pointers, for the CUDA backend device pointers.
 *   - Every compute call takes caller-owned workspace and has a *_workspace_size query. The CPU
 *     backend is a reference implementation: it reports 0 bytes of workspace and allocates its
 *     O(N + V + D) temporaries itself (FH_ERR_OUT_OF_MEMORY when that fails).
 *   - Options structs carry `struct_size` and are set up by their *_options_init(); fields are
 *     only ever appended, so a caller compiled against an older header keeps working.
 *   - CUDA backend calls are asynchronous on the context's stream: they return once enqueued
 *     and never synchronize the host. Data-dependent errors found on the device (a target out
 *     of range) raise a device flag that the next call on the context, or fh_context_check(),
 *     returns as FH_ERR_INVALID_ARGUMENT.
 *   - The CPU backend is synchronous and thread-safe for distinct outputs.
 */
#ifndef FUSEDHEAD_H
#define FUSEDHEAD_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(FH_BUILDING_SHARED)
#define FH_API __declspec(dllexport)
#elif defined(_WIN32) && !defined(FH_STATIC)
#define FH_API __declspec(dllimport)
#elif defined(__GNUC__)
#define FH_API __attribute__((visibility("default")))
#else
#define FH_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* Version                                                                                    */
/* ------------------------------------------------------------------------------------------ */

#define FH_VERSION_MAJOR 0
#define FH_VERSION_MINOR 1
#define FH_VERSION_PATCH 0
/* MAJOR * 10000 + MINOR * 100 + PATCH */
#define FH_VERSION_NUMBER (FH_VERSION_MAJOR * 10000 + FH_VERSION_MINOR * 100 + FH_VERSION_PATCH)

/* The version of the library actually linked, as "MAJOR.MINOR.PATCH". */
FH_API const char* fh_version(void);
/* The same as a number, FH_VERSION_NUMBER of the linked library. */
FH_API int fh_version_number(void);

/* ------------------------------------------------------------------------------------------ */
/* Status                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* One table gives the enum and the strings. Values are explicit and never reused. */
#define FH_STATUS_MAP(X)                                                                       \
  X(FH_SUCCESS, 0, "success")                                                                  \
  X(FH_ERR_INVALID_ARGUMENT, 1, "invalid argument")                                            \
  X(FH_ERR_INVALID_USAGE, 2, "invalid usage")                                                  \
  X(FH_ERR_UNSUPPORTED, 3, "unsupported")                                                      \
  X(FH_ERR_INSUFFICIENT_WORKSPACE, 4, "insufficient workspace")                                \
  X(FH_ERR_OUT_OF_MEMORY, 5, "out of memory")                                                  \
  X(FH_ERR_CUDA, 6, "CUDA error")                                                              \
  X(FH_ERR_INTERNAL, 7, "internal error")

typedef enum fh_status {
#define FH_STATUS_ENUM_(name, value, text) name = value,
  FH_STATUS_MAP(FH_STATUS_ENUM_)
#undef FH_STATUS_ENUM_
  FH_STATUS_COUNT
} fh_status_t;

/* A static string for the status ("invalid argument"); "unknown status" out of range. */
FH_API const char* fh_status_string(fh_status_t status);
/* The message of the last failing call on this thread ("fh_linear_ce_forward: targets is
 * NULL"), or "" when the last call succeeded. Valid until the next fusedhead call on the
 * same thread. */
FH_API const char* fh_last_error(void);

/* ------------------------------------------------------------------------------------------ */
/* Context                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef enum fh_backend {
  FH_BACKEND_CPU = 0,  /* plain-C fp64 reference, always built */
  FH_BACKEND_CUDA = 1, /* hand-written CUDA kernels; FH_ERR_UNSUPPORTED when not built */
  FH_BACKEND_COUNT
} fh_backend_t;

typedef struct fh_context fh_context_t;
/* CUDA's stream type (cudaStream_t is struct CUstream_st*), declared here so the header needs
 * no CUDA include. */
struct CUstream_st;

/* 1 when `backend` was compiled into this library, else 0. */
FH_API int fh_backend_available(fh_backend_t backend);

/* Create a context. `device` is the CUDA device ordinal (ignored by the CPU backend). The
 * CUDA context starts on the default stream (NULL).
 * Statuses: FH_ERR_INVALID_ARGUMENT (ctx NULL, backend out of range, device < 0),
 * FH_ERR_UNSUPPORTED (backend not built), FH_ERR_CUDA, FH_ERR_OUT_OF_MEMORY. */
FH_API fh_status_t fh_context_create(fh_context_t** ctx, fh_backend_t backend, int device);
/* Destroy a context; NULL is a no-op. Does not synchronize the stream. */
FH_API void fh_context_destroy(fh_context_t* ctx);
/* Set the stream later calls enqueue on (CUDA backend; the CPU backend accepts only NULL). */
FH_API fh_status_t fh_context_set_stream(fh_context_t* ctx, struct CUstream_st* stream);
FH_API fh_status_t fh_context_get_backend(const fh_context_t* ctx, fh_backend_t* backend);
/* Return, and clear, a data-dependent error that a kernel raised on the device (for example
 * a target outside [0, V)). Synchronizes the context's stream. CPU backend: FH_SUCCESS. */
FH_API fh_status_t fh_context_check(fh_context_t* ctx);

/* ------------------------------------------------------------------------------------------ */
/* Tensors                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef enum fh_dtype {
  FH_DTYPE_F32 = 0,  /* IEEE binary32 */
  FH_DTYPE_F16 = 1,  /* IEEE binary16 */
  FH_DTYPE_BF16 = 2, /* bfloat16: the upper 16 bits of a binary32 */
  FH_DTYPE_COUNT
} fh_dtype_t;

/* Size in bytes of one element, 0 for an out-of-range dtype. */
FH_API size_t fh_dtype_size(fh_dtype_t dtype);

/* A row-major matrix: element (r, c) is at data + (r * row_stride + c) * dtype_size.
 * rows >= 0, cols >= 0, row_stride >= cols; data may be NULL only when rows * cols == 0.
 * A vector (a bias) is a 1 x n tensor. Inputs are passed as const fh_tensor_t* and never
 * written; `data` is non-const so one type serves inputs and outputs. */
typedef struct fh_tensor {
  void* data;
  fh_dtype_t dtype;
  int64_t rows;
  int64_t cols;
  int64_t row_stride; /* in elements */
} fh_tensor_t;

/* A dense rows x cols tensor (row_stride = cols). */
static inline fh_tensor_t fh_tensor_2d(void* data, fh_dtype_t dtype, int64_t rows, int64_t cols) {
  fh_tensor_t t;
  t.data = data;
  t.dtype = dtype;
  t.rows = rows;
  t.cols = cols;
  t.row_stride = cols;
  return t;
}

typedef enum fh_reduction {
  FH_REDUCTION_MEAN = 0, /* weighted mean over valid rows; see each op for the denominator */
  FH_REDUCTION_SUM = 1,  /* sum over valid rows */
  FH_REDUCTION_NONE = 2, /* one value per row, 0 at ignored rows */
  FH_REDUCTION_COUNT
} fh_reduction_t;

/* Where gradients are accumulated (CUDA backend; the CPU reference always accumulates in fp64
 * and rounds once into the output dtype). */
typedef enum fh_accum_mode {
  FH_ACCUM_FP32 = 0,          /* fp32 accumulation: in the outputs when they are fp32, else in an
                                 fp32 workspace cast down at the end (default) */
  FH_ACCUM_OUTPUT_DTYPE = 1,  /* low memory: accumulate in the output dtype, no gradient-sized
                                 workspace; bf16/fp16 outputs lose precision */
  FH_ACCUM_DETERMINISTIC = 2, /* bitwise identical results run to run, at extra cost */
  FH_ACCUM_MODE_COUNT
} fh_accum_mode_t;

/* filter_eps value meaning "machine epsilon of the input dtype / 32" (2^-12 bf16, 2^-15
 * fp16, 2^-28 fp32), as Cut Cross-Entropy's "auto". */
#define FH_FILTER_EPS_AUTO (-1.0f)

/* ------------------------------------------------------------------------------------------ */
/* Row statistics                                                                             */
/* ------------------------------------------------------------------------------------------ */

/* lse[i] = log Σ_j exp(logits[i][j]) for logits [N x V] (fp32, fp16 or bf16, row stride
 * honoured), written as fp32 [N]. A row whose entries are all -inf gives -inf; NaN anywhere in
 * a row gives NaN; +inf gives +inf. V = 0 gives -inf (the empty sum). No workspace.
 * Statuses: FH_ERR_INVALID_ARGUMENT, FH_ERR_UNSUPPORTED, FH_ERR_CUDA. */
FH_API fh_status_t fh_rows_logsumexp(fh_context_t* ctx, const fh_tensor_t* logits, float* lse);

/* ------------------------------------------------------------------------------------------ */
/* Linear cross-entropy                                                                       */
/* ------------------------------------------------------------------------------------------ */
/*
 * loss = CE(z, targets) with, for row i and class j,
 *     r_ij = E_i · C_j + bias_j                       E [N x D], C [V x D], bias [1 x V]
 *     s_ij = logit_scale · r_ij                       (scale, i.e. 1 / temperature, first)
 *     z_ij = softcap · tanh(s_ij / softcap)           (only when softcap > 0)
 *     lse_i = log Σ_j exp(z_ij),  p_ij = exp(z_ij − lse_i),  h_i = −Σ_j p_ij log p_ij
 * Row i is valid when targets[i] != ignore_index; valid targets must lie in [0, V).
 * With α = label_smoothing, ε = α / V, class weights w (all 1 when NULL, W = Σ_j w_j),
 * token weights ω (all 1 when NULL), λ = z_loss_scale, η = entropy_weight, each valid row has
 *     ce_i  = ω_i [ w_y (1 − α)(lse_i − z_iy) + ε Σ_j w_j (lse_i − z_ij) ]   (y = targets[i])
 *     reg_i = ω_i [ λ lse_i² + η h_i ]
 * and ignored rows contribute nothing. Reductions:
 *     none: loss[i] = ce_i + reg_i (0 at ignored rows)
 *     sum:  loss = Σ_i (ce_i + reg_i)
 *     mean: loss = Σ_i ce_i / D_ce + Σ_i reg_i / D_reg
 *           D_ce  = Σ_valid ω_i w_{y_i}   (PyTorch's denominator with class weights: the mean
 *                                          is a weighted average, invariant to weight scale)
 *           D_reg = Σ_valid ω_i           (z-loss and entropy do not depend on the target, so
 *                                          class weights do not scale them: Liger's rule)
 *           options.divisor > 0 replaces both denominators (a global token count in gradient
 *           accumulation, "num_items_in_batch").
 * Decisions, each with its reason:
 *   - A denominator that is 0 (every row ignored, or all weights 0) gives loss 0 and zero
 *     gradients, not NaN (PyTorch gives NaN): a padding-only micro-batch must not poison an
 *     accumulated step. Liger and torchtune's LinearCrossEntropyLoss also return 0.
 *   - The z-loss is part of `loss` and its gradient; `z_loss` reports the λ lse² part alone,
 *     with the same reduction and denominator D_reg.
 *   - NaN or Inf in a valid row's logits propagates to that row's loss, lse and gradients (and
 *     so to a mean or sum); it never crashes or reads out of bounds. Ignored rows are never
 *     read, so NaN there does not propagate.
 *   - Label smoothing follows PyTorch: the uniform part includes the target.
 *   - logit_scale multiplies the raw logits before the softcap (the scale belongs to the head,
 *     as Cohere's logit_scale or a muP output multiplier); a sampling temperature T is
 *     logit_scale = 1/T.
 */

typedef struct fh_linear_ce_options {
  size_t struct_size;          /* sizeof(fh_linear_ce_options_t), set by init */
  int64_t ignore_index;        /* default -100; rows with this target are skipped */
  fh_reduction_t reduction;    /* default FH_REDUCTION_MEAN */
  float softcap;               /* default 0 (off); > 0 enables z = c·tanh(s/c); < 0 invalid */
  float label_smoothing;       /* default 0; in [0, 1] */
  float logit_scale;           /* default 1; finite and > 0 (1 / temperature) */
  float z_loss_scale;          /* default 0 (λ); finite and >= 0 */
  float entropy_weight;        /* default 0 (η); finite, may be negative (entropy bonus) */
  float divisor;               /* default 0 (automatic denominators); > 0 overrides them (mean) */
  float filter_eps;            /* default FH_FILTER_EPS_AUTO; 0 turns the backward's tile
                                  filter off; ignored by the CPU reference */
  int filter_e_grad;           /* default 1: the filter may skip tiles for dE */
  int filter_c_grad;           /* default 1: the filter may skip tiles for dC and dbias */
  fh_accum_mode_t accum_mode;  /* default FH_ACCUM_FP32 (CUDA backend) */
  int accumulate;              /* default 0: the backward overwrites dE, dC, dbias; 1 adds into
                                  them (tied input/output embeddings) */
} fh_linear_ce_options_t;

/* Fill `opts` with the defaults above. */
FH_API void fh_linear_ce_options_init(fh_linear_ce_options_t* opts);

/* Forward outputs. Each pointer is a buffer of the context's kind (host or device), fp32,
 * except argmax. NULL means "not wanted", except `loss`. */
typedef struct fh_linear_ce_outputs {
  float* loss;      /* required: [1] for mean/sum, [N] for none */
  float* lse;       /* [N]: lse_i, 0 at ignored rows; the backward needs it */
  float* entropy;   /* [N]: h_i, 0 at ignored rows; the backward needs it when η != 0 */
  float* z_loss;    /* [1] or [N] (as loss): the λ lse² part of the loss */
  int64_t* argmax;  /* [N]: first index of the row's maximum logit z, -1 at ignored rows */
  float* accuracy;  /* [1]: mean over valid rows of [argmax == target] (unweighted), 0 if none */
} fh_linear_ce_outputs_t;

/* Workspace the forward needs, in bytes. N, V, D, dtype describe the problem. */
FH_API fh_status_t fh_linear_ce_forward_workspace_size(fh_context_t* ctx,
                                                       const fh_linear_ce_options_t* opts,
                                                       int64_t N, int64_t V, int64_t D,
                                                       fh_dtype_t dtype, size_t* bytes);

/* Forward pass.
 *   E [N x D], C [V x D] and bias [1 x V] (or NULL) share one dtype.
 *   targets [N] int64; class_weights [V] fp32 or NULL; token_weights [N] fp32 or NULL
 *   (weights must be finite and >= 0: FH_ERR_INVALID_ARGUMENT otherwise on the CPU backend).
 *   Outputs must not alias inputs or each other.
 * Statuses: FH_ERR_INVALID_ARGUMENT (NULLs, sizes, dtypes, strides, option ranges, targets
 * out of range), FH_ERR_UNSUPPORTED, FH_ERR_INSUFFICIENT_WORKSPACE, FH_ERR_OUT_OF_MEMORY,
 * FH_ERR_CUDA. */
FH_API fh_status_t fh_linear_ce_forward(fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                        const fh_tensor_t* E, const fh_tensor_t* C,
                                        const fh_tensor_t* bias, const int64_t* targets,
                                        const float* class_weights, const float* token_weights,
                                        const fh_linear_ce_outputs_t* out, void* workspace,
                                        size_t workspace_bytes);

/* Backward inputs beyond the forward's. */
typedef struct fh_linear_ce_grad_inputs {
  const float* lse;       /* required: [N] from the forward with the same options */
  const float* entropy;   /* [N] from the forward; required when entropy_weight != 0 */
  const float* grad_loss; /* required: [1] for mean/sum, [N] for none (upstream gradient) */
  const float* grad_lse;  /* [N] upstream gradient of the lse output, or NULL (a user-side
                             z-loss): adds grad_lse_i · p_ij to ∂/∂z_ij of valid rows */
} fh_linear_ce_grad_inputs_t;

/* Gradient outputs, each in the dtype and shape of its input (dE like E, dC like C, dbias like
 * bias), or with data == NULL / pointer NULL when not wanted (then it is not computed). With
 * options.accumulate the gradients are added to what the buffers hold. */
typedef struct fh_linear_ce_grads {
  fh_tensor_t* dE;
  fh_tensor_t* dC;
  fh_tensor_t* dbias;
} fh_linear_ce_grads_t;

FH_API fh_status_t fh_linear_ce_backward_workspace_size(fh_context_t* ctx,
                                                        const fh_linear_ce_options_t* opts,
                                                        int64_t N, int64_t V, int64_t D,
                                                        fh_dtype_t dtype, size_t* bytes);

/* Backward pass: ∂loss/∂E, ∂loss/∂C, ∂loss/∂bias for the loss defined above, times grad_loss.
 * Per valid row, with a_i the row's upstream factor (grad_loss / D_ce for mean, grad_loss for
 * sum, grad_loss[i] for none, times ω_i) and b_i the same with D_reg:
 *   ∂/∂z_ij = a_i [w_y (1 − α)(p_ij − δ_jy) + ε (W p_ij − w_j)]
 *           + b_i [2λ lse_i p_ij − η p_ij (log p_ij + h_i)] + grad_lse_i p_ij
 * then × (1 − tanh²(s_ij / softcap)) when softcap > 0, × logit_scale, and
 *   dE = G·C, dC = Gᵀ·E, dbias_j = Σ_i G_ij.
 * Same statuses as the forward. */
FH_API fh_status_t fh_linear_ce_backward(fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                         const fh_tensor_t* E, const fh_tensor_t* C,
                                         const fh_tensor_t* bias, const int64_t* targets,
                                         const float* class_weights, const float* token_weights,
                                         const fh_linear_ce_grad_inputs_t* in,
                                         const fh_linear_ce_grads_t* grads, void* workspace,
                                         size_t workspace_bytes);

/* ------------------------------------------------------------------------------------------ */
/* Distillation                                                                               */
/* ------------------------------------------------------------------------------------------ */
/* FH-SECTION-DISTILL-BEGIN (owned by the distillation work; keep this marker) */
/* FH-SECTION-DISTILL-END */

/* ------------------------------------------------------------------------------------------ */
/* Decoding                                                                                   */
/* ------------------------------------------------------------------------------------------ */
/* FH-SECTION-DECODE-BEGIN (owned by the decoding work; keep this marker) */
/* FH-SECTION-DECODE-END */

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FUSEDHEAD_H */
