/*
 * fusedhead: vocabulary-parallel heads. Part of the public API of fusedhead.h, which includes
 * this file (include fusedhead.h, not this file). The full description, with the derivation of
 * the merge rules and a worked torch.distributed example, is docs/distributed.md.
 *
 * Setting. P ranks (tensor-parallel ranks) each hold a contiguous slice of the vocabulary:
 * rank r holds classes [start_r, start_r + V_r), the slices in rank order cover [0, V) without
 * gaps, and sizes may differ (V need not be divisible by P). Each rank holds its rows of C and
 * bias; every rank holds the same E, targets, token weights and class weights (targets and class
 * weights are global: ids in [0, V), class_weights [V]).
 *
 * The library does no communication. A sharded op runs in steps; between them the caller moves
 * a small per-row buffer with its own engine (torch.distributed, NCCL, MPI). Every merge is done
 * by the library in rank order from an all-gather, never by a reduction inside the collective,
 * so the results are deterministic, do not depend on the collective's algorithm, and (for a row)
 * do not depend on the batch. With P = 1 every step reduces to the single-device op exactly.
 *
 * Collectives (bytes per row; "gather" = all-gather of the buffer into [P][N][width] in rank
 * order, each rank sending its own [N][width]; "sum" = all-reduce with the sum):
 *
 *   linear cross-entropy   forward   1 gather of FH_SHARD_LCE_PARTIAL doubles   72 B per rank
 *                          backward  1 sum of dE [N x D] (each rank's dE is its classes' part)
 *   distillation           forward   1 gather of FH_SHARD_DISTILL_STATS doubles  56 B per rank
 *                                    1 gather of FH_SHARD_DISTILL_DIV doubles    16 B per rank
 *                          backward  1 sum of dEs [N x D_s]
 *   decoding                         1 gather of FH_SHARD_DECODE_WIDTH(K) doubles  (10 + 2K)·8 B
 *
 * dC and dbias never need communication: each rank's are complete for its classes. dE is
 * written in E's dtype (as by the single-device backward), so with 16-bit E the all-reduce adds
 * P rounded parts; the bytes above count dE in E's dtype.
 *
 * Sequence or data parallelism over rows needs nothing from this file: rows are independent, so
 * each rank runs the single-device op on its rows (with opts.divisor set to the global token
 * count when a mean must span ranks).
 *
 * Backends: the CPU reference implements every call. The CUDA backend returns
 * FH_ERR_UNSUPPORTED from every call here in this version (no shard kernels yet).
 * Every partial buffer is fp64 in host memory. Statuses of the merge steps: FH_ERR_INVALID_ARGUMENT
 * (NULLs, sizes, nranks < 1, option ranges, targets), FH_ERR_UNSUPPORTED, FH_ERR_OUT_OF_MEMORY.
 */
#ifndef FUSEDHEAD_SHARD_H
#define FUSEDHEAD_SHARD_H

#ifndef FUSEDHEAD_H
#error "include fusedhead.h, not fusedhead_shard.h"
#endif

/* This rank's slice of the vocabulary. */
typedef struct fh_shard {
  int64_t class_start; /* global id of this rank's first class; >= 0 */
  int64_t V_local;     /* classes on this rank (rows of C); >= 0 */
  int64_t V_global;    /* V of the whole head; class_start + V_local <= V_global */
} fh_shard_t;

/* ------------------------------------------------------------------------------------------ */
/* Linear cross-entropy on a shard                                                            */
/* ------------------------------------------------------------------------------------------ */

/* Doubles per row of the forward's partial statistics, over the rank's classes, with z the
 * processed logit (scale, softcap) and r the raw one. The sums run over the rank's unmasked
 * classes only (r ≠ −inf: the masked-class rule of docs/conventions.md):
 *   [0] m = max z (−inf when the shard holds no unmasked class)
 *   [1] Z = Σ exp(z − m)       [2] F = Σ exp(z − m)(z − m)
 *   [3] Σ_j w_j z_j (w = class weights, 1 when none)
 *   [4] W_r = Σ_j w_j          [5] V_r = the number of unmasked classes
 *   [6] z of the target when this rank holds it (−inf when the target is masked), else 0: the
 *       merge adds the ranks' values, so the sum is the owner's (no −inf + inf can occur)
 *   [7] the largest r over all the rank's classes (first occurrence; NaN counts as largest)
 *   [8] its global id (−1: none)
 * Ignored rows hold zeros and −1. Merge (rank order): m = max m_r, Z = Σ Z_r e^(m_r − m),
 * F likewise, lse = m + ln Z, h = ln Z − F/Z, V_i = Σ V_r, W_i = Σ W_r; label smoothing uses
 * ε_i = α/V_i and W_i. A row with every class masked (Z = 0) gets lse −inf, entropy 0 and loss
 * +inf; a masked target gives loss +inf. */
#define FH_SHARD_LCE_PARTIAL 9

