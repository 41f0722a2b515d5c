/* Exact conversions between the storage dtypes and double, written with bit operations so the
 * reference needs no compiler half-precision support. Loads are exact (every fp16/bf16/fp32
 * value is a double); stores round once, to nearest even, from double. */
#ifndef FH_DTYPE_H
#define FH_DTYPE_H

#include <stdint.h>

#include "fusedhead.h"

#ifdef __cplusplus
extern "C" {
#endif

double fh_half_bits_to_double(uint16_t h);
double fh_bf16_bits_to_double(uint16_t b);
uint16_t fh_double_to_half_bits(double x);
uint16_t fh_double_to_bf16_bits(double x);

/* "fp32", "fp16", "bf16", "fp64" (the names messages use), "invalid" otherwise. */
const char* fh_dtype_name(fh_dtype_t dtype);

/* Element `idx` (a flat element offset) of a buffer of `dtype`. */
double fh_load(const void* base, fh_dtype_t dtype, int64_t idx);
void fh_store(void* base, fh_dtype_t dtype, int64_t idx, double v);

/* Element (r, c) of a tensor. */
static inline double fh_tensor_get(const fh_tensor_t* t, int64_t r, int64_t c) {
  return fh_load(t->data, t->dtype, r * t->row_stride + c);
}
static inline void fh_tensor_set(const fh_tensor_t* t, int64_t r, int64_t c, double v) {
  fh_store(t->data, t->dtype, r * t->row_stride + c, v);
}

#ifdef __cplusplus
}
#endif

#endif
