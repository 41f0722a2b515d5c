/* The divergences of the distillation reference as f-divergences D = Σ_j q_j f(r_j), r = p/q.
 * Each one is written as its pair (f, a = f − r f′), evaluated per class as
 *     term = q f(p/q),   qa = q a(p/q)
 * in log space from X = log q and Y = log p (d = Y − X = log r), so that neither ratio
 * overflows and q or p underflowing to 0 gives the limit, not 0·∞. fusedhead.h lists the
 * formulas; the comments here say how each is kept accurate. */
#include <math.h>

#include "ref/distill_ref.h"

void fh_div_resolve(const fh_distill_options_t* o, fh_div_t* d) {
  d->kind = FH_DIV_ZERO;
  d->beta = o->beta;
  d->scale = 1.0;
  d->lambda = o->skew;
  d->alpha = o->alpha;
  switch (o->divergence) {
    case FH_DISTILL_FORWARD_KL: d->kind = FH_DIV_FKL; break;
    case FH_DISTILL_REVERSE_KL: d->kind = FH_DIV_RKL; break;
    case FH_DISTILL_JSD:
      /* At β ∈ {0, 1} the formula is identically 0; Liger's convention substitutes the KLs. */
      if (d->beta > 0.0 && d->beta < 1.0) d->kind = FH_DIV_JSD;
      else if (o->jsd_endpoints == FH_DISTILL_JSD_ENDPOINTS_KL) d->kind = d->beta == 0.0 ? FH_DIV_FKL : FH_DIV_RKL;
      else d->kind = FH_DIV_ZERO;
      break;
    case FH_DISTILL_JSD_SCALED:
      /* The continuous extension: the limits of JSD(β)/(β(1−β)) at 0 and 1. */
      if (d->beta == 0.0) d->kind = FH_DIV_FKL;
      else if (d->beta == 1.0) d->kind = FH_DIV_RKL;
      else {
        d->kind = FH_DIV_JSD;
        d->scale = 1.0 / (d->beta * (1.0 - d->beta));
      }
      break;
    case FH_DISTILL_TVD: d->kind = FH_DIV_TVD; break;
    case FH_DISTILL_SKEW_FORWARD_KL: d->kind = FH_DIV_SKEW_FKL; break;
    case FH_DISTILL_SKEW_REVERSE_KL: d->kind = FH_DIV_SKEW_RKL; break;
    case FH_DISTILL_ALPHA: d->kind = FH_DIV_ALPHA; break;
    case FH_DISTILL_HELLINGER:
      d->kind = FH_DIV_ALPHA;
      d->alpha = 0.5;
      break;
    case FH_DISTILL_CHI_SQUARE:
      d->kind = FH_DIV_ALPHA;
      d->alpha = 2.0;
      break;
    default: break; /* validated at the API boundary */
  }
}

double fh_div_log_mix(double w, double z) {
  if (w == 0.0) return 0.0;
  if (w == 1.0) return z;
  if (z <= 0.0) {
    /* value = 1 + a with a = w·expm1(z) in [−w, 0]: log1p keeps small results accurate; when
     * the value is below ½ the sum of the two positive parts has no cancellation. */
    const double a = w * expm1(z);
    return a > -0.5 ? log1p(a) : log((1.0 - w) + w * exp(z));
  }
  const double a = w * expm1(z);
  if (a < 1.0) return log1p(a);
  return z + log(w + (1.0 - w) * exp(-z)); /* e^z factored out: no overflow */
}

/* e^L · expm1(γ d) / γ (→ e^L · d as γ → 0), the building block of the alpha family ((r^γ − 1)/γ
 * weighted by q or p). Lz = L + γ d is passed as the caller's direct combination αY + (1−α)X so
 * that an infinite X or Y (a −inf bias) gives the limit instead of ∞ − ∞; the difference form
 * is used only where the product would overflow or underflow. */
static double weighted_expm1_over(double gamma, double L, double d, double Lz) {
  const double w = exp(L);
  if (gamma == 0.0) return w == 0.0 ? 0.0 : w * d;
  const double z = gamma * d;
  if (isfinite(d) && z < 700.0 && w > 1e-290) return w * expm1(z) / gamma;
  return (exp(Lz) - w) / gamma;
}

