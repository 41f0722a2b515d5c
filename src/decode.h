/* The validated decoding problem, as the API layer (src/decode.c) hands it to a backend. */
#ifndef FH_DECODE_H
#define FH_DECODE_H

#include "fusedhead.h"
#include "philox.h" /* FH_PHILOX_HD: helpers shared with the kernels */

#ifdef __cplusplus
extern "C" {
#endif

/* Where the logits of a row come from: a logits tensor, or the head (H, C, bias). */
typedef struct fh_decode_source {
  const fh_tensor_t* logits; /* [B x V], or NULL for the fused head */
  const fh_tensor_t* H;      /* [B x D] */
  const fh_tensor_t* C;      /* [V x D] */
  const fh_tensor_t* bias;   /* [1 x V] or NULL */
  int64_t B, V, D;           /* D = 0 with logits */
} fh_decode_source_t;

typedef struct fh_decode_problem {
  const char* fn; /* public entry point, for error messages */
  fh_decode_source_t src;
  fh_decode_options_t opt; /* full-size copy: caller's fields over the defaults */
} fh_decode_problem_t;

/* Options over the defaults and every check of them for B rows over a vocabulary of V (global
 * ids), per-row arrays and id lists read on the host: the shard calls (src/shard_decode.c). */
fh_status_t fh_decode_check_options_host(const char* fn, const fh_decode_options_t* opts, int64_t B, int64_t V,
                                        fh_decode_options_t* o);

/* Range checks shared with the probability calls (src/decode_probs.c); `name` names the value. */
fh_status_t fh_decode_check_top_p(const char* fn, const char* name, double v);
fh_status_t fh_decode_check_min_p(const char* fn, const char* name, double v);
/* Output pointers distinct from each other and from the source's data (n outputs, named). */
fh_status_t fh_decode_check_aliasing(const char* fn, const void* const* outs, const char* const* names, int n,
                                     const fh_decode_source_t* s);

/* A validated filter / from-probabilities call (src/decode_probs.c): B output rows over the input
 * rows of `in` (probabilities, or logits for the mask), V classes. */
typedef struct fh_filter_problem {
  const char* fn;
  const fh_tensor_t* in;
  int64_t B, V;
  fh_filter_options_t opt; /* full-size copy: caller's fields over the defaults */
} fh_filter_problem_t;

/* The input row of output row i (the indices mapping, or i). */
FH_PHILOX_HD int64_t fh_filter_input_row(const fh_filter_options_t* o, int64_t i) {
  return o->indices ? o->indices[i] : o->indices_i32 ? (int64_t)o->indices_i32[i] : i;
}

/* A validated fh_spec_accept call. */
typedef struct fh_spec_problem {
  const char* fn;
  const int64_t* draft;    /* [B x K] */
  const fh_tensor_t* pd;   /* [B·K x V] */
  const fh_tensor_t* pt;   /* [B·(K+1) x V] */
  int64_t B, K, V;
  fh_spec_options_t opt;
} fh_spec_problem_t;

/* The CPU reference of the probability calls (src/ref/decode_probs.c, src/ref/spec.c). */
fh_status_t fh_ref_from_probs(const fh_filter_problem_t* p, const fh_decode_outputs_t* out, int32_t* tokens_i32);
fh_status_t fh_ref_renorm_probs(const fh_filter_problem_t* p, const fh_tensor_t* out, uint32_t* flags);
fh_status_t fh_ref_mask_logits(const fh_filter_problem_t* p, const fh_tensor_t* out, uint32_t* flags);
fh_status_t fh_ref_spec_accept(const fh_spec_problem_t* p, const fh_spec_outputs_t* out);
/* strict_rows: FH_ERR_INVALID_ARGUMENT naming the first invalid probability row among the n rows
 * that output rows 0..n-1 read (`o` gives the indices mapping, NULL: row i), else FH_SUCCESS. */
fh_status_t fh_ref_probs_strict(const char* fn, const char* name, const fh_tensor_t* t, int64_t n,
                                const fh_filter_options_t* o, double tol);

/* The CPU reference (src/ref/decode.c). */
fh_status_t fh_ref_decode(const fh_decode_problem_t* p, const fh_decode_outputs_t* out);
fh_status_t fh_ref_topk(const char* fn, const fh_decode_source_t* src, int64_t k, float* values, int64_t* ids);

#ifdef __cplusplus
}
#endif

#endif
