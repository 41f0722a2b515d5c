/*
 * fusedhead: decoding (sampling from the LM head). Part of the public API of fusedhead.h, which
 * includes this file (include fusedhead.h, not this file). The semantics of every sampler, the
 * random keys and the CUDA backend's fused path are described in docs/decoding.md.
 */
#ifndef FUSEDHEAD_DECODE_H
#define FUSEDHEAD_DECODE_H

/*
 * Decoding: the next token of B rows, from given logits [B x V] or fused with the LM head
 * (z_bv = H_b · C_v + bias_v, H [B x D], C [V x D], bias [1 x V]; the CPU reference computes each
 * logit as one fp64 dot product of the exact inputs). Per row b, in this order:
 *   1. z ← logits; z_id += value for every (id, value) of the row's sparse logit bias (repeated
 *      ids add up, in list order); z_id ← −inf for every banned id (bans win over bias).
 *   2. Degenerate row: z holds a NaN or +inf, or every z is −inf (e.g. all ids banned). Result:
 *      token = opts.degenerate_token (default −1: any in-range id would be a silently wrong token),
 *      flag FH_DECODE_FLAG_DEGENERATE, logprob/full_logprob/entropy NaN, rank 0, allowed_count 0,
 *      lse as fh_rows_logsumexp (NaN / +inf / −inf), top-n ids −1 and logprobs NaN. Never a crash.
 *   3. T = temperature. T == 0: greedy (below). T > 0: s = z / T. (vLLM treats T < 1e-5 as greedy;
 *      here every T > 0 is the real tempered distribution, which is well defined in fp64; pass 0
 *      for greedy.) Statistics: m = max s, lse = log Σ e^s, p = e^(s − lse),
 *      h = −Σ p ln p (entropy in nats). Greedy rows report these for T = 1 (s = z).
 *   4. Allowed set A ⊆ {v : z_v > −inf} by the row's truncation rule (opts.sampler), then
 *      A ← A ∪ {a} where a = argmax s with the lowest id among ties: A is never empty.
 *   5. Sampling distribution q on A: q_v = p_v / Σ_A p (renormalised), except the α-Bregman
 *      decoder (below). token = argmax_{v ∈ A} (log q_v + g_v) (Gumbel-max; for renormalised p
 *      the reference evaluates the equivalent s_v + g_v), g_v = −ln(−ln u_v), u_v the keyed
 *      uniform of (seed_b, offset_b, v) defined under "Randomness". Exact ties of the key (prob. 0)
 *      go to the lowest id.
 * Greedy (T == 0): token = a (lowest id among maximal z), A = {a}, logprob 0 (q is a point mass),
 * flag FH_DECODE_FLAG_GREEDY; the truncation rule and the random key are not used.
 *
 * Truncation rules (exact, in fp64 on the CPU reference; "≥" keeps equality; "tie-inclusive"
 * means tokens with equal s are all in or all out):
 *   FH_DECODE_STANDARD (default): min-p → top-k → top-p, vLLM's order, each off by default;
 *   opts.top_k_top_p_order picks how top-p sees top-k (FH_DECODE_TOP_K_FIRST, the default, is
 *   the sequential rule below; FH_DECODE_TOP_K_TOP_P_JOINT the joint rule after it).
 *     min-p (arXiv 2407.01082, vLLM): keep s_v ≥ m + ln(min_p), i.e. p_v ≥ min_p·p_max. min_p in
 *       [0, 1]; 0 is off; 1 keeps the maximal tie class.
 *     top-k: keep v with #{j in the min-p survivors : s_j > s_v} < k (tie-inclusive: FlashInfer
 *       and vLLM masks; ties at the k-th value may give more than k tokens). k <= 0 or k >= V is
 *       off (vLLM uses −1 for off).
 *     top-p, FlashInfer's rule on the survivors renormalised (FlashInfer top_k_first, i.e.
 *       sequential, not SGLang's joint rule: p = (.30,.25,.24,.11,.10), k = 3, P = .35 keeps
 *       only the first token): r_v = p_v / Σ_{survivors} p, keep v with
 *       Σ_{survivors j : s_j > s_v} r_j < top_p (tie-inclusive; the mass strictly above is summed
 *       in descending order, ties by id, in fp64). top_p in (0, 1]; 1 is off.
 *     Joint (opts.top_k_top_p_order = FH_DECODE_TOP_K_TOP_P_JOINT; FlashInfer's
 *       top_k_top_p_sampling_from_logits, SGLang): a min-p survivor v is kept iff it passes both
 *       tests on the same distribution, the min-p survivors renormalised:
 *       #{survivors j : s_j > s_v} < k and Σ_{survivors j : s_j > s_v} r_j < top_p with
 *       r_v = p_v / Σ_{survivors} p (the top-p mass is not renormalised over the top-k set).
 *       Both tests keep a tie-inclusive prefix, so A is the shorter one. The example above
 *       keeps the first two tokens (.30 < .35, then .55).
 *   FH_DECODE_TOP_N_SIGMA (arXiv 2411.07641): keep z_v ≥ max z − n·σ, σ the population standard
 *     deviation (divide by the count, llama.cpp) of the finite z of the row. Evaluated on z
 *     before temperature, so A is exactly temperature-invariant (in exact arithmetic s-space
 *     gives the same set). n = top_n_sigma; n <= 0 or V <= 1 is off (all finite tokens).
 *   FH_DECODE_EPSILON (arXiv 2210.15191, HF EpsilonLogitsWarper): keep p_v ≥ ε (HF removes
 *     p < ε); ε = epsilon in [0, 1), 0 is off. Empty → {a} and FH_DECODE_FLAG_ARGMAX_FALLBACK.
 *   FH_DECODE_ETA: keep p_v ≥ η, η = min(ε, √ε·exp(−h)) with h the entropy of p in nats
 *     (HF EtaLogitsWarper's code; its docstring's sqrt(ε·e^−h) is wrong). Fallback as ε.
 *   FH_DECODE_TOP_H (arXiv 2509.02510, reference code logit_processor.py): the top N =
 *     min(top_h_candidates, V) tokens of p in (s descending, id ascending) order, p the full
 *     softmax; τ = α·Σ_{i≤N} −p_(i) ln p_(i), H_j = Σ_{i≤j} −p_(i) ln p_(i);
 *     A = the first k, k = max(1, max{j ≤ N : H_j ≤ τ}). Positional, as the reference code's
 *     sort (the log base cancels; N bounds the guard at α = 1). α = top_h_alpha in (0, 1].
 *   FH_DECODE_BREGMAN ("Foundations of Top-k Decoding", arXiv 2505.19371): these formulas follow
 *     the derivation in docs/decoding.md, worked out from the paper's abstract and summaries,
 *     not verified against the paper body. With p_(1) ≥ p_(2) ≥ … in (s descending, id ascending)
 *     order, P_k = Σ_{i≤k} p_(i), p_(V+1) = 0 and λ = bregman_lambda ≥ 0:
 *       k* = min{k ≥ 1 : ln(1 + p_(k+1)/P_k) ≤ λ}  (the first minimiser of the KL cost
 *       J(k) = −ln P_k + λk, discretely convex in k); A = the first k* tokens (positional).
 *     Renormalisation, α = bregman_alpha > 0: α = 1 (KL) gives q = p / P_k*; otherwise
 *       q_v = (p_v^(α−1) + c)^(1/(α−1)) on A with the scalar c solved by bisection so that
 *       Σ_A q = 1 (α < 1 up-weights large p more than proportionally). Evaluated as
 *       q_v = p_(1)·exp(log1p(expm1((α−1) ln(p_v/p_(1))) + c′)/(α−1)), accurate for α near 1.
 *       The token is the Gumbel-max of log q, which is not proportional to p here.
 *   FH_DECODE_P_LESS ("p-less sampling", arXiv 2509.23234; no parameter): keep p_v ≥ Σ_u p_u²,
 *     p the tempered distribution over the finite ids (after bias and bans), i.e. the tokens at
 *     least as likely as the probability that two draws agree. Computed in fp64 as a logit
 *     threshold from the row's max m and the two sums Z = Σ e^(s−m) and Z₂ = Σ (e^(s−m))²
 *     (each square is the fp64 product of the term with itself): keep s_v ≥ m + (ln Z₂ − ln Z),
 *     the log form of p_v ≥ Z₂/Z² = exp(lse(2s) − 2·lse(s)). Tie-inclusive ("≥"); a uniform row
 *     keeps every finite id (equality). Never empty in exact arithmetic (max p ≥ Σ p²), and
 *     Z₂ ≤ Z term by term in fp64, so the threshold never exceeds m and the argmax is always
 *     kept (no ARGMAX_FALLBACK). Backends sum Z and Z₂ in different orders, so the threshold
 *     agrees to a few units of 2^−53 and the sets agree except for a token that close to it
 *     (docs/decoding.md, "Exactness").
 *
 * Randomness: Philox4x32-10, key = (seed lo32, seed hi32), counter = (v lo32, v hi32, offset
 * lo32, offset hi32); u_v = ((((x0 << 32) | x1) >> 12) + 0.5)·2^−52 from the output words, never
 * 0 or 1. The noise of token v depends on (seed_b, offset_b, v) only, so the token does not
 * depend on the batch, tiling or vocabulary splits; use a fresh offset (the decode step) or seed
 * per draw. A CUDA backend uses the same keying (docs/decoding.md, "Randomness").
 *
 * Outputs per row (each optional except tokens; NULL = not wanted): logprob = log q_token (the
 * final sampling distribution: renormalised on A, α-Bregman q; greedy 0); full_logprob =
 * log p_token (untruncated softmax of s); rank = 1 + #{v : s_v > s_token} (vLLM's rank, 1 is
 * best; ties share a rank); lse and entropy of softmax(s); allowed_count = |A|; top-n ids and
 * log p of the n largest s (ties by lowest id), n = opts.num_logprobs; flags (FH_DECODE_FLAG_*).
 * Degenerate rows: see 2.
 * Parameters: scalars in the options; a per-row array (length B, host memory for the CPU
 * backend, device memory for CUDA so that no host sync is needed) replaces its scalar when not
 * NULL. The CPU backend checks every per-row value on the host (FH_ERR_INVALID_ARGUMENT naming
 * the array and the row); CUDA checks them and the bias/ban lists on the device: such a row is
 * reported degenerate and fh_context_check returns FH_ERR_INVALID_ARGUMENT. */