/* Step 1 of the forward, on each rank: E [N x D], C [V_local x D] and bias [1 x V_local] (this
 * rank's rows), targets [N] and class_weights [V_global] (or NULL) global, token_weights [N] or
 * NULL; options as fh_linear_ce_forward. Writes partials [N x FH_SHARD_LCE_PARTIAL].
 * Statuses: as fh_linear_ce_forward, plus FH_ERR_INVALID_ARGUMENT for a bad shard. */
FH_API fh_status_t fh_linear_ce_shard_forward(fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                              const fh_shard_t* shard, const fh_tensor_t* E, const fh_tensor_t* C,
                                              const fh_tensor_t* bias, const int64_t* targets,
                                              const float* class_weights, const float* token_weights,
                                              double* partials);

/* Step 2, on every rank after the all-gather: gathered [nranks][N][FH_SHARD_LCE_PARTIAL] in rank
 * order. Writes `out` exactly as fh_linear_ce_forward on the whole head would (loss, lse,
 * entropy, z_loss, argmax with global ids, accuracy), equal to it up to fp64 rounding of the
 * merge. dtype is E's dtype (it says whether the float arrays hold doubles: FH_DTYPE_F64). */
FH_API fh_status_t fh_linear_ce_shard_combine(fh_context_t* ctx, const fh_linear_ce_options_t* opts, fh_dtype_t dtype,
                                              int64_t N, int64_t V_global, int64_t nranks, const double* gathered,
                                              const int64_t* targets, const float* class_weights,
                                              const float* token_weights, const fh_linear_ce_outputs_t* out);

/* Backward on a shard: writes dC [V_local x D] and dbias [1 x V_local] for this rank's classes
 * (complete) and dE [N x D], this rank's part of ∂loss/∂E: sum dE over the ranks. gathered is
 * the forward's [nranks][N][FH_SHARD_LCE_PARTIAL] buffer (the one fh_linear_ce_shard_combine
 * read, kept by the caller): each row's global lse, entropy, V_i and W_i are merged from it in
 * fp64, as the single-device CPU backward recomputes them in fp64, so in->lse and in->entropy
 * are not read (may be NULL); in->grad_loss and in->grad_lse as fh_linear_ce_backward. Masked
 * classes get gradient exactly 0. Shapes and dtypes as fh_linear_ce_backward; options.accumulate
 * adds. */
FH_API fh_status_t fh_linear_ce_shard_backward(fh_context_t* ctx, const fh_linear_ce_options_t* opts,
                                               const fh_shard_t* shard, const fh_tensor_t* E, const fh_tensor_t* C,
                                               const fh_tensor_t* bias, const int64_t* targets,
                                               const float* class_weights, const float* token_weights,
                                               int64_t nranks, const double* gathered,
                                               const fh_linear_ce_grad_inputs_t* in, const fh_linear_ce_grads_t* grads);

/* ------------------------------------------------------------------------------------------ */
/* Distillation on a shard (dense teacher)                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Doubles per row of step 1's statistics: (m, Z) of s/T, of t/T and of s (the hard loss; 0, 0
 * when hard_weight == 0), then s of the target when this rank holds it, else 0. */
#define FH_SHARD_DISTILL_STATS 7
/* Doubles per row of step 2's partial sums: Σ_j q_j f(r_j) and Σ_j q_j a_j over the rank's
 * classes (see the Distillation section of fusedhead.h). */
#define FH_SHARD_DISTILL_DIV 2

/* Step 1: student and teacher heads hold this rank's classes (teacher C may have more rows than
 * V_local, as V_t >= V; the first V_local are used), targets [N] global or NULL. Writes
 * stats [N x FH_SHARD_DISTILL_STATS]. The sparse teacher is not supported on a shard. */
FH_API fh_status_t fh_distill_shard_stats(fh_context_t* ctx, const fh_distill_options_t* opts, const fh_shard_t* shard,
                                          const fh_distill_head_t* student, const fh_distill_head_t* teacher,
                                          const int64_t* targets, double* stats);

/* Step 2, after the all-gather of step 1: gathered_stats [nranks][N][FH_SHARD_DISTILL_STATS].
 * Writes div [N x FH_SHARD_DISTILL_DIV] for this rank's classes. */
FH_API fh_status_t fh_distill_shard_divergence(fh_context_t* ctx, const fh_distill_options_t* opts,
                                               const fh_shard_t* shard, const fh_distill_head_t* student,
                                               const fh_distill_head_t* teacher, const int64_t* targets,
                                               int64_t nranks, const double* gathered_stats, double* div);

/* Step 3, after the all-gather of step 2 (gathered_div [nranks][N][FH_SHARD_DISTILL_DIV]):
 * writes `out` as fh_distill_forward would (loss, row_state, soft_loss, hard_loss). dtype is
 * the student's (FH_DTYPE_F64: the float arrays hold doubles). */
