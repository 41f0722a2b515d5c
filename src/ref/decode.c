/* The decoding reference driver: builds each row's logits (from the logits tensor, or as fp64
 * dot products H_b · C_v + bias_v, one row of V doubles per thread, never B x V), applies the
 * sparse bias and the bans, decodes the row (decode_row.c) and rounds the results once into
 * the caller's outputs. Also the exact top-k and the chunked Gumbel-max used by the tests. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "decode_ref.h"
#include "fh_internal.h"
#include "philox.h"
#include "ref_common.h"

void fh_ref_decode_row_params(const fh_decode_options_t* o, int64_t b, fh_decode_row_params_t* prm) {
  fh_dm_row_params(o, b, prm);
}

/* Per-thread buffers: the row scratch plus the fused path's H row and one C row in fp64. */
typedef struct row_buf {
  fh_decode_scratch_t w;
  double* z;
  double* h;
  double* c;
} row_buf_t;

static int row_buf_init(row_buf_t* rb, const fh_decode_source_t* src) {
  memset(rb, 0, sizeof *rb);
  const size_t V = src->V > 0 ? (size_t)src->V : 1, D = src->D > 0 ? (size_t)src->D : 1;
  rb->z = (double*)malloc(V * sizeof(double));
  rb->h = (double*)malloc(D * sizeof(double));
  rb->c = (double*)malloc(D * sizeof(double));
  const int ok = fh_ref_decode_scratch_init(&rb->w, src->V);
  return ok && rb->z && rb->h && rb->c;
}

static void row_buf_free(row_buf_t* rb) {
  fh_ref_decode_scratch_free(&rb->w);
  free(rb->z);
  free(rb->h);
  free(rb->c);
}

void fh_ref_decode_logits(const fh_decode_source_t* src, int64_t b, double* z, double* h, double* c) {
  if (src->logits) {
    fh_ref_row_to_double(src->logits, b, z);
    return;
  }
  fh_ref_row_to_double(src->H, b, h);
  for (int64_t v = 0; v < src->V; ++v) {
    fh_ref_row_to_double(src->C, v, c);
    double zv = fh_ref_dot(h, c, src->D);
    if (src->bias) zv += fh_tensor_get(src->bias, 0, v);
    z[v] = zv;
  }
}

static void load_logits(const fh_decode_source_t* src, int64_t b, row_buf_t* rb) {
  fh_ref_decode_logits(src, b, rb->z, rb->h, rb->c);
}

/* An id of a sparse list inside [off, off + V): the index into z, else -1. */
static int64_t local_id(int64_t id, int64_t off, int64_t V) { return id >= off && id - off < V ? id - off : -1; }

void fh_ref_decode_bias_bans(const fh_decode_options_t* o, int64_t b, int64_t off, int64_t V, double* z) {
  if (o->bias_width > 0)
    for (int64_t i = 0; i < o->bias_count[b]; ++i) {
      const int64_t j = local_id(o->bias_ids[b * o->bias_width + i], off, V);
      if (j >= 0) z[j] += (double)o->bias_values[b * o->bias_width + i];
    }
  if (o->banned_width > 0)
    for (int64_t i = 0; i < o->banned_count[b]; ++i) {
      const int64_t j = local_id(o->banned_ids[b * o->banned_width + i], off, V);
      if (j >= 0) z[j] = -INFINITY;
    }
}

static void write_row(const fh_decode_problem_t* p, int64_t b, const fh_decode_row_result_t* r,
                      const fh_decode_scratch_t* w, const fh_decode_outputs_t* out) {
  out->tokens[b] = r->token;
  if (out->logprob) out->logprob[b] = (float)r->logprob;
  if (out->full_logprob) out->full_logprob[b] = (float)r->full_logprob;
  if (out->rank) out->rank[b] = r->rank;
  if (out->lse) out->lse[b] = (float)r->lse;
  if (out->entropy) out->entropy[b] = (float)r->entropy;
  if (out->allowed_count) out->allowed_count[b] = r->allowed_count;
  if (out->flags) out->flags[b] = r->flags;
  const int64_t n = p->opt.num_logprobs;
  if (n > 0 && (out->topn_ids || out->topn_logprobs)) {
    const int deg = (r->flags & FH_DECODE_FLAG_DEGENERATE) != 0;
    for (int64_t i = 0; i < n; ++i) {
      if (out->topn_ids) out->topn_ids[b * n + i] = deg ? -1 : w->sorted[i].id;
      if (out->topn_logprobs) out->topn_logprobs[b * n + i] = deg ? NAN : (float)(w->sorted[i].s - r->lse);
    }
  }
}

