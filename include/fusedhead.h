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
 *   - Every compute call takes caller-owned workspace and has a *_workspace_size query. On
 *     every backend a non-empty workspace (workspace_bytes > 0) must be non-NULL and
 *     FH_WORKSPACE_ALIGNMENT-byte aligned (cudaMalloc and framework allocators are);
 *     FH_ERR_INVALID_ARGUMENT otherwise. The CPU backend is a reference implementation: it
 *     reports 0 bytes of workspace and allocates its O(N + V + D) temporaries itself
 *     (FH_ERR_OUT_OF_MEMORY when that fails).
 *   - Masked classes: a class whose logit (after bias, before any softcap) is -inf has p = 0
 *     and contributes 0 to every sum (lse, entropy, label smoothing, z-loss, divergences); its
 *     gradient is exactly 0 (even when C holds the infinities). A target whose logit is -inf
 *     gives loss +inf, as PyTorch. NaN and +inf propagate. docs/conventions.md has the details.
 *   - Options structs carry `struct_size` and are set up by their *_options_init(); fields are
 *     only ever appended, so a caller compiled against an older header keeps working.
 *   - CUDA backend calls are asynchronous on the context's stream: they return once enqueued
 *     and never synchronize the host. Data-dependent errors found on the device (a target out
 *     of range) raise a device flag that the next call on the context, or fh_context_check(),
 *     returns as FH_ERR_INVALID_ARGUMENT.
 *   - The CPU backend is synchronous and thread-safe for distinct outputs; it runs OpenMP
 *     teams of fh_context_set_num_threads threads (default: OpenMP's).
 * Math, sources and exact semantics of every op and option: docs/ (docs/architecture.md first).
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

/* ---- Version ----------------------------------------------------------------------------- */

#define FH_VERSION_MAJOR 0
#define FH_VERSION_MINOR 1
#define FH_VERSION_PATCH 0
/* MAJOR * 10000 + MINOR * 100 + PATCH */
#define FH_VERSION_NUMBER (FH_VERSION_MAJOR * 10000 + FH_VERSION_MINOR * 100 + FH_VERSION_PATCH)

/* The version of the library actually linked, as "MAJOR.MINOR.PATCH". */
FH_API const char* fh_version(void);
/* The same as a number, FH_VERSION_NUMBER of the linked library. */
FH_API int fh_version_number(void);

/* ---- Status ------------------------------------------------------------------------------ */

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

/* ---- Context ----------------------------------------------------------------------------- */

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
/* Threads of the CPU backend's parallel loops for calls on this context: num_threads >= 1, or
 * 0 (default) for OpenMP's default (OMP_NUM_THREADS). Results do not depend on it. The CUDA
 * backend stores and ignores it. The PyTorch binding sets torch.get_num_threads() per call.
 * Statuses: FH_ERR_INVALID_ARGUMENT (ctx or num_threads NULL, num_threads < 0). */
FH_API fh_status_t fh_context_set_num_threads(fh_context_t* ctx, int num_threads);
FH_API fh_status_t fh_context_get_num_threads(const fh_context_t* ctx, int* num_threads);
/* Return, and clear, a data-dependent error that a kernel raised on the device (for example
 * a target outside [0, V)). Synchronizes the context's stream. CPU backend: FH_SUCCESS. */
FH_API fh_status_t fh_context_check(fh_context_t* ctx);

/* ---- Tensors ----------------------------------------------------------------------------- */

typedef enum fh_dtype {
  FH_DTYPE_F32 = 0,  /* IEEE binary32 */
  FH_DTYPE_F16 = 1,  /* IEEE binary16 */
  FH_DTYPE_BF16 = 2, /* bfloat16: the upper 16 bits of a binary32 */
  FH_DTYPE_F64 = 3,  /* IEEE binary64: CPU backend only (FH_ERR_UNSUPPORTED on CUDA), for
                        checking against float64 frameworks (gradcheck). With fp64 inputs the
                        per-row and scalar float arrays of the ops with gradients are double
                        instead of float (pass a double* cast to the float* field): linear
                        cross-entropy's outputs, weights and backward inputs; distillation's
                        outputs, row_state and grad_loss, keyed on the student's dtype (sparse
                        teacher logprobs stay fp32). Decoding and fh_rows_logsumexp keep fp32. */
  FH_DTYPE_COUNT
} fh_dtype_t;

/* Size in bytes of one element, 0 for an out-of-range dtype. */
FH_API size_t fh_dtype_size(fh_dtype_t dtype);

/* A row-major matrix: element (r, c) is at data + (r * row_stride + c) * dtype_size.
 * rows >= 0, cols >= 0, row_stride >= cols; data may be NULL only when rows * cols == 0.
 * A vector (a bias) is a 1 x n tensor. Inputs are passed as const fh_tensor_t* and never
 * written; `data` is non-const so one type serves inputs and outputs.
 *
 * Fast path (CUDA, docs/engine.md "Alignment"): matrix operands (E, C, H) load by 16-byte async
 * copies when `data` is 16-byte aligned and row_stride * dtype_size is a multiple of 16 (dense
 * bf16/fp16 with cols % 8 == 0, fp32 with cols % 4 == 0); backwards also need D % 8 == 0 and
 * dE, dC aligned alike. Other layouts take a slower element-load path with bitwise equal results. */
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
 * and rounds once into the output dtype). Costs, workspace and accuracy of each mode are in
 * docs/linear_ce.md ("Accumulation modes"); with fp32 gradient outputs every mode accumulates
 * directly in the outputs.
 *   FH_ACCUM_FP32 (default): one recompute of the logits (6·N·V·D FLOPs before the filter);
 *     dC, dbias summed in fp32 by one owner block each ("split fp32" for 16-bit outputs), dE by
 *     fp32 atomics into an fp32 copy. Reproducible except the order of dE's atomic additions.
 *   FH_ACCUM_OUTPUT_DTYPE (low memory): O(N) workspace, dE and dC added in the output dtype
 *     (about 10x the error of fp32 accumulation for bf16), deterministic.
 *   FH_ACCUM_DETERMINISTIC: bitwise identical results run to run, fp32-accurate; the logits
 *     are recomputed twice (8·N·V·D FLOPs). */
