/* The divergence elements of distillation in fp32 for the CUDA kernels (kernels/distill.cu): the
 * same (f, a) pairs and the same log-space forms as the fp64 reference (src/ref/distill_div.c,
 * formulas in fusedhead.h), evaluated per class from X = log q and Y = log p:
 *     term = q f(p/q),   qa = q a(p/q).
 * The options are resolved once on the host into a dev_div (kind, β, scale, λ, α) exactly as
 * fh_div_resolve does; every call site passes it by value. The transcendental functions are the
 * accurate CUDA ones (expf, expm1f, log1pf, logf: <= 2 ulp), not the MUFU approximations of the
 * engine's softmax statistics: a divergence term is a difference of nearly equal quantities for
 * a student close to its teacher, where ex2.approx's 2^-22 would show. */
#ifndef FH_KERNELS_DISTILL_DIV_CUH
#define FH_KERNELS_DISTILL_DIV_CUH

#include <math.h>

#include "common.cuh"

namespace fh_dst {

/* fh_div_kind_t of the reference (src/ref/distill_ref.h), mirrored for the device. */
enum dev_div_kind { DK_ZERO = 0, DK_FKL, DK_RKL, DK_JSD, DK_TVD, DK_SKEW_FKL, DK_SKEW_RKL, DK_ALPHA };

struct dev_div {
  int kind;
  float beta, scale, lambda, alpha;
};

/* log((1 − w) + w e^z), w in [0, 1]: fh_div_log_mix in fp32. */
__device__ __forceinline__ float log_mix(float w, float z) {
  if (w == 0.0f) return 0.0f;
  if (w == 1.0f) return z;
  const float a = w * expm1f(z);
  if (z <= 0.0f) return a > -0.5f ? log1pf(a) : logf((1.0f - w) + w * expf(z));
  if (a < 1.0f) return log1pf(a);
  return z + logf(w + (1.0f - w) * expf(-z));
}

/* e^L · expm1(γ d) / γ (→ e^L · d as γ → 0); Lz = L + γ d as the caller's direct combination.
 * fp32 bounds: expm1f overflows above 88, and e^L below 1e-30 would lose the product. */
__device__ __forceinline__ float weighted_expm1_over(float gamma, float L, float d, float Lz) {
  const float w = expf(L);
  if (gamma == 0.0f) return w == 0.0f ? 0.0f : w * d;
  const float z = gamma * d;
  if (isfinite(d) && z < 80.0f && w > 1e-30f) return w * expm1f(z) / gamma;
  return (expf(Lz) - w) / gamma;
}

__device__ __forceinline__ void div_eval(const dev_div& dv, float X, float Y, float& term, float& qa) {
  const float q = expf(X), p = expf(Y), d = Y - X;
  float t = 0.0f, g = 0.0f;
  switch (dv.kind) {
    case DK_FKL:
      if (p > 0.0f) t = p * d;
      g = -p;
      break;
    case DK_RKL:
      if (q > 0.0f) {
        t = -q * d;
        g = q * (1.0f - d);
      }
      break;
    case DK_JSD: {
      const float b = dv.beta, Lq = log_mix(b, d), Lp = log_mix(1.0f - b, -d);
      if (p > 0.0f) t -= b * p * Lp;
      if (q > 0.0f) {
        t -= (1.0f - b) * q * Lq;
        g = -(1.0f - b) * q * Lq;
      }
      t *= dv.scale;
      g *= dv.scale;
      break;
    }
    case DK_TVD:
      t = 0.5f * fabsf(p - q);
      g = -0.5f * q * (float)((d > 0.0f) - (d < 0.0f));
      break;
    case DK_SKEW_FKL: {
      const float l = dv.lambda;
      if (p > 0.0f) {
        t = -p * log_mix(1.0f - l, -d);
        g = -(1.0f - l) * p * expf(-log_mix(l, d));
      }
      break;
    }
    case DK_SKEW_RKL: {
      const float l = dv.lambda, L = log_mix(1.0f - l, d);
      if (q > 0.0f) {
        t = -q * L;
        g = -q * L;
      }
      if (p > 0.0f) g += (1.0f - l) * p * expf(-L);
      break;
    }
    case DK_ALPHA: {
      const float al = dv.alpha, Lz = al * Y + (1.0f - al) * X;
      if (al < 0.5f) {
        const float qE = weighted_expm1_over(al, X, d, Lz);
        t = (qE - (p - q)) / (al - 1.0f);
        g = -qE;
      } else {
        const float pE = weighted_expm1_over(al - 1.0f, Y, d, Lz);
        t = (pE - (p - q)) / al;
        g = -((al - 1.0f) * pE + p - q) / al;
      }
      break;
    }
    default: break; /* DK_ZERO */
  }
  term = t;
  qa = g;
}

} /* namespace fh_dst */

#endif
