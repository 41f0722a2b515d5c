"""distillation_loss / sparse_distillation_loss: gradcheck of every divergence and option, and
agreement with F.kl_div and the explicit JSD/TVD/skew/alpha formulas on materialized logits."""
import unittest

import torch
import torch.nn.functional as F

from _util import add_tests, gen, randn
import fusedhead as fh

N, DS, DT, V, VT, K = 5, 3, 4, 7, 9, 4


def kl(logp, logq):
    """KL(P‖Q) per row from log-probabilities (0·log 0 = 0)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def mix_log(la, lb, lam):
    """log(λ·A + (1−λ)·B) from log A, log B."""
    return torch.logaddexp(la + torch.log(torch.tensor(lam, dtype=la.dtype)),
                           lb + torch.log(torch.tensor(1 - lam, dtype=la.dtype)))


def divergence(name, Y, X, beta=0.5, jsd_endpoints="kl", skew=0.1, alpha=0.5):
    """D(P‖Q) per row; Y = log P (teacher), X = log Q (student)."""
    p, q = Y.exp(), X.exp()
    if name == "forward_kl":
        return F.kl_div(X, Y, reduction="none", log_target=True).sum(-1)
    if name == "reverse_kl":
        return kl(X, Y)
    if name in ("jsd", "jsd_scaled"):
        if beta in (0.0, 1.0) and (name == "jsd_scaled" or jsd_endpoints == "kl"):
            return kl(Y, X) if beta == 0.0 else kl(X, Y)
        if beta in (0.0, 1.0):
            return 0.0 * X.sum(-1)
        M = mix_log(Y, X, beta)
        j = beta * kl(Y, M) + (1 - beta) * kl(X, M)
        return j / (beta * (1 - beta)) if name == "jsd_scaled" else j
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_forward_kl":
        return kl(Y, mix_log(Y, X, skew)) if skew < 1 else torch.zeros(X.shape[0], dtype=X.dtype)
    if name == "skew_reverse_kl":
        return kl(X, mix_log(X, Y, skew)) if skew < 1 else torch.zeros(X.shape[0], dtype=X.dtype)
    if name in ("alpha", "hellinger", "chi_square"):
        a = {"alpha": alpha, "hellinger": 0.5, "chi_square": 2.0}[name]
        if a == 0.0:
            return kl(X, Y)
        if a == 1.0:
            return kl(Y, X)
        # p^a q^(1-a) in log space: with a < 0 or a > 1 the naive powers overflow fp32 when peaked.
        return (1 - torch.exp(a * Y + (1 - a) * X).sum(-1)) / (a * (1 - a))
    raise AssertionError(name)


def reduce(rows, valid, reduction, divisor):
    rows = rows * valid
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (divisor if divisor else valid.sum())


def ref_dense(se, sc, te, tc, targets, sb, tb, divergence_name="forward_kl", temperature=1.0,
              scale_by_t_squared=True, soft_weight=1.0, hard_weight=0.0, ignore_index=-100, reduction="mean",
              divisor=None, **dkw):
    s = F.linear(se, sc, sb)
    t = F.linear(te, tc, tb)[:, :sc.shape[0]]  # only the shared V columns
    X = F.log_softmax(s / temperature, -1)
    Y = F.log_softmax(t / temperature, -1)
    kappa = temperature ** 2 if scale_by_t_squared else 1.0
    rows = soft_weight * kappa * divergence(divergence_name, Y, X, **dkw)
    valid = torch.ones(se.shape[0], dtype=s.dtype)
    if targets is not None:
        valid = (targets != ignore_index).to(s.dtype)
        if hard_weight:
            ty = torch.where(targets != ignore_index, targets, torch.zeros_like(targets))
            rows = rows + hard_weight * F.cross_entropy(s, ty, reduction="none")
    return reduce(rows, valid, reduction, divisor)


def heads(seed, dtype=torch.float64, teacher_dtype=None, peaked=False, bias=True):
    g = gen(seed)
    tdt = teacher_dtype or dtype
    amp = 5.0 if peaked else 1.0
    se = randn(g, N, DS, dtype=dtype, requires_grad=True)
    sc = randn(g, V, DS, dtype=dtype, scale=amp, requires_grad=True)
    sb = randn(g, V, dtype=dtype, requires_grad=True) if bias else None
    te = randn(g, N, DT, dtype=tdt)
    tc = randn(g, VT, DT, dtype=tdt, scale=amp)
    tb = randn(g, VT, dtype=tdt) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[2] = -100
    return se, sc, sb, te, tc, tb, targets


# Option values exactly representable in fp32 (the C options are float).
DIV_CASES = {
    "forward_kl": dict(divergence="forward_kl"),
    "reverse_kl": dict(divergence="reverse_kl"),
    "jsd": dict(divergence="jsd", beta=0.25),
    "jsd_half": dict(divergence="jsd", beta=0.5),
    "jsd_beta0_kl": dict(divergence="jsd", beta=0.0),
    "jsd_beta1_kl": dict(divergence="jsd", beta=1.0),
    "jsd_beta0_plain": dict(divergence="jsd", beta=0.0, jsd_endpoints="plain"),
    "jsd_scaled": dict(divergence="jsd_scaled", beta=0.75),
    "jsd_scaled_beta0": dict(divergence="jsd_scaled", beta=0.0),
    "jsd_scaled_beta1": dict(divergence="jsd_scaled", beta=1.0),
    "tvd": dict(divergence="tvd"),
    "skew_forward_kl": dict(divergence="skew_forward_kl", skew=0.25),
    "skew_reverse_kl": dict(divergence="skew_reverse_kl", skew=0.25),
    "skew_forward_kl_0": dict(divergence="skew_forward_kl", skew=0.0),
    "alpha": dict(divergence="alpha", alpha=0.25),
    "alpha_neg": dict(divergence="alpha", alpha=-0.5),
    "alpha_0": dict(divergence="alpha", alpha=0.0),
    "alpha_1": dict(divergence="alpha", alpha=1.0),
    "alpha_3": dict(divergence="alpha", alpha=3.0),
    "hellinger": dict(divergence="hellinger"),
    "chi_square": dict(divergence="chi_square"),
}
OPT_CASES = {
    "temperature": dict(temperature=2.0),
    "temperature_no_t2": dict(temperature=0.5, scale_by_t_squared=False),
    "hard_mix": dict(hard_weight=0.5, soft_weight=0.5, targets=True),
    "hard_only_ignore": dict(hard_weight=1.0, soft_weight=0.0, targets=True, ignore_index=-100),
    "sum": dict(reduction="sum", targets=True),
    "none": dict(reduction="none", targets=True),
    "divisor": dict(divisor=4.0, targets=True),
    "no_targets": dict(targets=False),
    "all_jsd": dict(divergence="jsd", beta=0.25, temperature=2.0, hard_weight=0.25, soft_weight=0.75,
                    targets=True, reduction="sum"),
    "all_alpha": dict(divergence="alpha", alpha=1.5, temperature=1.5, hard_weight=0.25, targets=True,
                      scale_by_t_squared=False, divisor=3.0),
}


def split(case):
    """(kwargs for fusedhead, kwargs for the reference, use targets?)"""
    kw = {k: v for k, v in case.items() if k != "targets"}
    use_t = case.get("targets", True)
    ref = dict(kw)
    ref["divergence_name"] = ref.pop("divergence", "forward_kl")
    return kw, ref, use_t


class GradcheckDistill(unittest.TestCase):
    def check(self, case, bias=True, teacher_dtype=None):
        se, sc, sb, te, tc, tb, t = heads(21, teacher_dtype=teacher_dtype, bias=bias)
        kw, _, use_t = split(case)
        tt = t if use_t else None
        xs = (se, sc, sb) if bias else (se, sc)

        def f(*a):
            return fh.distillation_loss(a[0], a[1], te, tc, tt, a[2] if bias else None, tb, **kw)
        self.assertTrue(torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-7, rtol=1e-5))

    def test_teacher_float32_student_float64(self):
        self.check(dict(divergence="jsd", beta=0.25), teacher_dtype=torch.float32)

    def test_no_bias(self):
        self.check(dict(divergence="reverse_kl", temperature=2.0), bias=False)

    def test_teacher_gets_no_grad(self):
        se, sc, sb, te, tc, tb, t = heads(22)
        te.requires_grad_(True)
        loss = fh.distillation_loss(se, sc, te, tc, t, sb, tb)
        self.assertFalse(loss.grad_fn is None)
        g = torch.autograd.grad(loss, (te,), allow_unused=True)[0]
        self.assertIsNone(g)


add_tests(GradcheckDistill, "gradcheck", DIV_CASES, lambda case: lambda self: self.check(case))
add_tests(GradcheckDistill, "gradcheck", OPT_CASES, lambda case: lambda self: self.check(case))


def compare_dense(test, case, dtype, peaked):
    se, sc, sb, te, tc, tb, t = heads(23, dtype=dtype, peaked=peaked)
    kw, ref, use_t = split(case)
    tt = t if use_t else None
    got = fh.distillation_loss(se, sc, te, tc, tt, sb, tb, **kw)
    # The reference runs in float64 on the same stored values: fusedhead accumulates in fp64 and
    # rounds once to fp32, while PyTorch's own fp32 evaluation is not accurate enough to be the
    # oracle on peaked rows (alpha = -0.5: loss ~7e7 with a 1.4% error in PyTorch's fp32 gradient).
    up = [None if x is None else x.detach().double().requires_grad_(x.requires_grad)
          for x in (se, sc, te, tc, sb, tb)]
    want = ref_dense(up[0], up[1], up[2], up[3], tt, up[4], up[5], **ref)
    gg = torch.autograd.grad(got.sum(), (se, sc, sb))
    gw = torch.autograd.grad(want.sum(), (up[0], up[1], up[4]))
    # fp64: rounding only; the references' log-space formulas lose ~1e-14 relative when peaked.
    # fp32: the loss is fp64 rounded once (2^-24 relative; rtol 1e-6 is a margin of ~16). The
    # backward reads the forward's row state stored as fp32, so p = exp(s - lse) carries a
    # relative error up to |lse|·2^-24 (|lse| < 40 here: 2.4e-6), which then cancels in p - target;
    # atol is that error times the gradient's scale (max |ref|), with a margin of 4.
    tol = dict(rtol=1e-10, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.double(), want, **tol)
    for a, b in zip(gg, gw):
        if dtype == torch.float32:
            tol = dict(rtol=1e-5, atol=1e-5 * b.abs().max().item() + 1e-7)
        torch.testing.assert_close(a.double(), b, **tol)


class AgreesWithFormulas(unittest.TestCase):
    """forward_kl against F.kl_div(log Q, log P, log_target=True); the rest against the explicit
    formulas on materialized logits (V_t > V: the teacher's extra columns are dropped)."""


for _dt in (torch.float64, torch.float32):
    for _pk in (False, True):
        _sfx = "%s_%s" % (str(_dt).split(".")[1], "peaked" if _pk else "random")
        add_tests(AgreesWithFormulas, _sfx, dict(DIV_CASES, **OPT_CASES),
                  lambda case, dt=_dt, pk=_pk: lambda self: compare_dense(self, case, dt, pk))


class Differences(unittest.TestCase):
    def test_all_ignored_mean_is_zero(self):
        """Liger's clamp_min(1) convention; a PyTorch mean over no rows would be NaN."""
        se, sc, sb, te, tc, tb, _ = heads(24)
        t = torch.full((N,), -100)
        loss = fh.distillation_loss(se, sc, te, tc, t, sb, tb)
        self.assertEqual(loss.item(), 0.0)
        self.assertTrue(all(torch.count_nonzero(g).item() == 0 for g in torch.autograd.grad(loss, (se, sc, sb))))

    def test_forward_kl_equals_kl_div_batchmean(self):
        """mean reduction over rows = F.kl_div(..., reduction='batchmean') when no row is ignored."""
        se, sc, sb, te, tc, tb, _ = heads(25)
        X = F.log_softmax(F.linear(se, sc, sb), -1)
        Y = F.log_softmax(F.linear(te, tc, tb)[:, :V], -1)
        want = F.kl_div(X, Y, reduction="batchmean", log_target=True)
        torch.testing.assert_close(fh.distillation_loss(se, sc, te, tc, None, sb, tb), want, rtol=1e-12, atol=1e-13)


def sparse_teacher(seed, dtype=torch.float64):
    """Top-K log-probs of a random teacher (what a serving engine returns), ids shuffled."""
    g = gen(seed)
    tl = F.log_softmax(randn(g, N, V, scale=2.0), -1)
    lp, ids = tl.topk(K, -1)
    perm = torch.randperm(K, generator=g)
    return ids[:, perm], lp[:, perm], tl


def coarse_divergence(divergence, logP, logQ, beta=0.5):
    """D(P‖Q) of two (coarsened) distributions given as logs; teacher terms carry no gradient."""
    p, q = logP.exp(), logQ.exp()
    if divergence == "forward_kl":
        return torch.where(p > 0, p * (logP - logQ), torch.zeros_like(q)).sum(-1)
    if divergence == "reverse_kl":
        return (q * (logQ - logP)).sum(-1)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        tp = torch.where(p > 0, beta * p * (logP - m.log()), torch.zeros_like(q))
        return (tp + (1 - beta) * q * (logQ - m.log())).sum(-1)
    assert divergence == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


def ref_sparse(se, sc, sb, ids, lp, targets, mode, temperature=1.0, scale_by_t_squared=True, hard_weight=0.0,
               soft_weight=1.0, reduction="mean", divisor=None, divergence="forward_kl", beta=0.5):
    s = F.linear(se, sc, sb)
    X = F.log_softmax(s / temperature, -1)
    Xs = X.gather(1, ids)
    if mode == "none":
        d = (lp.exp() * (lp - Xs)).sum(-1)
    else:
        # the support plus the rest bucket: ρ = 0 (renormalize) or 1 − Σ p (remainder)
        Ys = F.log_softmax(lp / temperature, -1) if mode == "renormalize" else lp
        rho = torch.zeros_like(lp[:, 0]) if mode == "renormalize" else (1 - lp.exp().sum(-1)).clamp_min(0)
        qR = 1 - Xs.exp().sum(-1)
        d = coarse_divergence(divergence, torch.cat([Ys, rho.log()[:, None]], -1),
                              torch.cat([Xs, qR.log()[:, None]], -1), beta)
    rows = soft_weight * (temperature ** 2 if scale_by_t_squared else 1.0) * d
    valid = torch.ones(N, dtype=s.dtype)
    if targets is not None:
        valid = (targets != -100).to(s.dtype)
        if hard_weight:
            ty = torch.where(targets != -100, targets, torch.zeros_like(targets))
            rows = rows + hard_weight * F.cross_entropy(s, ty, reduction="none")
    return reduce(rows, valid, reduction, divisor)


SPARSE_CASES = {
    "renormalize": dict(sparse_mass="renormalize"),
    "renormalize_T2": dict(sparse_mass="renormalize", temperature=2.0),
    "renormalize_hard_sum": dict(sparse_mass="renormalize", hard_weight=0.5, reduction="sum"),
    "remainder": dict(sparse_mass="remainder"),
    "remainder_none_hard": dict(sparse_mass="remainder", reduction="none", hard_weight=0.25),
    "none": dict(sparse_mass="none"),
    "none_hard_sum": dict(sparse_mass="none", hard_weight=0.5, reduction="sum"),
    "renormalize_jsd_T2": dict(sparse_mass="renormalize", divergence="jsd", beta=0.25, temperature=2.0),
    "renormalize_tvd": dict(sparse_mass="renormalize", divergence="tvd"),
    "remainder_reverse_kl": dict(sparse_mass="remainder", divergence="reverse_kl"),
    "remainder_jsd": dict(sparse_mass="remainder", divergence="jsd", beta=0.75),
    "remainder_tvd": dict(sparse_mass="remainder", divergence="tvd"),
}


class SparseTeacher(unittest.TestCase):
    def run_case(self, case, dtype, grad):
        g = gen(31)
        se = randn(g, N, DS, dtype=dtype, requires_grad=True)
        sc = randn(g, V, DS, dtype=dtype, requires_grad=True)
        sb = randn(g, V, dtype=dtype, requires_grad=True)
        ids, lp, _ = sparse_teacher(32)
        lp32 = lp.float()  # the library takes fp32 log-probs; the reference uses the same values
        t = torch.randint(0, V, (N,), generator=g)
        t[3] = -100
        kw = dict(case)
        mode = kw.pop("sparse_mass")
        if grad:
            self.assertTrue(torch.autograd.gradcheck(
                lambda a, b, c: fh.sparse_distillation_loss(a, b, ids, lp32, t, c, sparse_mass=mode, **kw),
                (se, sc, sb), eps=1e-6, atol=1e-7, rtol=1e-5))
            return
        got = fh.sparse_distillation_loss(se, sc, ids, lp32, t, sb, sparse_mass=mode, **kw)
        want = ref_sparse(se, sc, sb, ids, lp32.to(dtype), t, mode, **kw)
        tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=5e-5, atol=5e-5)
        torch.testing.assert_close(got, want, **tol)
        for a, b in zip(torch.autograd.grad(got.sum(), (se, sc, sb)), torch.autograd.grad(want.sum(), (se, sc, sb))):
            torch.testing.assert_close(a, b, **tol)

    def test_full_support_renormalize_equals_dense_forward_kl(self):
        """K = V (every id given): the sparse teacher is the dense one."""
        g = gen(33)
        se = randn(g, N, DS, requires_grad=True)
        sc = randn(g, V, DS, requires_grad=True)
        # renormalized in float64 after the fp32 rounding, as the library renormalizes them
        tl = F.log_softmax(F.log_softmax(randn(g, N, V), -1).float().double(), -1)
        ids = torch.arange(V).repeat(N, 1)
        got = fh.sparse_distillation_loss(se, sc, ids, tl.float())
        want = F.kl_div(F.log_softmax(F.linear(se, sc), -1), tl, reduction="batchmean", log_target=True)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


add_tests(SparseTeacher, "gradcheck", SPARSE_CASES, lambda case: lambda self: self.run_case(case, torch.float64, True))
add_tests(SparseTeacher, "formula_float64", SPARSE_CASES,
          lambda case: lambda self: self.run_case(case, torch.float64, False))
add_tests(SparseTeacher, "formula_float32", SPARSE_CASES,
          lambda case: lambda self: self.run_case(case, torch.float32, False))


if __name__ == "__main__":
    unittest.main()