typedef enum fh_accum_mode {
  FH_ACCUM_FP32 = 0,
  FH_ACCUM_OUTPUT_DTYPE = 1,
  FH_ACCUM_DETERMINISTIC = 2,
  FH_ACCUM_MODE_COUNT
} fh_accum_mode_t;

/* Required alignment, in bytes, of a non-empty workspace (FH_ERR_INVALID_ARGUMENT otherwise). */
#define FH_WORKSPACE_ALIGNMENT 16

/* filter_eps value meaning "machine epsilon of the input dtype / 32" (2^-12 bf16, 2^-15
 * fp16, 2^-28 fp32), as Cut Cross-Entropy's "auto". */
#define FH_FILTER_EPS_AUTO (-1.0f)

/* ---- Row statistics ---------------------------------------------------------------------- */

/* lse[i] = log Σ_j exp(logits[i][j]) for logits [N x V] (fp32, fp16 or bf16, row stride
 * honoured), written as fp32 [N]. A row whose entries are all -inf gives -inf; NaN anywhere in
 * a row gives NaN; +inf gives +inf. V = 0 gives -inf (the empty sum). No workspace.
 * Statuses: FH_ERR_INVALID_ARGUMENT, FH_ERR_UNSUPPORTED, FH_ERR_CUDA. */
FH_API fh_status_t fh_rows_logsumexp(fh_context_t* ctx, const fh_tensor_t* logits, float* lse);