typedef enum fh_decode_sampler {
  FH_DECODE_STANDARD = 0,    /* min-p → top-k → top-p */
  FH_DECODE_TOP_N_SIGMA = 1, /* top_n_sigma */
  FH_DECODE_EPSILON = 2,     /* epsilon */
  FH_DECODE_ETA = 3,         /* epsilon (η derived from it) */
  FH_DECODE_TOP_H = 4,       /* top_h_alpha, top_h_candidates */
  FH_DECODE_BREGMAN = 5,     /* bregman_lambda, bregman_alpha */
  FH_DECODE_P_LESS = 6,      /* no parameter: keep p_v >= Σ p² */
  FH_DECODE_SAMPLER_COUNT
} fh_decode_sampler_t;

/* How FH_DECODE_STANDARD combines top-k and top-p (opts.top_k_top_p_order). */
typedef enum fh_decode_top_k_top_p_order {
  FH_DECODE_TOP_K_FIRST = 0,       /* sequential: top-p on the top-k survivors renormalised (vLLM) */
  FH_DECODE_TOP_K_TOP_P_JOINT = 1, /* joint: both tests on the min-p survivors (FlashInfer, SGLang) */
  FH_DECODE_TOP_K_TOP_P_ORDER_COUNT
} fh_decode_top_k_top_p_order_t;