void fh_div_eval(const fh_div_t* dv, double X, double Y, double* term, double* qa) {
  const double q = exp(X), p = exp(Y), d = Y - X;
  double t = 0.0, g = 0.0;
  if (X == -INFINITY && Y == -INFINITY) { /* masked in both heads: contributes nothing (no ∞ − ∞) */
    *term = 0.0;
    *qa = 0.0;
    return;
  }
  switch (dv->kind) {
    case FH_DIV_ZERO: break;
    case FH_DIV_FKL: /* f = r ln r, a = −r: term = p (Y − X), qa = −p */
      if (p > 0.0) t = p * d;
      g = -p;
      break;
    case FH_DIV_RKL: /* f = −ln r, a = 1 − ln r: term = q (X − Y), qa = q (1 − d) */
      if (q > 0.0) {
        t = -q * d;
        g = q * (1.0 - d);
      }
      break;
    case FH_DIV_JSD: {
      /* Lq = log(M/q) = log((1−β) + β r), Lp = log(M/p) = log(β + (1−β)/r), each from log_mix
       * (not Lq − d) so that both stay accurate as β → 0 or 1, where the scaled variant divides
       * by β(1−β). term = −β p Lp − (1−β) q Lq, a = −(1−β) ln w = −(1−β) Lq. */
      const double b = dv->beta, Lq = fh_div_log_mix(b, d), Lp = fh_div_log_mix(1.0 - b, -d);
      if (p > 0.0) t -= b * p * Lp;
      if (q > 0.0) {
        t -= (1.0 - b) * q * Lq;
        g = -(1.0 - b) * q * Lq;
      }
      t *= dv->scale;
      g *= dv->scale;
      break;
    }
    case FH_DIV_TVD: /* f = ½|r − 1|, a = −½ sign(r − 1), sign(0) = 0 */
      t = 0.5 * fabs(p - q);
      g = -0.5 * q * (double)((d > 0.0) - (d < 0.0));
      break;
    case FH_DIV_SKEW_FKL: {
      /* M = λp + (1−λ)q. term = p log(p/M) = −p log_mix(1−λ, −d);
       * a = −(1−λ) r/w with w = M/q, so qa = −(1−λ) p q/M = −(1−λ) p e^{−log(M/q)}. */
      const double l = dv->lambda;
      if (p > 0.0) {
        t = -p * fh_div_log_mix(1.0 - l, -d);
        g = -(1.0 - l) * p * exp(-fh_div_log_mix(l, d));
      }
      break;
    }
    case FH_DIV_SKEW_RKL: {
      /* M′ = λq + (1−λ)p, L = log(M′/q) = log_mix(1−λ, d). term = −q L;
       * a = −L + (1−λ) r/w′, so qa = −q L + (1−λ) p e^{−L}. */
      const double l = dv->lambda, L = fh_div_log_mix(1.0 - l, d);
      if (q > 0.0) {
        t = -q * L;
        g = -q * L;
      }
      if (p > 0.0) g += (1.0 - l) * p * exp(-L);
      break;
    }
    case FH_DIV_ALPHA: {
      /* f = (r^α − 1 − α(r − 1))/(α(α−1)), a = (1 − r^α)/α. With t1 = q r^α = p r^(α−1):
       *   term = (t1 − q − α(p − q))/(α(α−1)),  qa = −(t1 − q)/α.
       * Below α = ½ write t1 − q = q expm1(αd): term = [q E(α) − (p − q)]/(α − 1), qa = −q E(α)
       * with E(γ) = expm1(γd)/γ → d at γ = 0 (so α = 0 is KL(Q‖P) exactly). From ½ up use
       * t1 − p = p expm1((α−1)d): term = [p E(α−1) − (p − q)]/α,
       * qa = −((α−1) p E(α−1) + p − q)/α (α = 1 is KL(P‖Q) exactly). Neither divides a
       * difference of nearly equal numbers by a small α or 1 − α. */
      const double al = dv->alpha, Lz = al * Y + (1.0 - al) * X; /* log t1 */
      if (al < 0.5) {
        const double qE = weighted_expm1_over(al, X, d, Lz);
        t = (qE - (p - q)) / (al - 1.0);
        g = -qE;
      } else {
        const double pE = weighted_expm1_over(al - 1.0, Y, d, Lz);
        t = (pE - (p - q)) / al;
        g = -((al - 1.0) * pE + p - q) / al;
      }
      break;
    }
  }
  *term = t;
  *qa = g;
}
