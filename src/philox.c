/* The host side of the decoding RNG: Gumbel noise from the keyed Philox uniform (src/philox.h).
 * −ln(−ln u) is finite for every u the uniform can produce: u ∈ [2^-53, 1 − 2^-53] gives
 * g ∈ [−3.61, 36.7]. */
#include "decode_math.h"

double fh_gumbel_noise(uint64_t seed, uint64_t offset, uint64_t token) { return fh_dm_gumbel(seed, offset, token); }
