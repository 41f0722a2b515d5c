/* Philox4x32-10 against the Random123 known-answer vectors (docs/decoding.md, "Randomness"), the decoding
 * key/counter layout, and the range of the uniforms and Gumbel noise derived from it. */
#include <criterion/criterion.h>
#include <math.h>

#include "philox.h"

static void kat(const uint32_t ctr[4], const uint32_t key[2], const uint32_t want[4]) {
  fh_philox4x32_t got = fh_philox4x32_10(ctr, key);
  for (int i = 0; i < 4; ++i)
    cr_expect_eq(got.v[i], want[i], "word %d: got %08x want %08x", i, got.v[i], want[i]);
}

Test(ref_philox, kat_zero) {
  const uint32_t ctr[4] = {0, 0, 0, 0}, key[2] = {0, 0};
  const uint32_t want[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
  kat(ctr, key, want);
}

Test(ref_philox, kat_all_ones) {
  const uint32_t ctr[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, key[2] = {0xffffffffu, 0xffffffffu};
  const uint32_t want[4] = {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu};
  kat(ctr, key, want);
}

Test(ref_philox, kat_pi) {
  const uint32_t ctr[4] = {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, key[2] = {0xa4093822u, 0x299f31d0u};
  const uint32_t want[4] = {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u};
  kat(ctr, key, want);
}

/* The decoding layout: counter (token lo, token hi, offset lo, offset hi), key (seed lo, seed hi).
 * The π vector read through that layout must give the same words. */
Test(ref_philox, token_layout) {
  const uint64_t token = 0x85a308d3243f6a88ull, offset = 0x0370734413198a2eull, seed = 0x299f31d0a4093822ull;
  fh_philox4x32_t w = fh_philox_token_words(seed, offset, token);
  cr_expect_eq(w.v[0], 0xd16cfe09u);
  cr_expect_eq(w.v[1], 0x94fdccebu);
  cr_expect_eq(w.v[2], 0x5001e420u);
  cr_expect_eq(w.v[3], 0x24126ea1u);
  /* u from the first two words: ((x0 << 32 | x1) >> 12 + 0.5) · 2^-52 */
  const double want = ((double)((((uint64_t)0xd16cfe09u << 32) | 0x94fdccebu) >> 12) + 0.5) * ldexp(1.0, -52);
  cr_expect_eq(fh_philox_token_uniform(seed, offset, token), want);
}

/* The extreme words give uniforms strictly inside (0, 1) and finite Gumbel noise. */
Test(ref_philox, uniform_excludes_endpoints) {
  const double u0 = fh_philox_u52(0, 0), u1 = fh_philox_u52(0xffffffffu, 0xffffffffu);
  cr_expect_eq(u0, ldexp(1.0, -53));
  cr_expect_eq(u1, 1.0 - ldexp(1.0, -53));
  cr_expect(u0 > 0.0 && u1 < 1.0);
  cr_expect(isfinite(-log(-log(u0))) && isfinite(-log(-log(u1))));
  /* Over many keys: u in (0, 1), mean near 1/2 (std of the mean 1/sqrt(12·n) = 0.0009 at n=1e5),
   * Gumbel mean near the Euler–Mascheroni constant 0.5772 (std π/sqrt(6n) = 0.0041). */
  double su = 0, sg = 0;
  const int n = 100000;
  for (int i = 0; i < n; ++i) {
    const double u = fh_philox_token_uniform(7, (uint64_t)i >> 6, (uint64_t)i & 63);
    cr_assert(u > 0.0 && u < 1.0);
    su += u;
    sg += fh_gumbel_noise(7, (uint64_t)i >> 6, (uint64_t)i & 63);
  }
  cr_expect(fabs(su / n - 0.5) < 0.005, "mean u %g", su / n);
  cr_expect(fabs(sg / n - 0.5772156649) < 0.02, "mean g %g", sg / n);
}

/* Different seeds, offsets and tokens give different words (the key and both counter halves
 * are used; a layout bug that dropped the high words would collide here). */
Test(ref_philox, key_and_counter_halves_matter) {
  const double base = fh_philox_token_uniform(1, 2, 3);
  cr_expect_neq(base, fh_philox_token_uniform(1ull | (1ull << 40), 2, 3));
  cr_expect_neq(base, fh_philox_token_uniform(1, 2ull | (1ull << 40), 3));
  cr_expect_neq(base, fh_philox_token_uniform(1, 2, 3ull | (1ull << 40)));
  cr_expect_neq(base, fh_philox_token_uniform(1, 3, 3));
  cr_expect_neq(base, fh_philox_token_uniform(1, 2, 4));
}
