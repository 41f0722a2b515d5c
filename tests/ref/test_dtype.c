/* The exact dtype conversions the reference relies on (src/dtype.c). */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "dtype.h"
#include "test_util.h"

Test(ref_dtype, half_roundtrip_every_pattern) {
  int bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    double v = fh_half_bits_to_double((uint16_t)b);
    uint16_t back = fh_double_to_half_bits(v);
    if (isnan(v)) {
      bad += ((back & 0x7C00) != 0x7C00) || !(back & 0x3FF);
    } else {
      bad += back != b;
    }
  }
  cr_assert_eq(bad, 0, "%d fp16 patterns do not round-trip", bad);
}

Test(ref_dtype, bf16_roundtrip_every_pattern) {
  int bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    double v = fh_bf16_bits_to_double((uint16_t)b);
    uint16_t back = fh_double_to_bf16_bits(v);
    bad += isnan(v) ? !isnan(fh_bf16_bits_to_double(back)) : back != b;
  }
  cr_assert_eq(bad, 0, "%d bf16 patterns do not round-trip", bad);
}

Test(ref_dtype, half_known_values_and_ties) {
  cr_assert_eq(fh_double_to_half_bits(1.0), 0x3C00);
  cr_assert_eq(fh_double_to_half_bits(-2.0), 0xC000);
  cr_assert_eq(fh_double_to_half_bits(65504.0), 0x7BFF);
  cr_assert_eq(fh_double_to_half_bits(65519.99), 0x7BFF);
  cr_assert_eq(fh_double_to_half_bits(65520.0), 0x7C00, "the tie above the largest finite rounds to inf");
  cr_assert_eq(fh_double_to_half_bits(ldexp(1.0, -24)), 0x0001, "smallest subnormal");
  cr_assert_eq(fh_double_to_half_bits(ldexp(1.0, -25)), 0x0000, "half of it ties to even (zero)");
  cr_assert_eq(fh_double_to_half_bits(ldexp(3.0, -25)), 0x0002, "1.5 units ties to even (2)");
  cr_assert_eq(fh_double_to_half_bits(1.0 + ldexp(1.0, -11)), 0x3C00, "tie to even, down");
  cr_assert_eq(fh_double_to_half_bits(1.0 + ldexp(3.0, -11)), 0x3C02, "tie to even, up");
  cr_assert_eq(fh_double_to_half_bits(-0.0), 0x8000);
  cr_assert_eq(fh_double_to_half_bits(INFINITY), 0x7C00);
}

Test(ref_dtype, bf16_matches_float_rounding) {
  /* For doubles that are floats, RNE to bf16 is the classic bit trick on the float. */
  tu_rng_t r = {42};
  int bad = 0;
  for (int k = 0; k < 200000; ++k) {
    float f = (float)(tu_normal(&r) * ldexp(1.0, (int)tu_randint(&r, 200) - 100));
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t want = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    bad += fh_double_to_bf16_bits((double)f) != want;
  }
  cr_assert_eq(bad, 0, "%d values round differently", bad);
}

#ifdef __FLT16_MAX__
Test(ref_dtype, half_matches_compiler_float16) {
  tu_rng_t r = {7};
  int bad = 0;
  for (int k = 0; k < 200000; ++k) {
    double x = tu_normal(&r) * ldexp(1.0, (int)tu_randint(&r, 44) - 28);
    _Float16 h = (_Float16)x;
    uint16_t want;
    memcpy(&want, &h, sizeof want);
    bad += fh_double_to_half_bits(x) != want;
  }
  cr_assert_eq(bad, 0, "%d values round differently from the compiler's _Float16", bad);
}
#endif