FH_API fh_status_t fh_distill_shard_combine(fh_context_t* ctx, const fh_distill_options_t* opts, fh_dtype_t dtype,
                                            int64_t N, int64_t nranks, const double* gathered_stats,
                                            const double* gathered_div, const int64_t* targets,
                                            const fh_distill_outputs_t* out);

/* Backward on a shard: dC, dbias of this rank's classes (complete) and this rank's part of dE
 * (sum it over the ranks). gathered_stats and gathered_div are the all-gathered buffers that
 * step 3 read (kept by the caller): the global row state is merged from them in
 * fp64, as the single-device CPU backward recomputes it in fp64, so in->row_state is not read
 * (may be NULL); in->grad_loss as fh_distill_backward. Masked student classes (logit −inf) get
 * gradient exactly 0. */
FH_API fh_status_t fh_distill_shard_backward(fh_context_t* ctx, const fh_distill_options_t* opts,
                                             const fh_shard_t* shard, const fh_distill_head_t* student,
                                             const fh_distill_head_t* teacher, const int64_t* targets,
                                             int64_t nranks, const double* gathered_stats,
                                             const double* gathered_div, const fh_distill_grad_inputs_t* in,
                                             const fh_distill_grads_t* grads);

/* ------------------------------------------------------------------------------------------ */
/* Decoding on a shard                                                                        */
/* ------------------------------------------------------------------------------------------ */
/*
 * Each rank reports, per row, its softmax statistics, its K best tokens by s = z/T (ties by lowest
 * id) and the winner of the keyed Gumbel race over its finite tokens with its key s_v + g_v. The
 * noise g_v depends only on (seed, offset, global id v) (Decoding section of fusedhead.h), and
 * each rank computes s_v exactly as the single-device op does, so the merge picks bitwise the
 * token fh_decode_fused (or fh_decode_from_logits) picks on the whole head:
 *   - greedy (T = 0): the lowest id among maximal z;
 *   - plain sampling (no truncation): the largest key of the ranks' winners, ties to the lowest id;
 *   - top-k (k <= K), min-p, then top-p: the allowed set from the merged candidates, the keyed race
 *     over it. When a rank's K candidates cannot prove the set (ties at its K-th value, or a min-p
 *     threshold below it) the merge returns FH_ERR_UNSUPPORTED naming the row: run again with a
 *     larger K (the result is the same on every rank, so every rank retries together).
 * Supported: FH_DECODE_STANDARD, with top-p only after top-k or min-p (it sums over their
 * survivors, which the candidates then hold exactly; top-p alone and the other samplers need the
 * mass of tokens no rank listed: FH_ERR_UNSUPPORTED), sparse logit bias and bans (global ids, each
 * rank applies those in its slice), per-row parameters. Outputs: tokens, logprob, full_logprob, lse,
 * entropy, allowed_count, flags, and top-n when num_logprobs <= K; rank must be NULL. lse,
 * entropy and log-probabilities equal the single-device values to fp64 rounding (merged sums),
 * rounded once to fp32; tokens and top-n ids are exact.
 */

/* Doubles per row: [0..2] m, Z, F of s over the rank's finite tokens, [3] their count, [4] flags
 * (1: a NaN, 2: a +inf), [5] the winner's key, [6] its global id (−1: none), [7] its s, [8] the
 * number n of candidates, [9] V_local, then K (s, global id) pairs, the first n valid. */
#define FH_SHARD_DECODE_WIDTH(K) (10 + 2 * (K))

/* Step 1: H [B x D], C [V_local x D] and bias [1 x V_local] or NULL (this rank's rows); options as
 * fh_decode_fused with global ids. Writes partials [B x FH_SHARD_DECODE_WIDTH(K)], K >= 1. */
FH_API fh_status_t fh_decode_shard_candidates(fh_context_t* ctx, const fh_decode_options_t* opts,
                                              const fh_shard_t* shard, const fh_tensor_t* H, const fh_tensor_t* C,
                                              const fh_tensor_t* bias, int64_t K, double* partials);

/* Step 1 from this rank's logits [B x V_local] (fp32, fp16 or bf16, row stride honoured), as
 * fh_decode_from_logits; the same partials. */
FH_API fh_status_t fh_decode_shard_candidates_from_logits(fh_context_t* ctx, const fh_decode_options_t* opts,
                                                          const fh_shard_t* shard, const fh_tensor_t* logits,
                                                          int64_t K, double* partials);

/* Step 2, after the all-gather: gathered [nranks][B][FH_SHARD_DECODE_WIDTH(K)] in rank order. */
FH_API fh_status_t fh_decode_shard_combine(fh_context_t* ctx, const fh_decode_options_t* opts, int64_t B,
                                           int64_t V_global, int64_t nranks, int64_t K, const double* gathered,
                                           const fh_decode_outputs_t* out);

#endif /* FUSEDHEAD_SHARD_H */
