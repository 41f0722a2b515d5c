/* The host side of the decoding RNG: Gumbel noise from the keyed Philox uniform (src/philox.h).
 * −ln(−ln u) is finite for every u the uniform can produce: u ∈ [2^-53, 1 − 2^-53] gives
 * g ∈ [−3.61, 36.7]. */
#include <math.h>

#include "philox.h"

double fh_gumbel_noise(uint64_t seed, uint64_t offset, uint64_t token) {
  const double u = fh_philox_token_uniform(seed, offset, token);
  return -log(-log(u));
}
