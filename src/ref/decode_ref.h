/* The fp64 core of the decoding reference (the semantics are documented in fusedhead.h, section
 * Decoding). The public fh_decode_* calls on the CPU backend build each row's logits, apply the
 * sparse bias and bans, and call fh_ref_decode_row; tests call it directly on fp64 rows (exact
 * boundary cases such as s == m + ln min_p need logits that fp32 cannot hold) and read the
 * allowed set and the sampling distribution it leaves in the scratch. */
#ifndef FH_DECODE_REF_H
#define FH_DECODE_REF_H

#include <stdint.h>

#include "decode.h"
#include "decode_math.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One row's parameters, resolved from the options and the per-row arrays. */
typedef struct fh_decode_row_params {
  fh_decode_sampler_t sampler;
  double temperature; /* 0: greedy */
  int64_t top_k;
  double top_p, min_p, top_n_sigma, epsilon, top_h_alpha, bregman_lambda, bregman_alpha;
  int64_t top_h_candidates;
  uint64_t seed, offset;
  int joint; /* top_k_top_p_order == FH_DECODE_TOP_K_TOP_P_JOINT (a scalar option, no per-row array) */
} fh_decode_row_params_t;

/* Parameters of row b: the per-row array entry where given, else the scalar. Shared with the
 * CUDA kernels (kernels/decode.cu), which read the per-row arrays in device memory. */
FH_DM void fh_dm_row_params(const fh_decode_options_t* o, int64_t b, fh_decode_row_params_t* prm) {
  prm->sampler = o->sampler;
  prm->temperature = o->temperature_per_row ? o->temperature_per_row[b] : o->temperature;
  prm->top_k = o->top_k_per_row ? o->top_k_per_row[b] : o->top_k;
  prm->top_p = o->top_p_per_row ? o->top_p_per_row[b] : o->top_p;
  prm->min_p = o->min_p_per_row ? o->min_p_per_row[b] : o->min_p;
  prm->top_n_sigma = o->top_n_sigma_per_row ? o->top_n_sigma_per_row[b] : o->top_n_sigma;
  prm->epsilon = o->epsilon_per_row ? o->epsilon_per_row[b] : o->epsilon;
  prm->top_h_alpha = o->top_h_alpha_per_row ? o->top_h_alpha_per_row[b] : o->top_h_alpha;
  prm->bregman_lambda = o->bregman_lambda_per_row ? o->bregman_lambda_per_row[b] : o->bregman_lambda;
  prm->bregman_alpha = o->bregman_alpha;
  prm->top_h_candidates = o->top_h_candidates;
  prm->seed = o->seed_per_row ? o->seed_per_row[b] : o->seed;
  prm->offset = o->offset_per_row ? o->offset_per_row[b] : o->offset;
  prm->joint = o->top_k_top_p_order == FH_DECODE_TOP_K_TOP_P_JOINT;
}
void fh_ref_decode_row_params(const fh_decode_options_t* o, int64_t b, fh_decode_row_params_t* prm);

/* Whether a row's parameters are in the ranges src/decode.c checks on the host (the CUDA kernels
 * check the per-row arrays on the device with it). */
FH_DM int fh_dm_row_params_ok(const fh_decode_row_params_t* r) {
  return isfinite(r->temperature) && r->temperature >= 0.0 && r->top_p > 0.0 && r->top_p <= 1.0 &&
         r->min_p >= 0.0 && r->min_p <= 1.0 && isfinite(r->top_n_sigma) && r->epsilon >= 0.0 && r->epsilon < 1.0 &&
         r->top_h_alpha > 0.0 && r->top_h_alpha <= 1.0 && isfinite(r->bregman_lambda) && r->bregman_lambda >= 0.0;
}

/* A sort entry: (s, id), ordered by s descending then id ascending. */
typedef struct fh_decode_pair {
  double s;
  int64_t id;
} fh_decode_pair_t;

/* Per-thread scratch for rows of V logits. After fh_ref_decode_row: allowed[v] = 1 for v in A;
 * logq[v] = log q_v on A (−inf off A); s = z / T (z for greedy rows); sorted = all V tokens in
 * (s descending, id ascending) order (unset for degenerate rows). */