/* ---- Linear cross-entropy ---------------------------------------------------------------- */
/*
 * loss = CE(z, targets) with, for row i and class j,
 *     r_ij = E_i · C_j + bias_j                       E [N x D], C [V x D], bias [1 x V]
 *     s_ij = logit_scale · r_ij                       (scale, i.e. 1 / temperature, first)
 *     z_ij = softcap · tanh(s_ij / softcap)           (only when softcap > 0)
 *     lse_i = log Σ_j exp(z_ij),  p_ij = exp(z_ij − lse_i),  h_i = −Σ_j p_ij log p_ij
 * Row i is valid when targets[i] != ignore_index; valid targets must lie in [0, V).
 * Sums over j run over the row's unmasked classes (r_ij > -inf), V_i of them; with
 * α = label_smoothing, ε = α / V_i, class weights w (all 1 when NULL, W = Σ_j w_j),
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
 *   - Each part of the mean over a zero denominator is 0, with zero gradient, not NaN
 *     (PyTorch gives NaN): so every row ignored, or all weights 0, gives loss 0 and zero
 *     gradients, because a padding-only micro-batch must not poison an accumulated step
 *     (Liger and torchtune's LinearCrossEntropyLoss also return 0). When only D_ce is 0
 *     (every valid target has class weight 0), the z-loss and entropy parts keep their mean.
 *   - The z-loss is part of `loss` and its gradient; `z_loss` reports the λ lse² part alone,
 *     with the same reduction and denominator D_reg.
 *   - NaN or +inf in a valid row's logits propagates to that row's loss, lse and gradients (and
 *     so to a mean or sum); it never crashes or reads out of bounds. Ignored rows are never
 *     read, so NaN there does not propagate. -inf masks the class (conventions above): the
 *     smoothing term is PyTorch's on the vocabulary without the row's masked classes (PyTorch
 *     itself gives +inf there); a row with every class masked has lse -inf, entropy 0, loss
 *     +inf and zero gradients.
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
                                  filter off. A logit tile is skipped when every |p − δ| in it
                                  is below the threshold (CCE's rule). Ignored by the CPU
                                  reference; the CUDA backend turns it off when
                                  label_smoothing or entropy_weight != 0 (their gradient terms
                                  are not bounded by p, so skipping would drop them) */
  int filter_e_grad;           /* default 1: the filter may skip tiles for dE */
  int filter_c_grad;           /* default 1: the filter may skip tiles for dC and dbias */
  fh_accum_mode_t accum_mode;  /* default FH_ACCUM_FP32 (CUDA backend) */
  int accumulate;              /* default 0: the backward overwrites dE, dC, dbias; 1 adds into
                                  them (tied input/output embeddings) */
} fh_linear_ce_options_t;

/* Fill `opts` with the defaults above. */
FH_API void fh_linear_ce_options_init(fh_linear_ce_options_t* opts);

/* Forward outputs. Each pointer is a buffer of the context's kind (host or device), fp32
 * (double with FH_DTYPE_F64 inputs, as are class_weights, token_weights and the backward's
 * lse, entropy, grad_loss, grad_lse), except argmax. NULL means "not wanted", except `loss`. */