/* Row flags (bit mask, uint32). */
#define FH_DECODE_FLAG_DEGENERATE 1u      /* NaN or +inf in z, or every z is −inf */
#define FH_DECODE_FLAG_GREEDY 2u          /* T == 0: argmax */
#define FH_DECODE_FLAG_ARGMAX_FALLBACK 4u /* the rule kept nothing; A = {argmax} (ε, η) */
#define FH_DECODE_FLAG_SECOND_PASS 8u     /* CUDA fused: decoded by the exact fallback (docs/decoding.md) */

typedef struct fh_decode_options {
  size_t struct_size;          /* sizeof(fh_decode_options_t), set by init */
  fh_decode_sampler_t sampler; /* default FH_DECODE_STANDARD */
  float temperature;           /* default 1; finite and >= 0; 0 is greedy */
  int64_t top_k;               /* default 0 (off); <= 0 or >= V is off */
  float top_p;                 /* default 1 (off); in (0, 1] */
  float min_p;                 /* default 0 (off); in [0, 1] */
  float top_n_sigma;           /* default 1; finite; <= 0 is off (TOP_N_SIGMA) */
  float epsilon;               /* default 3e-4 (HF's suggested η range 3e-4..4e-3); [0, 1) */
  float top_h_alpha;           /* default 0.4 (the reference code's); in (0, 1] */
  int64_t top_h_candidates;    /* default 100 (the reference code's N); >= 1 */
  float bregman_lambda;        /* default 0.1 (no anchor default); finite and >= 0 */
  float bregman_alpha;         /* default 1 (KL renormalisation); finite and > 0 */
  uint64_t seed;               /* default 0 */
  uint64_t offset;             /* default 0 */
  int64_t num_logprobs;        /* default 0: n of the top-n outputs; in [0, V] */
  int64_t degenerate_token;    /* default -1: token of a degenerate row; -1 or in [0, V) */
  /* Per-row arrays [B] (NULL: the scalar above for every row). */
  const float* temperature_per_row;
  const int64_t* top_k_per_row;
  const float* top_p_per_row;
  const float* min_p_per_row;
  const float* top_n_sigma_per_row;
  const float* epsilon_per_row;
  const float* top_h_alpha_per_row;
  const float* bregman_lambda_per_row;
  const uint64_t* seed_per_row;
  const uint64_t* offset_per_row;
  /* Sparse logit bias: row b adds bias_values[b·bias_width + i] to z at bias_ids[b·bias_width + i]
   * for i < bias_count[b] (count in [0, bias_width], ids in [0, V), values finite). Off when
   * bias_width == 0 (default). */
  int64_t bias_width;
  const int64_t* bias_ids;
  const float* bias_values;
  const int64_t* bias_count;
  /* Banned ids: z ← −inf at banned_ids[b·banned_width + i], i < banned_count[b] (ids in [0, V)).
   * Off when banned_width == 0 (default). */
  int64_t banned_width;
  const int64_t* banned_ids;
  const int64_t* banned_count;
  /* Fields appended after the first release: a caller whose struct_size ends before a field
   * gets its default. */
  fh_decode_top_k_top_p_order_t top_k_top_p_order; /* default FH_DECODE_TOP_K_FIRST (scalar only) */
} fh_decode_options_t;

