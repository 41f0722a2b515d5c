/* Philox4x32-10 (Salmon et al., SC'11; Random123) and the decoding RNG contract, header-only so
 * that the CPU reference and a CUDA kernel share the exact keying (docs/decoding.md, "Randomness"):
 *   key = (seed lo32, seed hi32), counter = (token lo32, token hi32, offset lo32, offset hi32),
 *   u = ((((x0 << 32) | x1) >> 12) + 0.5) · 2^-52  ∈ [2^-53, 1 − 2^-53]   (never 0 or 1).
 * The uniform of token v is a function of (seed, offset, v) only, so samples do not depend on
 * tiling, grid, batch composition or vocabulary splits. Words x2 and x3 are reserved for later
 * draws of the same token (e.g. a second sample per step). Plain C99/CUDA: no libm here. */
#ifndef FH_PHILOX_H
#define FH_PHILOX_H

#include <stdint.h>

#if defined(__CUDACC__)
#define FH_PHILOX_HD __host__ __device__ __forceinline__
#else
#define FH_PHILOX_HD static inline
#endif

#define FH_PHILOX_M0 0xD2511F53u
#define FH_PHILOX_M1 0xCD9E8D57u
#define FH_PHILOX_W0 0x9E3779B9u
#define FH_PHILOX_W1 0xBB67AE85u

typedef struct fh_philox4x32 {
  uint32_t v[4];
} fh_philox4x32_t;

/* One Philox round: two 32x32->64 multiplies, then the S-box-free mix of Random123. */
FH_PHILOX_HD void fh_philox_round(uint32_t ctr[4], const uint32_t key[2]) {
  const uint64_t p0 = (uint64_t)FH_PHILOX_M0 * ctr[0];
  const uint64_t p1 = (uint64_t)FH_PHILOX_M1 * ctr[2];
  const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
  const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
  const uint32_t c1 = ctr[1], c3 = ctr[3];
  ctr[0] = hi1 ^ c1 ^ key[0];
  ctr[1] = lo1;
  ctr[2] = hi0 ^ c3 ^ key[1];
  ctr[3] = lo0;
}

/* Philox4x32 with 10 rounds; the key is bumped by the Weyl increments between rounds. */
FH_PHILOX_HD fh_philox4x32_t fh_philox4x32_10(const uint32_t ctr_in[4], const uint32_t key_in[2]) {
  uint32_t c[4] = {ctr_in[0], ctr_in[1], ctr_in[2], ctr_in[3]};
  uint32_t k[2] = {key_in[0], key_in[1]};
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k[0] += FH_PHILOX_W0;
      k[1] += FH_PHILOX_W1;
    }
    fh_philox_round(c, k);
  }
  fh_philox4x32_t out;
  for (int i = 0; i < 4; ++i) out.v[i] = c[i];
  return out;
}

/* The four words of token `token` under (seed, offset): the decoding key and counter layout. */
FH_PHILOX_HD fh_philox4x32_t fh_philox_token_words(uint64_t seed, uint64_t offset, uint64_t token) {
  const uint32_t ctr[4] = {(uint32_t)token, (uint32_t)(token >> 32), (uint32_t)offset, (uint32_t)(offset >> 32)};
  const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
  return fh_philox4x32_10(ctr, key);
}

/* 52-bit uniform strictly inside (0, 1) from two words: (k + 0.5) · 2^-52, k in [0, 2^52). The
 * +0.5 centres each cell, so the mean is exactly 1/2 and the ends are excluded without the bias
 * of clamping. 52 bits, not 53: k + 0.5 must be exact, and (2^53 − 1 + 0.5) · 2^-53 would round
 * to 1.0 (the spacing of doubles just below 1 is 2^-53). */
FH_PHILOX_HD double fh_philox_u52(uint32_t hi, uint32_t lo) {
  const uint64_t k = (((uint64_t)hi << 32) | lo) >> 12;
  return ((double)k + 0.5) * (1.0 / 4503599627370496.0); /* 2^-52 */
}

/* The decoding uniform of token `token` (words x0, x1). */
FH_PHILOX_HD double fh_philox_token_uniform(uint64_t seed, uint64_t offset, uint64_t token) {
  const fh_philox4x32_t w = fh_philox_token_words(seed, offset, token);
  return fh_philox_u52(w.v[0], w.v[1]);
}



#ifdef __cplusplus
extern "C" {
#endif
/* Gumbel noise g = −ln(−ln u) of token `token` under (seed, offset), in fp64 (host; src/philox.c). */
double fh_gumbel_noise(uint64_t seed, uint64_t offset, uint64_t token);
#ifdef __cplusplus
}
#endif

#endif