typedef struct fh_linear_ce_outputs {
  float* loss;      /* required: [1] for mean/sum, [N] for none */
  float* lse;       /* [N]: lse_i, 0 at ignored rows; the backward needs it */
  float* entropy;   /* [N]: h_i, 0 at ignored rows; the backward needs it when η != 0 */
  float* z_loss;    /* [1] or [N] (as loss): the λ lse² part of the loss */
  int64_t* argmax;  /* [N]: first index of the row's maximum raw logit r (the order of z, but
                       ties that a saturating softcap creates are broken by r; NaN counts as
                       the maximum), -1 at ignored rows */
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
  const float* lse;       /* required: [N] from the forward with the same options (recomputed
                             with entropy by the CPU backend for non-fp64 inputs and by CUDA
                             for fp32: docs/linear_ce.md "Precision") */
  const float* entropy;   /* [N] from the forward; required when entropy_weight != 0 */
  const float* grad_loss; /* required: [1] for mean/sum, [N] for none (upstream gradient) */
  const float* grad_lse;  /* [N] upstream gradient of the lse output, or NULL (a user-side
                             z-loss): adds grad_lse_i · p_ij to ∂/∂z_ij of valid rows. It is
                             the gradient of the lse output itself, so token weights do not
                             scale it. */
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
 * (ε and W per row, over unmasked classes; 0 for masked classes)
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

/* ---- Distillation ------------------------------------------------------------------------ */
/* FH-SECTION-DISTILL-BEGIN (owned by the distillation work; keep this marker) */
/*
 * Knowledge distillation: an f-divergence between a teacher head and a student head, with
 * gradients for the student only. Per row i (N rows) and class j in [0, V):
 *     s_ij = Es_i · Cs_j + bs_j        student: Es [N x D_s], Cs [V x D_s], bs [1 x V]
 *     t_ij = Et_i · Ct_j + bt_j        teacher: Et [N x D_t], Ct [V_t x D_t], bt [1 x V_t]
 *     Q_i = softmax_j(s_ij / T),  P_i = softmax_j(t_ij / T)   (both over j < V only)
 *     X = log Q, Y = log P, r = P / Q = exp(Y − X)
 * Each divergence is D(P‖Q) = Σ_j q_j f(r_j) for a convex f with f(1) = 0, and
 *     ∂D/∂(s_j / T) = q_j (a_j − Σ_k q_k a_k),   a = f(r) − r f′(r),
 * so a divergence is an (f, a) pair (a matters only up to an additive constant):
 *   FORWARD_KL        KL(P‖Q) = Σ p log(p/q)             f = r ln r            a = −r
 *   REVERSE_KL        KL(Q‖P) = Σ q log(q/p)             f = −ln r             a = 1 − ln r
 *   JSD (β = beta)    β KL(P‖M) + (1−β) KL(Q‖M), M = βP + (1−β)Q
 *                     f = β r ln(r/w) − (1−β) ln w, w = βr + 1 − β;   a = −(1−β) ln w
 *                     At β ∈ {0, 1} this is identically 0. jsd_endpoints picks what β = 0 and
 *                     β = 1 mean: FH_DISTILL_JSD_ENDPOINTS_KL (default, Liger's convention:
 *                     β = 0 is KL(P‖Q), β = 1 is KL(Q‖P); discontinuous in β, but a caller
 *                     asking for an endpoint wants a KL, not a loss that is 0 whatever the
 *                     heads are) or FH_DISTILL_JSD_ENDPOINTS_PLAIN (the formula: 0, zero
 *                     gradient). JSD_SCALED is the continuous alternative.
 *   JSD_SCALED        JSD(β) / (β(1−β)), β in [0, 1]: continuous on [0, 1] because
 *                     JSD(β) = β KL(P‖Q) + O(β²) and (1−β) KL(Q‖P) + O((1−β)²); its values at
 *                     β = 0 and 1 are those limits, KL(P‖Q) and KL(Q‖P).
 *   TVD               ½ Σ |p − q|                         f = ½|r − 1|          a = −½ sign(r − 1)
 *                     The subgradient at p_j = q_j uses sign(0) = 0 (the midpoint of [−1, 1], and
 *                     what makes the gradient 0 when teacher = student).
 *   SKEW_FORWARD_KL   KL(P ‖ λP + (1−λ)Q), λ = skew        f = r ln(r/w), w = λr + 1 − λ
 *                                                         a = −(1−λ) r / w
 *   SKEW_REVERSE_KL   KL(Q ‖ λQ + (1−λ)P)                 f = −ln w′, w′ = λ + (1−λ) r
 *                                                         a = −ln w′ + (1−λ) r / w′
 *                     (λ = 0 gives the plain KLs, λ = 1 gives 0.)
 *   ALPHA (Amari)     (1 − Σ p^α q^(1−α)) / (α(1−α)),  f = (r^α − 1 − α(r − 1)) / (α(α−1)),
 *                     a = (1 − r^α) / α. Any finite α; α = 0 is KL(Q‖P) and α = 1 is KL(P‖Q)
 *                     exactly (the limits, evaluated with expm1(αd)/α → d, not special cases
 *                     that jump), and values near 0 or 1 are accurate (no 1/α cancellation).
 *   HELLINGER         ALPHA at α = ½:  4(1 − Σ √(pq)) = 2 Σ (√p − √q)²  (4× the squared
 *                     Hellinger distance 1 − Σ √(pq); the family's normalization).
 *   CHI_SQUARE        ALPHA at α = 2:  ½ (Σ p²/q − 1) = ½ Σ (p − q)²/q  (half Pearson χ²(P‖Q)).
 * Ratios are evaluated in log space (exp of differences of X and Y, log1p/expm1 forms), so
 * q or p underflowing to 0 gives the right limit instead of 0·∞.
 *
 * Loss. With κ = T² when scale_by_t_squared, else 1, each valid row has
 *     soft_i = κ D(P_i‖Q_i),   hard_i = lse_j(s_ij) − s_{i,y_i}   (untempered student CE)
 *     loss_i = hard_weight · hard_i + soft_weight · soft_i
 * Row i is valid when targets is NULL or targets[i] != ignore_index. Reductions: none writes
 * loss_i (0 at ignored rows); sum Σ loss_i; mean Σ loss_i / N_valid (or / divisor when
 * divisor > 0). Gradient: ∂loss_i/∂s_ij = soft_weight κ (1/T) q_j (a_j − Σ q a)
 * + hard_weight (softmax(s_i)_j − δ_{j,y_i}), times the row's upstream factor; then
 * dEs = G·Cs, dCs = Gᵀ·Es, dbs_j = Σ_i G_ij.
 * Decisions, each with its reason:
 *   - scale_by_t_squared defaults to 1 (Hinton et al.): probability differences shrink like
 *     1/T, so without T² the soft gradient falls like 1/T² and every change of T would need a
 *     new soft_weight. Liger applies no T²; set 0 for parity with it.
 *   - soft_weight 1, hard_weight 0 by default: the default loss is the divergence itself and
 *     targets may be NULL. (Liger's chunked trainer uses 0.5 / 0.5; set them explicitly.)
 *   - V_t > V: the teacher's columns j >= V are never read and P is renormalized over the
 *     shared V (softmax over t_i0 .. t_i,V−1). Zero-padding the student instead (Liger PR #634)
 *     gives the padded ids mass in Q, and −inf padding makes KL(P‖Q) infinite.
 *   - Every row ignored (or N = 0): loss 0 and zero gradients, not NaN (a padding-only micro-batch
 *     must not poison an accumulated step; Liger's clamp_min(1) gives the same).
 *   - targets, when given, must hold ignore_index or a class in [0, V) (checked on the host by
 *     the CPU backend) even when hard_weight is 0; targets NULL needs hard_weight == 0.
 *   - NaN or Inf in a valid row propagates to that row's loss, state and gradients; ignored rows
 *     are never read.
 *   - The teacher gets no gradient; its dtype may differ from the student's (each head's E, C
 *     and bias share one dtype); D_t and D_s are independent.
 *
 * Sparse (offline) teacher: fh_distill_sparse_forward/backward take, instead of a teacher head,
 * K ids [N x K] int64 (in [0, V), no duplicates in a valid row; order irrelevant) and their
 * log-probabilities [N x K] fp32 at temperature 1 (what serving engines return). With S the ids
 * of a row and q_R = Σ_{j∉S} q_j (full semantics: docs/distillation.md "Sparse teacher"):
 *   RENORMALIZE (default): P is the tempered teacher conditioned on S (p ∝ exp(logp/T) on S,
 *     0 off it; exact for every T). D(P‖Q) over all V; the classes off S add q_R f(0), so
 *     divergences with f(0) = +∞ (REVERSE_KL, SKEW_REVERSE_KL at λ = 0, ALPHA at α <= 0, JSD
 *     endpoints meaning KL(Q‖P)) would be +∞ for every student with mass off S: they are
 *     FH_ERR_UNSUPPORTED here (REMAINDER defines them).
 *   REMAINDER: T == 1, p = exp(logp) on S, ρ = max(0, 1 − Σ_S p) (Σ_S p <= 1 + 1e-3): D of P
 *     and Q coarsened to S ∪ {rest}, the rest holding ρ against q_R. Every divergence.
 *   NONE: T == 1, FORWARD_KL only (else FH_ERR_UNSUPPORTED: no distribution to compare):
 *     D = Σ_{j∈S} p_j (log p_j − log q_j), p_j = exp(logp_j) as given, log q_j = u_j − lse over
 *     all V (Megatron/verl/NeMo-RL-style top-K distillation: cross-entropy restricted to S, not
 *     a divergence: min π log π < 0 at q = p/π on S, π = Σ_S p); ∂D/∂u_j = q_j π − p_j [j ∈ S].
 * Off S, ∂D/∂u_j = q_j (a_R − Σqa), a_R = a(ρ/q_R) (ρ = 0: RENORMALIZE); state slot 1 holds a_R.
 * CUDA checks the device arrays on the device (ids in range, unrepeated; no NaN or +inf; a finite
 * one; remainder mass): a bad row is skipped and fh_context_check() gives INVALID_ARGUMENT.
 */

typedef enum fh_distill_divergence {
  FH_DISTILL_FORWARD_KL = 0,
  FH_DISTILL_REVERSE_KL = 1,
  FH_DISTILL_JSD = 2,
  FH_DISTILL_JSD_SCALED = 3,
  FH_DISTILL_TVD = 4,
  FH_DISTILL_SKEW_FORWARD_KL = 5,
  FH_DISTILL_SKEW_REVERSE_KL = 6,
  FH_DISTILL_ALPHA = 7,
  FH_DISTILL_HELLINGER = 8,
  FH_DISTILL_CHI_SQUARE = 9,
  FH_DISTILL_DIVERGENCE_COUNT
} fh_distill_divergence_t;

typedef enum fh_distill_jsd_endpoints {
  FH_DISTILL_JSD_ENDPOINTS_KL = 0,    /* Liger: β = 0 → KL(P‖Q), β = 1 → KL(Q‖P) */
  FH_DISTILL_JSD_ENDPOINTS_PLAIN = 1, /* the formula: 0 at β ∈ {0, 1} */
  FH_DISTILL_JSD_ENDPOINTS_COUNT
} fh_distill_jsd_endpoints_t;

typedef enum fh_distill_sparse_mass {
  FH_DISTILL_SPARSE_RENORMALIZE = 0,
  FH_DISTILL_SPARSE_REMAINDER = 1,
  FH_DISTILL_SPARSE_NONE = 2,
  FH_DISTILL_SPARSE_MASS_COUNT
} fh_distill_sparse_mass_t;

typedef struct fh_distill_options {
  size_t struct_size;                       /* sizeof(fh_distill_options_t), set by init */
  fh_distill_divergence_t divergence;       /* default FH_DISTILL_FORWARD_KL */
  float beta;                               /* default 0.5; JSD, JSD_SCALED; in [0, 1] */
  fh_distill_jsd_endpoints_t jsd_endpoints; /* default FH_DISTILL_JSD_ENDPOINTS_KL (JSD only) */
  float skew;                               /* default 0.1 (λ); SKEW_*; in [0, 1] */
  float alpha;                              /* default 0.5; ALPHA; finite */
  float temperature;                        /* default 1 (T); finite and > 0 */
  int scale_by_t_squared;                   /* default 1: soft loss × T² */
  float soft_weight;                        /* default 1; finite */
  float hard_weight;                        /* default 0; finite; != 0 needs targets */
  int64_t ignore_index;                     /* default -100 */
  fh_reduction_t reduction;                 /* default FH_REDUCTION_MEAN */
  float divisor;                            /* default 0 (N_valid); > 0 replaces the mean's
                                               denominator (a global token count) */
  fh_distill_sparse_mass_t sparse_mass;     /* default FH_DISTILL_SPARSE_RENORMALIZE */
  fh_accum_mode_t accum_mode;               /* default FH_ACCUM_FP32 (CUDA backend) */
  int accumulate;                           /* default 0: the backward overwrites dE, dC,
                                               dbias; 1 adds into them */
} fh_distill_options_t;

/* Fill `opts` with the defaults above. */
FH_API void fh_distill_options_init(fh_distill_options_t* opts);

/* One head: E [N x D], C [V x D] and bias [1 x V] (or NULL), one dtype. */
typedef struct fh_distill_head {
  const fh_tensor_t* E;
  const fh_tensor_t* C;
  const fh_tensor_t* bias;
} fh_distill_head_t;

/* A sparse teacher: ids and logprobs are [N x K] row-major (row stride K), K >= 1. */
typedef struct fh_distill_sparse_teacher {
  const int64_t* ids;
  const float* logprobs;
  int64_t K;
} fh_distill_sparse_teacher_t;

/* Floats per row in the forward's state (fp32, [N x FH_DISTILL_ROW_STATE], 0 at ignored rows):
 * [0] student lse of s/T, [1] teacher lse of t/T over the shared V (sparse: see above),
 * [2] Σ_j q_j a_j (for the additive constant of a the implementation chose: pass the state back
 * unchanged, do not interpret it), [3] student lse of s (0 when hard_weight == 0). */
#define FH_DISTILL_ROW_STATE 4

typedef struct fh_distill_outputs {
  float* loss;      /* required: [1] for mean/sum, [N] for none */
  float* row_state; /* [N x FH_DISTILL_ROW_STATE] or NULL; the backward needs it */
  float* soft_loss; /* [1] or [N] (as loss) or NULL: the reduced soft_i (κ D, unweighted) */
  float* hard_loss; /* [1] or [N] (as loss) or NULL: the reduced hard_i (unweighted); 0 when
                       hard_weight == 0 (it is computed only when it is part of the loss) */
} fh_distill_outputs_t;                     /* so loss = hard_weight·hard_loss + soft_weight·soft_loss */

typedef struct fh_distill_grad_inputs {
  const float* row_state; /* required: from the forward with the same inputs and options */
  const float* grad_loss; /* required: [1] for mean/sum, [N] for none */
} fh_distill_grad_inputs_t;

/* Student gradients, each in the dtype and shape of its input, or NULL / data NULL when not
 * wanted. They must not alias any input. */
typedef struct fh_distill_grads {
  fh_tensor_t* dE;
  fh_tensor_t* dC;
  fh_tensor_t* dbias;
} fh_distill_grads_t;

/* Problem shape for the workspace queries. K = 0: dense teacher (V_t, D_t, dtype_t used);
 * K > 0: sparse teacher with K ids per row. */
typedef struct fh_distill_shape {
  int64_t N, V, D_s, V_t, D_t, K;
  fh_dtype_t dtype_s, dtype_t;
} fh_distill_shape_t;

/* Workspace in bytes (0 on the CPU backend). CUDA backend, dense teacher (docs/distillation_cuda.md):
 * forward 256 + 32 N + 28 N S bytes (each piece rounded up to 256 B; S = min(ceil(V / 128), 16)
 * vocabulary splits), no N x V term: 3.75 MiB at N = 8192, V = 128256. Backward: 256 + 28 N plus
 * the gradient accumulators of the linear CE backward's accumulation modes for dE [N x D_s] and
 * dC [V x D_s] (fh_accum_mode_t; 0 for fp32 gradients and FH_ACCUM_OUTPUT_DTYPE). Sparse
 * teacher: forward + 4 N K, backward + 8 N K bytes (per entry fp32 values; int32 ids). fp64
 * heads and a teacher dtype other than the student's: FH_ERR_UNSUPPORTED on CUDA. */
FH_API fh_status_t fh_distill_forward_workspace_size(fh_context_t* ctx, const fh_distill_options_t* opts,
                                                     const fh_distill_shape_t* shape, size_t* bytes);
FH_API fh_status_t fh_distill_backward_workspace_size(fh_context_t* ctx, const fh_distill_options_t* opts,
                                                      const fh_distill_shape_t* shape, size_t* bytes);

/* Forward pass (dense teacher). teacher->C has V_t >= V rows; targets [N] int64 or NULL.
 * Outputs must not alias inputs or each other.
 * Statuses: FH_ERR_INVALID_ARGUMENT (NULLs, shapes, dtypes, strides, option ranges, targets),
 * FH_ERR_UNSUPPORTED (CUDA backend: fp64 heads, or teacher dtype != student dtype),
 * FH_ERR_INSUFFICIENT_WORKSPACE, FH_ERR_OUT_OF_MEMORY. */
FH_API fh_status_t fh_distill_forward(fh_context_t* ctx, const fh_distill_options_t* opts,
                                      const fh_distill_head_t* student, const fh_distill_head_t* teacher,
                                      const int64_t* targets, const fh_distill_outputs_t* out,
                                      void* workspace, size_t workspace_bytes);

/* Backward pass: student gradients of the loss above times grad_loss (teacher as in the
 * forward). Same statuses. */
FH_API fh_status_t fh_distill_backward(fh_context_t* ctx, const fh_distill_options_t* opts,
                                       const fh_distill_head_t* student, const fh_distill_head_t* teacher,
                                       const int64_t* targets, const fh_distill_grad_inputs_t* in,
                                       const fh_distill_grads_t* grads, void* workspace,
                                       size_t workspace_bytes);

/* Sparse-teacher forward and backward (see above); otherwise as the dense calls. */
FH_API fh_status_t fh_distill_sparse_forward(fh_context_t* ctx, const fh_distill_options_t* opts,
                                             const fh_distill_head_t* student,
                                             const fh_distill_sparse_teacher_t* teacher,
                                             const int64_t* targets, const fh_distill_outputs_t* out,
                                             void* workspace, size_t workspace_bytes);
FH_API fh_status_t fh_distill_sparse_backward(fh_context_t* ctx, const fh_distill_options_t* opts,
                                              const fh_distill_head_t* student,
                                              const fh_distill_sparse_teacher_t* teacher,
                                              const int64_t* targets, const fh_distill_grad_inputs_t* in,
                                              const fh_distill_grads_t* grads, void* workspace,
                                              size_t workspace_bytes);
/* FH-SECTION-DISTILL-END */

/* ---- Decoding ---------------------------------------------------------------------------- */
/* FH-SECTION-DECODE-BEGIN (owned by the decoding work; keep this marker) */
/* Samplers fused with the head, from logits, top-k: in their own installed file. */
#include "fusedhead_decode.h"
/* FH-SECTION-DECODE-END */

/* ---- Vocabulary-parallel heads ----------------------------------------------------------- */
/* FH-SECTION-SHARD-BEGIN (owned by the vocabulary-parallel work; keep this marker) */
/* Per-row partials, their merge in rank order, backward on a shard: in its own installed file. */
#include "fusedhead_shard.h"
/* FH-SECTION-SHARD-END */

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FUSEDHEAD_H */