typedef struct fh_decode_scratch {
  int64_t V;
  double* s;
  double* logq;
  unsigned char* allowed;
  fh_decode_pair_t* sorted;
} fh_decode_scratch_t;

int fh_ref_decode_scratch_init(fh_decode_scratch_t* w, int64_t V); /* 1 on success */
void fh_ref_decode_scratch_free(fh_decode_scratch_t* w);

/* fp64 results of one row (see fh_decode_outputs_t). */
typedef struct fh_decode_row_result {
  int64_t token, rank, allowed_count;
  double logprob, full_logprob, lse, entropy;
  uint32_t flags;
} fh_decode_row_result_t;

/* 1 when logits z[V] make a degenerate row: a NaN or +inf, or every z at −inf. */
int fh_ref_decode_row_is_degenerate(const double* z, int64_t V);

/* Decode one row of processed logits z[V] (bias and bans already applied). degenerate_token is
 * the token reported for a degenerate row. */
void fh_ref_decode_row(const double* z, int64_t V, const fh_decode_row_params_t* prm, int64_t degenerate_token,
                       fh_decode_scratch_t* w, fh_decode_row_result_t* r);

/* FH_DECODE_STANDARD's rule (min-p → top-k → top-p) on the first n_fin entries of srt, sorted
 * (s descending, id ascending), m the row's max s over the whole vocabulary of V: the length of
 * the kept prefix (before the argmax union). */
int64_t fh_ref_decode_rule_standard(const fh_decode_row_params_t* prm, const fh_decode_pair_t* srt, int64_t n_fin,
                                    int64_t V, double m);
/* The same rule with probs != 0: srt holds (p, id) pairs sorted (p descending, id ascending), m =
 * p_max; min-p keeps p ≥ min_p·m and top-p sums p (docs/decoding.md, "From probabilities"). */
int64_t fh_ref_decode_rule_standard_space(const fh_decode_row_params_t* prm, const fh_decode_pair_t* srt,
                                          int64_t n_fin, int64_t V, double m, int probs);

/* Row b's logits z[V] from the source (h [D], c [D] fp64 scratch for the fused head). */
void fh_ref_decode_logits(const fh_decode_source_t* src, int64_t b, double* z, double* h, double* c);
/* Row b's sparse bias (list order, repeated ids add) then bans (−inf wins), for the ids in
 * [off, off + V): z holds those classes (off 0 and the whole V for one device). */
void fh_ref_decode_bias_bans(const fh_decode_options_t* o, int64_t b, int64_t off, int64_t V, double* z);

/* Decoding on a vocabulary shard (src/ref/decode_shard.c): p's source holds the local classes,
 * global id = off + local id; partials [B x FH_SHARD_DECODE_WIDTH(K)]. The merge of P ranks'
 * gathered partials writes out (rank must be NULL). */
fh_status_t fh_ref_decode_shard_candidates(const fh_decode_problem_t* p, int64_t off, int64_t K, double* partials);
fh_status_t fh_ref_decode_shard_combine(const char* fn, const fh_decode_options_t* o, int64_t B, int64_t Vg, int64_t P,
                                        int64_t K, const double* gathered, const fh_decode_outputs_t* out);

/* qsort comparator for fh_decode_pair_t: NaN first (torch.topk), then s descending, id ascending. */
int fh_ref_decode_pair_cmp(const void* a, const void* b);

/* The keyed Gumbel-max over the allowed set, computed chunk by chunk: the vocabulary is cut into
 * chunks of `chunk` tokens, visited in the order chunk_order[0..n_chunks) (a permutation), each
 * chunk reports its (key, id) argmax and the partial results are merged. key_v = base[v] + g_v.
 * Returns the lowest id among maximal keys, -1 if nothing is allowed. Tests compare it with the
 * row decoder to show the sample does not depend on how the vocabulary is split or ordered. */
int64_t fh_ref_gumbel_argmax_chunked(const double* base, const unsigned char* allowed, int64_t V, uint64_t seed,
                                     uint64_t offset, int64_t chunk, const int64_t* chunk_order);

#ifdef __cplusplus
}
#endif

#endif
