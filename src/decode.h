/* The validated decoding problem, as the API layer (src/decode.c) hands it to a backend. */
#ifndef FH_DECODE_H
#define FH_DECODE_H

#include "fusedhead.h"

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

/* The CPU reference (src/ref/decode.c). */
fh_status_t fh_ref_decode(const fh_decode_problem_t* p, const fh_decode_outputs_t* out);
fh_status_t fh_ref_topk(const char* fn, const fh_decode_source_t* src, int64_t k, float* values, int64_t* ids);

#ifdef __cplusplus
}
#endif

#endif