/* Fill `opts` with the defaults above. */
FH_API void fh_decode_options_init(fh_decode_options_t* opts);

/* Outputs, buffers of the context's kind; only tokens is required. */
typedef struct fh_decode_outputs {
  int64_t* tokens;        /* [B] */
  float* logprob;         /* [B] log q(token), the final sampling distribution */
  float* full_logprob;    /* [B] log softmax(s)(token), untruncated */
  int64_t* rank;          /* [B] 1 + #{v : s_v > s_token}; 0 for degenerate rows */
  float* lse;             /* [B] log Σ exp(s) */
  float* entropy;         /* [B] entropy of softmax(s), nats */
  int64_t* allowed_count; /* [B] |A| (0 for degenerate rows) */
  int64_t* topn_ids;      /* [B x num_logprobs] */
  float* topn_logprobs;   /* [B x num_logprobs] log softmax(s) of topn_ids */
  uint32_t* flags;        /* [B] FH_DECODE_FLAG_* */
} fh_decode_outputs_t;

/* Workspace in bytes for B rows of V logits (D = 0: from logits; D > 0: fused). 0 on the CPU
 * backend. CUDA: from logits 32·B·V bytes + CUB sort storage; fused: the per-(row, split) state
 * and candidates, plus the from-logits workspace reserved for the exact fallback (docs/decoding.md,
 * "Fused decoding on CUDA"). */
FH_API fh_status_t fh_decode_workspace_size(fh_context_t* ctx, const fh_decode_options_t* opts, int64_t B,
                                            int64_t V, int64_t D, fh_dtype_t dtype, size_t* bytes);