fh_status_t fh_ref_decode(const fh_decode_problem_t* p, const fh_decode_outputs_t* out) {
  const int64_t B = p->src.B;
  int oom = 0;
#ifdef FH_HAVE_OPENMP
#pragma omp parallel reduction(| : oom) num_threads(fh_ref_threads())
#endif
  {
    row_buf_t rb;
    const int ok = row_buf_init(&rb, &p->src);
    if (!ok) oom = 1;
#ifdef FH_HAVE_OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
    for (int64_t b = 0; b < B; ++b) {
      if (!ok) continue;
      fh_decode_row_params_t prm;
      fh_decode_row_result_t r;
      fh_ref_decode_row_params(&p->opt, b, &prm);
      load_logits(&p->src, b, &rb);
      fh_ref_decode_bias_bans(&p->opt, b, 0, p->src.V, rb.z);
      fh_ref_decode_row(rb.z, p->src.V, &prm, p->opt.degenerate_token, &rb.w, &r);
      write_row(p, b, &r, &rb.w, out);
    }
    row_buf_free(&rb);
  }
  if (oom) return fh_set_error(FH_ERR_OUT_OF_MEMORY, p->fn, "cannot allocate reference buffers");
  return FH_SUCCESS;
}

fh_status_t fh_ref_topk(const char* fn, const fh_decode_source_t* src, int64_t k, float* values, int64_t* ids) {
  int oom = 0;
#ifdef FH_HAVE_OPENMP
#pragma omp parallel reduction(| : oom) num_threads(fh_ref_threads())
#endif
  {
    row_buf_t rb;
    const int ok = row_buf_init(&rb, src);
    if (!ok) oom = 1;
#ifdef FH_HAVE_OPENMP
#pragma omp for schedule(dynamic, 16)
#endif
    for (int64_t b = 0; b < src->B; ++b) {
      if (!ok) continue;
      load_logits(src, b, &rb);
      for (int64_t v = 0; v < src->V; ++v) rb.w.sorted[v] = (fh_decode_pair_t){rb.z[v], v};
      qsort(rb.w.sorted, (size_t)src->V, sizeof *rb.w.sorted, fh_ref_decode_pair_cmp);
      for (int64_t i = 0; i < k; ++i) {
        values[b * k + i] = (float)rb.w.sorted[i].s;
        ids[b * k + i] = rb.w.sorted[i].id;
      }
    }
    row_buf_free(&rb);
  }
  if (oom) return fh_set_error(FH_ERR_OUT_OF_MEMORY, fn, "cannot allocate reference buffers");
  return FH_SUCCESS;
}

int64_t fh_ref_gumbel_argmax_chunked(const double* base, const unsigned char* allowed, int64_t V, uint64_t seed,
                                     uint64_t offset, int64_t chunk, const int64_t* chunk_order) {
  const int64_t n_chunks = (V + chunk - 1) / chunk;
  double best = -INFINITY;
  int64_t tok = -1;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t lo = chunk_order[c] * chunk, hi = lo + chunk < V ? lo + chunk : V;
    double cb = -INFINITY; /* the chunk's own (key, id) argmax, as a CTA would report it */
    int64_t ct = -1;
    for (int64_t v = lo; v < hi; ++v) {
      if (!allowed[v]) continue;
      const double key = base[v] + fh_gumbel_noise(seed, offset, (uint64_t)v);
      if (ct < 0 || key > cb) {
        cb = key;
        ct = v;
      }
    }
    /* Merge: larger key wins; equal keys go to the lower id, whatever the visiting order. */
    if (ct >= 0 && (tok < 0 || cb > best || (cb == best && ct < tok))) {
      best = cb;
      tok = ct;
    }
  }
  return tok;
}
