#include "dtype.h"

#include <math.h>
#include <string.h>

/* A binary floating-point format with `ebits` exponent bits and `mbits` fraction bits. */
static double decode_bits(uint32_t bits, int ebits, int mbits) {
  const uint32_t sign = bits >> (ebits + mbits);
  const uint32_t exp = (bits >> mbits) & ((1u << ebits) - 1u);
  const uint32_t frac = bits & ((1u << mbits) - 1u);
  const int bias = (1 << (ebits - 1)) - 1;
  double v;
  if (exp == (1u << ebits) - 1u) {
    v = frac ? NAN : INFINITY;
  } else if (exp == 0) {
    v = ldexp((double)frac, 1 - bias - mbits); /* subnormal or zero */
  } else {
    v = ldexp((double)(frac | (1u << mbits)), (int)exp - bias - mbits);
  }
  return sign ? -v : v;
}

/* Round |x| once to nearest even in the format; nearbyint() rounds to even in the default
 * rounding mode, which the library never changes. */
static uint32_t encode_bits(double x, int ebits, int mbits) {
  const uint32_t sign = signbit(x) ? 1u << (ebits + mbits) : 0u;
  const uint32_t exp_all = (1u << ebits) - 1u;
  const int bias = (1 << (ebits - 1)) - 1;
  if (isnan(x)) return (exp_all << mbits) | (1u << (mbits - 1)); /* quiet NaN, positive */
  double a = fabs(x);
  if (isinf(a)) return sign | (exp_all << mbits);
  int e2;
  frexp(a, &e2); /* a = m * 2^e2, m in [0.5, 1) */
  int e = e2 - 1;  /* a in [2^e, 2^(e+1)) */
  if (a == 0.0 || e < 1 - bias) {
    /* subnormal range: units of 2^(1 - bias - mbits); q == 2^mbits is the smallest normal */
    double q = nearbyint(ldexp(a, bias - 1 + mbits));
    return sign | (uint32_t)q;
  }
  double q = nearbyint(ldexp(a, mbits - e)); /* in [2^mbits, 2^(mbits+1)] */
  if (q >= ldexp(1.0, mbits + 1)) {
    q = ldexp(1.0, mbits);
    e += 1;
  }
  if (e + bias >= (int)exp_all) return sign | (exp_all << mbits); /* overflow to inf */
  return sign | ((uint32_t)(e + bias) << mbits) | ((uint32_t)q - (1u << mbits));
}

double fh_half_bits_to_double(uint16_t h) { return decode_bits(h, 5, 10); }
double fh_bf16_bits_to_double(uint16_t b) { return decode_bits(b, 8, 7); }
uint16_t fh_double_to_half_bits(double x) { return (uint16_t)encode_bits(x, 5, 10); }
uint16_t fh_double_to_bf16_bits(double x) { return (uint16_t)encode_bits(x, 8, 7); }

double fh_load(const void* base, fh_dtype_t dtype, int64_t idx) {
  switch (dtype) {
    case FH_DTYPE_F32: return (double)((const float*)base)[idx];
    case FH_DTYPE_F16: return fh_half_bits_to_double(((const uint16_t*)base)[idx]);
    case FH_DTYPE_BF16: return fh_bf16_bits_to_double(((const uint16_t*)base)[idx]);
    case FH_DTYPE_F64: return ((const double*)base)[idx];
    default: return NAN;
  }
}

void fh_store(void* base, fh_dtype_t dtype, int64_t idx, double v) {
  switch (dtype) {
    case FH_DTYPE_F32: ((float*)base)[idx] = (float)v; break;
    case FH_DTYPE_F16: ((uint16_t*)base)[idx] = fh_double_to_half_bits(v); break;
    case FH_DTYPE_BF16: ((uint16_t*)base)[idx] = fh_double_to_bf16_bits(v); break;
    case FH_DTYPE_F64: ((double*)base)[idx] = v; break;
    default: break;
  }
}

size_t fh_dtype_size(fh_dtype_t dtype) {
  switch (dtype) {
    case FH_DTYPE_F32: return 4;
    case FH_DTYPE_F16: return 2;
    case FH_DTYPE_BF16: return 2;
    case FH_DTYPE_F64: return 8;
    default: return 0;
  }
}

const char* fh_dtype_name(fh_dtype_t dtype) {
  switch (dtype) {
    case FH_DTYPE_F32: return "fp32";
    case FH_DTYPE_F16: return "fp16";
    case FH_DTYPE_BF16: return "bf16";
    case FH_DTYPE_F64: return "fp64";
    default: return "invalid";
  }
}