/* Decode from logits [B x V] (fp32, fp16 or bf16, row stride honoured). V >= 1 when B > 0.
 * Outputs must not alias inputs or each other.
 * Statuses: FH_ERR_INVALID_ARGUMENT (NULLs, shapes, dtypes, option and per-row ranges, ids),
 * FH_ERR_UNSUPPORTED (CUDA: B·V >= 2^31), FH_ERR_INSUFFICIENT_WORKSPACE, FH_ERR_OUT_OF_MEMORY. */
FH_API fh_status_t fh_decode_from_logits(fh_context_t* ctx, const fh_decode_options_t* opts,
                                         const fh_tensor_t* logits, const fh_decode_outputs_t* out,
                                         void* workspace, size_t workspace_bytes);

/* Decode fused with the head: H [B x D], C [V x D], bias [1 x V] or NULL, one dtype. The CPU
 * reference holds one row of V doubles per thread, never B x V. Same results as
 * fh_decode_from_logits on the fp64 logits; same statuses (CUDA also: D == 0 is FH_ERR_UNSUPPORTED).
 * CUDA: C is streamed once per 128 rows; a row the streamed candidates cannot decide is decoded by
 * an exact second pass and flagged FH_DECODE_FLAG_SECOND_PASS (docs/decoding.md). */
FH_API fh_status_t fh_decode_fused(fh_context_t* ctx, const fh_decode_options_t* opts, const fh_tensor_t* H,
                                   const fh_tensor_t* C, const fh_tensor_t* bias,
                                   const fh_decode_outputs_t* out, void* workspace, size_t workspace_bytes);

/* Exact top-k: values [B x k] (fp32, the logit rounded once) and ids [B x k] (int64), sorted by
 * value descending, ties by lowest id; NaN sorts above +inf (as torch.topk); −inf entries are
 * ordinary values. 1 <= k <= V. No bias, bans or temperature. Statuses as fh_decode_from_logits.
 * CUDA backend: k <= 256 (larger k: FH_ERR_UNSUPPORTED); from
 * logits needs no workspace; fused needs 16·B·S·k bytes, S = ceil(T / ceil(T / 16)) vocabulary
 * splits of T = ceil(V / 64) tiles (at most 256·B·k bytes). The CPU backend needs none. */
FH_API fh_status_t fh_topk_workspace_size(fh_context_t* ctx, int64_t B, int64_t V, int64_t D, int64_t k,
                                          fh_dtype_t dtype, size_t* bytes);
FH_API fh_status_t fh_topk_from_logits(fh_context_t* ctx, const fh_tensor_t* logits, int64_t k, float* values,
                                       int64_t* ids, void* workspace, size_t workspace_bytes);
FH_API fh_status_t fh_topk_fused(fh_context_t* ctx, const fh_tensor_t* H, const fh_tensor_t* C,
                                 const fh_tensor_t* bias, int64_t k, float* values, int64_t* ids,
                                 void* workspace, size_t workspace_bytes);

/* ---- Sampling from probabilities, filtered distributions, speculative acceptance ----
 * (docs/decoding.md, "From probabilities" and "Speculative sampling"; FlashInfer's
 * sampling_from_probs, top_k/top_p_renorm_probs, top_k_mask_logits and
 * chain_speculative_sampling are the reference points.)
 *
 * Probability rows. probs [B_in x V] is fp32 (row stride honoured), used as given: no log is taken
 * before the rules, no temperature. A row is VALID when every entry is finite and >= 0 and its
 * sum S (fp64, ids ascending) satisfies S > 0 and |S − 1| <= sum_tolerance. An invalid row is
 * data, not an argument error: it is reported as a degenerate row (below), unless
 * strict_rows != 0, in which case the CPU backend returns FH_ERR_INVALID_ARGUMENT naming the first
 * invalid row and what is wrong with it, before writing any output.
 *
 * Filter on probabilities (p-space form of FH_DECODE_STANDARD, same order and tie rules): over
 * P = {v : p_v > 0} (zero-probability ids are never kept), sorted (p descending, id ascending):
 *   min-p: keep p_v >= min_p · p_max (the product of two fp32 values is exact in fp64);
 *   top-k: keep v with #{j among the survivors : p_j > p_v} < k, tie-inclusive; k <= 0 or
 *     k >= V is off;
 *   top-p: r_v = p_v / Σ_survivors p; keep v with Σ_{survivors j : p_j > p_v} r_j < top_p,
 *     tie-inclusive, the mass above summed in fp64 in sorted order; top_p = 1 is off.
 * A is never empty for a valid row (every stage keeps the largest tie group).
 *
 * fh_decode_from_probs: token = argmax_{v ∈ A} (ln p_v + g_v) in fp64 (Gumbel-max: the same
 * keyed noise g_v = −ln(−ln u_v) of (seed_i, offset_i, v) as fh_decode_from_logits, so the token
 * does not depend on the batch, the row's place in it, or tiling); exact key ties go to the lowest
 * id. The renormalisation of p does not move the argmax, so the token is a draw from p/Σ_A p.
 * Outputs (fh_decode_outputs_t, each optional; tokens or tokens_i32 must be given):
 *   logprob = ln(p_tok / Σ_A p) (the final distribution); full_logprob = ln(p_tok / S);
 *   rank = 1 + #{v : p_v > p_tok}; lse = ln S (the log of the row's sum: 0 for an exactly
 *   normalised row; there are no logits); entropy = −Σ (p/S) ln(p/S) over p > 0, nats;
 *   allowed_count = |A|; top-n ids and ln(p/S) of the n largest p (ties by lowest id), n =
 *   num_logprobs (zero-probability ids report −inf); flags (FH_DECODE_FLAG_*).
 * Degenerate (invalid) row: token = degenerate_token (default −1), flags FH_DECODE_FLAG_DEGENERATE
 * | FH_DECODE_FLAG_INVALID_PROBS, logprob/full_logprob/entropy/lse NaN, rank 0, allowed_count 0,
 * top-n ids −1 and logprobs NaN. Never a crash.
 *
 * fh_decode_renorm_probs: out[i, v] = p_v / Σ_A p for v ∈ A, 0 elsewhere (fp32, one rounding of
 * the fp64 quotient); FlashInfer's top_k_renorm_probs / top_p_renorm_probs, with min-p and the
 * chain as above. Degenerate row: the whole output row NaN.
 *
 * fh_decode_mask_logits: logits [B_in x V] (fp32, fp16 or bf16); out [B x V] fp32: z_v (converted
 * exactly) for v ∈ A, −inf elsewhere, A the allowed set of fh_decode_from_logits with
 * FH_DECODE_STANDARD at T = 1 (min-p → top-k → top-p on softmax(z), tie-inclusive: the very rule
 * code of the sampler). Top-k alone is FlashInfer's top_k_mask_logits. A row with a NaN or +inf,
 * or with every z at −inf, is degenerate: the whole output row NaN.
 *
 * Rows and indices (all three calls): without indices, output row i reads input row i and
 * B = probs->rows. With indices (int64 `indices` or int32 `indices_i32`, not both), B =
 * num_indices and output row i reads input row indices[i], which must be in [0, B_in) (FlashInfer's
 * `indices`: several outputs may share one distribution). Per-row parameter arrays are [B],
 * indexed by the output row. Host memory for the CPU backend.
 * Workspace: none (fh_filter_workspace_size reports 0 on both backends).
 * CUDA backend (device pointers, no host synchronization): fh_decode_from_probs with every filter
 * off (top_k off, top_p 1, min_p 0, no per-row filter arrays, num_logprobs 0, strict_rows 0);
 * indices are read on the device, and one outside the input rows makes that row degenerate and
 * fh_context_check return FH_ERR_INVALID_ARGUMENT. Filtered draws, fh_decode_renorm_probs and
 * fh_decode_mask_logits return FH_ERR_UNSUPPORTED on CUDA (not built yet).
 * Statuses: FH_ERR_INVALID_ARGUMENT (NULLs, shapes, options, per-row values, indices, aliasing,
 * invalid rows with strict_rows), FH_ERR_UNSUPPORTED (dtype other than fp32 for probs; the CUDA
 * cases above), FH_ERR_OUT_OF_MEMORY. */

#define FH_DECODE_FLAG_INVALID_PROBS 16u /* a probability row: NaN, inf, negative, or sum off 1 */

typedef struct fh_filter_options {
  size_t struct_size;     /* sizeof(fh_filter_options_t), set by init */
  int64_t top_k;          /* default 0 (off); <= 0 or >= V is off */
  float top_p;            /* default 1 (off); in (0, 1] */
  float min_p;            /* default 0 (off); in [0, 1] */
  float sum_tolerance;    /* default 1e-3; >= 0 (+inf: only S > 0 is required) */
  int strict_rows;        /* default 0: invalid rows are degenerate; 1: FH_ERR_INVALID_ARGUMENT */
  uint64_t seed;          /* default 0 (fh_decode_from_probs) */
  uint64_t offset;        /* default 0 */
  int64_t num_logprobs;   /* default 0 (fh_decode_from_probs): n of the top-n outputs, in [0, V] */
  int64_t degenerate_token; /* default -1: token of a degenerate row; -1 or in [0, V) */
  const int64_t* top_k_per_row; /* [B] or NULL; likewise below */
  const float* top_p_per_row;
  const float* min_p_per_row;
  const uint64_t* seed_per_row;
  const uint64_t* offset_per_row;
  int64_t num_indices;          /* B when indices are given */
  const int64_t* indices;       /* [num_indices] or NULL */
  const int32_t* indices_i32;   /* [num_indices] or NULL */
} fh_filter_options_t;

FH_API void fh_filter_options_init(fh_filter_options_t* opts);

/* 0 bytes on either backend. */
FH_API fh_status_t fh_filter_workspace_size(fh_context_t* ctx, const fh_filter_options_t* opts, int64_t B,
                                            int64_t V, size_t* bytes);

/* Sample one token per output row from probs (see above). tokens_i32 [B] (or NULL) receives the
 * same tokens as int32 (V must be below 2^31); out->tokens may be NULL when tokens_i32 is given.
 * Outputs must not alias inputs or each other. */
FH_API fh_status_t fh_decode_from_probs(fh_context_t* ctx, const fh_filter_options_t* opts, const fh_tensor_t* probs,
                                        const fh_decode_outputs_t* out, int32_t* tokens_i32, void* workspace,
                                        size_t workspace_bytes);

/* Filtered, renormalised probabilities: out [B x V] fp32 (row stride honoured, must not overlap
 * probs); flags [B] (or NULL): 0, or FH_DECODE_FLAG_DEGENERATE | FH_DECODE_FLAG_INVALID_PROBS. */
FH_API fh_status_t fh_decode_renorm_probs(fh_context_t* ctx, const fh_filter_options_t* opts,
                                          const fh_tensor_t* probs, const fh_tensor_t* out, uint32_t* flags,
                                          void* workspace, size_t workspace_bytes);

/* Masked logits: out [B x V] fp32 (must not overlap logits); flags [B] (or NULL): 0 or
 * FH_DECODE_FLAG_DEGENERATE. sum_tolerance, seed, offset, num_logprobs are not used. */
FH_API fh_status_t fh_decode_mask_logits(fh_context_t* ctx, const fh_filter_options_t* opts,
                                         const fh_tensor_t* logits, const fh_tensor_t* out, uint32_t* flags,
                                         void* workspace, size_t workspace_bytes);

/* Chain speculative sampling (Leviathan et al., ICML 2023, arXiv 2211.17192; Chen et al., arXiv
 * 2302.01318): verify K draft tokens per row against the target model in one call.
 * Inputs: draft_tokens [B x K] int64 (each in [0, V)), draft_probs p_d [B·K x V] fp32 (row b·K + i
 * is the draft distribution at position i), target_probs p_t [B·(K+1) x V] fp32 (row b·(K+1) + i;
 * row K is the bonus position). K >= 0; B = target_probs->rows / (K + 1). Every probability row
 * is checked as above (sum_tolerance, strict_rows); the probabilities are used as given (not
 * renormalised), so each decision below is a function of the stored values and the uniform only.
 * Per row b, key (seed_b, offset_b), for i = 0 .. K−1 with d = d_i, t = p_t,i(d), q = p_d,i(d):
 *   a_i = the uniform of Philox counter (2^64 − 1 − i, offset) (words x0, x1, docs/decoding.md),
 *     never equal to a token's counter;
 *   accept iff a_i < t / q (fp64 quotient; t >= q always accepts); q = 0: accept iff t > 0
 *     (the limit of min(1, t/q); the draft could not have drawn d, flag FH_SPEC_FLAG_ZERO_DRAFT);
 *   on the first rejection: r = max(0, p_t,i − p_d,i) (fp64 difference per id); emit
 *     argmax_{v : r_v > 0} (ln r_v + h_v) and stop, h_v = −ln(−ln w_v) with w_v the uniform of
 *     words (x2, x3) of token v's counter (v, offset) (independent of fh_decode_*'s noise under
 *     the same key). If r is all zero (only possible through rounding or q = 0), emit the same
 *     argmax over ln p_t,i instead and set FH_SPEC_FLAG_RESIDUAL_FALLBACK.
 * If all K are accepted, emit the bonus argmax_{v : p_t,K(v) > 0} (ln p_t,K(v) + h_v).
 * Then the emitted tokens have exactly the target distribution (the defining property).
 * Outputs: output_tokens [B x (K+1)]: the accepted drafts, then the correction or bonus token,
 * then −1; accepted [B] = number of drafts emitted (leading accepts, FlashInfer's
 * emitted_draft_token_num); emitted [B] = accepted + 1, the tokens written; optional
 * accepted_independent [B] = #{i < K : draft i passes its own test}, the rejection rule applied to
 * every position (FlashInfer's accepted_token_num, an acceptance-rate metric); flags [B].
 * Degenerate row (any of its 2K + 1 probability rows invalid): output −1 everywhere, counts 0,
 * flags FH_SPEC_FLAG_DEGENERATE.
 * Use a key that was not used to draft (the draft's noise must be independent of a_i and h).
 * CUDA backend: the same results (device pointers, no host synchronization, no workspace); draft
 * ids are checked on the device (a row with one outside [0, V) is degenerate and fh_context_check
 * returns FH_ERR_INVALID_ARGUMENT); strict_rows is FH_ERR_UNSUPPORTED there.
 * Statuses: FH_ERR_INVALID_ARGUMENT (NULLs, shapes, K, draft token ids, options, aliasing, strict
 * rows), FH_ERR_UNSUPPORTED (non-fp32 probabilities; strict_rows on CUDA). */

#define FH_SPEC_FLAG_DEGENERATE 1u         /* an invalid probability row */
#define FH_SPEC_FLAG_ZERO_DRAFT 2u         /* a verified draft token had p_d = 0 */
#define FH_SPEC_FLAG_RESIDUAL_FALLBACK 4u  /* max(0, p_t − p_d) was all zero: corrected from p_t */

typedef struct fh_spec_options {
  size_t struct_size;  /* sizeof(fh_spec_options_t), set by init */
  float sum_tolerance; /* default 1e-3, as fh_filter_options_t */
  int strict_rows;     /* default 0 */
  uint64_t seed;       /* default 0 */
  uint64_t offset;     /* default 0 */
  const uint64_t* seed_per_row;   /* [B] or NULL */
  const uint64_t* offset_per_row; /* [B] or NULL */
} fh_spec_options_t;

FH_API void fh_spec_options_init(fh_spec_options_t* opts);

typedef struct fh_spec_outputs {
  int64_t* output_tokens;        /* [B x (K+1)], required */
  int64_t* accepted;             /* [B] */
  int64_t* emitted;              /* [B] */
  int64_t* accepted_independent; /* [B] */
  uint32_t* flags;               /* [B] FH_SPEC_FLAG_* */
} fh_spec_outputs_t;

/* No workspace on either backend (pass NULL, 0). */
FH_API fh_status_t fh_spec_accept(fh_context_t* ctx, const fh_spec_options_t* opts, const int64_t* draft_tokens,
                                  const fh_tensor_t* draft_probs, const fh_tensor_t* target_probs, int64_t K,
                                  const fh_spec_outputs_t* out, void* workspace, size_t workspace_bytes);

#endif /* FUSEDHEAD_DECODE_H */
