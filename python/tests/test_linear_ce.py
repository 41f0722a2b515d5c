"""linear_cross_entropy: gradcheck of every option, agreement with F.cross_entropy and with the
header's formulas on materialized logits, and the deliberate differences from PyTorch."""
import unittest

import torch
import torch.nn.functional as F

from _util import add_tests, gen, randn
import fusedhead as fh

N, D, V = 6, 4, 9


def ref_loss(e, c, targets, bias=None, ignore_index=-100, reduction="mean", softcap=None, label_smoothing=0.0,
             weight=None, token_weights=None, z_loss_scale=0.0, logit_scale=None, temperature=None,
             entropy_weight=0.0, divisor=None, return_lse=False):
    """include/fusedhead.h's definition, written with torch ops on materialized logits."""
    e2, t = e.reshape(-1, e.shape[-1]), targets.reshape(-1)
    scale = 1.0 / temperature if temperature is not None else (logit_scale if logit_scale is not None else 1.0)
    z = F.linear(e2, c, bias) * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = t != ignore_index
    ty = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(z, -1)
    logp = z - lse[:, None]
    w = weight if weight is not None else torch.ones(c.shape[0], dtype=z.dtype)
    om = token_weights.reshape(-1) if token_weights is not None else torch.ones_like(lse)
    om = om * valid
    a, eps = label_smoothing, label_smoothing / c.shape[0]
    nll = -logp.gather(1, ty[:, None])[:, 0]
    ce = om * (w[ty] * (1 - a) * nll + eps * (-(logp * w).sum(-1)))
    ent = -(logp.exp() * logp).sum(-1)
    reg = om * (z_loss_scale * lse ** 2 + entropy_weight * ent)
    if reduction == "none":
        loss = (ce + reg).reshape(targets.shape)
    elif reduction == "sum":
        loss = (ce + reg).sum()
    else:
        d_ce = divisor if divisor else (om * w[ty]).sum()
        d_reg = divisor if divisor else om.sum()
        loss = ce.sum() / d_ce + reg.sum() / d_reg
    if return_lse:
        return loss, (lse * valid).reshape(targets.shape)
    return loss


def problem(seed, dtype=torch.float64, bias=True, peaked=False, n=N):
    g = gen(seed)
    e = randn(g, n, D, dtype=dtype, requires_grad=True)
    c = randn(g, V, D, dtype=dtype, scale=6.0 if peaked else 1.0, requires_grad=True)
    b = randn(g, V, dtype=dtype, requires_grad=True) if bias else None
    t = torch.randint(0, V, (n,), generator=g)
    t[1] = -100
    return e, c, b, t


def custom_ignore(case, t):
    """With a custom ignore_index, -100 is an ordinary (out-of-range) target: use the custom one."""
    if case.get("ignore_index") is None:
        return t
    t = t.clone()
    t[1] = 0
    t[2] = case["ignore_index"]
    return t


def class_weights(dtype=torch.float64):
    return torch.linspace(0.25, 2.0, V, dtype=dtype)


def token_weights(dtype=torch.float64):
    return torch.linspace(0.5, 1.5, N, dtype=dtype)


# Option values exactly representable in fp32 (the C options are float), so float64 runs compare
# with PyTorch's double arithmetic to rounding error.
CASES = {
    "plain": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "softcap": dict(softcap=2.5),
    "label_smoothing": dict(label_smoothing=0.25),
    "class_weights": dict(weight="w"),
    "token_weights": dict(token_weights="tw"),
    "z_loss": dict(z_loss_scale=0.125),
    "logit_scale": dict(logit_scale=1.5),
    "temperature": dict(temperature=2.0),
    "entropy": dict(entropy_weight=0.25),
    "entropy_bonus": dict(entropy_weight=-0.5),
    "divisor": dict(divisor=10.0),
    "ignore_index_custom": dict(ignore_index=3),
    "ls_weights": dict(label_smoothing=0.25, weight="w"),
    "ls_weights_sum": dict(label_smoothing=0.25, weight="w", reduction="sum"),
    "weights_z_entropy": dict(weight="w", token_weights="tw", z_loss_scale=0.125, entropy_weight=0.25),
    "all_mean": dict(softcap=3.0, label_smoothing=0.125, weight="w", token_weights="tw", z_loss_scale=0.0625,
                     logit_scale=0.75, entropy_weight=0.125),
    "all_none": dict(softcap=3.0, label_smoothing=0.125, weight="w", token_weights="tw", z_loss_scale=0.0625,
                     logit_scale=0.75, entropy_weight=0.125, reduction="none"),
    "all_sum_divisor": dict(softcap=3.0, label_smoothing=0.125, weight="w", z_loss_scale=0.0625,
                            temperature=0.5, entropy_weight=-0.125, reduction="sum", divisor=7.0),
    "all_divisor": dict(softcap=3.0, label_smoothing=0.125, weight="w", z_loss_scale=0.0625, divisor=7.0),
}


def resolve(case, dtype=torch.float64):
    kw = dict(case)
    if kw.get("weight") == "w":
        kw["weight"] = class_weights(dtype)
    if kw.get("token_weights") == "tw":
        kw["token_weights"] = token_weights(dtype)
    return kw


class GradcheckLinearCE(unittest.TestCase):
    """torch.autograd.gradcheck (float64 central differences vs fh_linear_ce_backward)."""

    def check(self, case, return_lse=False, bias=True, seed=1):
        e, c, b, t = problem(seed, bias=bias)
        kw = resolve(case)
        t = custom_ignore(case, t)
        inputs = (e, c, b) if bias else (e, c)

        def f(*xs):
            return fh.linear_cross_entropy(xs[0], xs[1], t, xs[2] if bias else None, return_lse=return_lse, **kw)
        self.assertTrue(torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5))


add_tests(GradcheckLinearCE, "gradcheck", CASES, lambda case: lambda self: self.check(case))
add_tests(GradcheckLinearCE, "gradcheck_lse", {k: CASES[k] for k in ("plain", "none", "softcap", "all_mean")},
          lambda case: lambda self: self.check(case, return_lse=True))


class GradcheckLinearCEMore(unittest.TestCase):
    def test_no_bias(self):
        GradcheckLinearCE().check(CASES["all_mean"], bias=False)

    def test_lse_only_gradient(self):
        """A user-side z-loss on the returned lse alone: backward gets grad_loss None, grad_lse set."""
        e, c, b, t = problem(2)
        self.assertTrue(torch.autograd.gradcheck(
            lambda e, c, b: (fh.linear_cross_entropy(e, c, t, b, return_lse=True)[1] ** 2).sum(), (e, c, b)))

    def test_batched_input(self):
        """e [2, 3, D] and targets [2, 3]: flattened, the loss shaped like targets for none."""
        g = gen(3)
        e = randn(g, 2, 3, D, requires_grad=True)
        c = randn(g, V, D, requires_grad=True)
        t = torch.randint(0, V, (2, 3), generator=g)
        out = fh.linear_cross_entropy(e, c, t, reduction="none")
        self.assertEqual(tuple(out.shape), (2, 3))
        self.assertTrue(torch.autograd.gradcheck(lambda e, c: fh.linear_cross_entropy(e, c, t, reduction="none"),
                                                 (e, c)))

    def test_row_strided_input(self):
        """Rows of a wider buffer (row_stride > D) are passed without a copy and give the same grads."""
        g = gen(4)
        wide = randn(g, N, 2 * D, requires_grad=True)
        c = randn(g, V, D, requires_grad=True)
        t = torch.randint(0, V, (N,), generator=g)
        self.assertTrue(torch.autograd.gradcheck(lambda w, c: fh.linear_cross_entropy(w[:, 1:1 + D], c, t),
                                                 (wide, c)))

    def test_needs_input_grad_subset(self):
        """Only c requires grad: e gets none, and the result equals the full computation's dC."""
        e, c, b, t = problem(5)
        e0, b0 = e.detach(), b.detach()
        (dc_only,) = torch.autograd.grad(fh.linear_cross_entropy(e0, c, t, b0), (c,))
        _, dc_all, _ = torch.autograd.grad(fh.linear_cross_entropy(e, c, t, b), (e, c, b))
        self.assertTrue(torch.equal(dc_only, dc_all))


def compare(test, case, dtype, peaked, seed, against_torch_ce):
    """Loss and gradients of fusedhead vs the reference on materialized logits."""
    e, c, b, t = problem(seed, dtype=dtype, peaked=peaked)
    kw = resolve(case, dtype)
    t = custom_ignore(case, t)
    got = fh.linear_cross_entropy(e, c, t, b, **kw)
    if against_torch_ce:
        want = F.cross_entropy(F.linear(e, c, b), t, **kw)
    else:
        want = ref_loss(e, c, t, b, **kw)
    g_got = torch.autograd.grad(got.sum(), (e, c, b))
    g_want = torch.autograd.grad(want.sum(), (e, c, b))
    # fp64: both sides are exact to ~1e-15 relative; fp32: PyTorch computes in fp32 (error
    # ~ V·2^-24 relative per logit, amplified by x6 logits when peaked), fusedhead in fp64 then
    # rounds once; 2e-5 relative covers both with a margin of ~10.
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got, want, **tol)
    for a, w in zip(g_got, g_want):
        torch.testing.assert_close(a, w, **tol)


TORCH_CASES = {k: CASES[k] for k in ("plain", "sum", "none", "label_smoothing", "class_weights",
                                     "ignore_index_custom", "ls_weights", "ls_weights_sum")}


class AgreesWithPyTorch(unittest.TestCase):
    """F.cross_entropy(F.linear(e, c, bias), targets, ...) for the options PyTorch has, exactly
    (to rounding): including PyTorch 1.13's mean with class weights and label smoothing, whose
    denominator is Σ w_y over valid rows for both terms, the header's D_ce."""


for _dt in (torch.float64, torch.float32):
    for _pk in (False, True):
        _sfx = "%s_%s" % (str(_dt).split(".")[1], "peaked" if _pk else "random")
        add_tests(AgreesWithPyTorch, "torch_" + _sfx, TORCH_CASES,
                  lambda case, dt=_dt, pk=_pk: lambda self: compare(self, case, dt, pk, 11, True))


class AgreesWithFormula(unittest.TestCase):
    """Options PyTorch lacks (softcap, z-loss, entropy, token weights, scale, divisor): the
    header's formulas with torch ops on materialized logits."""


for _dt in (torch.float64, torch.float32):
    for _pk in (False, True):
        _sfx = "%s_%s" % (str(_dt).split(".")[1], "peaked" if _pk else "random")
        add_tests(AgreesWithFormula, "formula_" + _sfx, CASES,
                  lambda case, dt=_dt, pk=_pk: lambda self: compare(self, case, dt, pk, 12, False))


class DeliberateDifferences(unittest.TestCase):
    def test_all_ignored_mean_is_zero_not_nan(self):
        """Every target ignored: PyTorch's mean is NaN (0/0); fusedhead returns 0 and zero grads,
        so a padding-only micro-batch cannot poison an accumulated step."""
        e, c, b, _ = problem(6)
        t = torch.full((N,), -100)
        ours = fh.linear_cross_entropy(e, c, t, b)
        theirs = F.cross_entropy(F.linear(e, c, b), t)
        self.assertTrue(torch.isnan(theirs).item())
        self.assertEqual(ours.item(), 0.0)
        grads = torch.autograd.grad(ours, (e, c, b))
        self.assertTrue(all(torch.count_nonzero(g).item() == 0 for g in grads))

    def test_zero_total_class_weight_is_zero_not_nan(self):
        e, c, b, t = problem(7)
        w = torch.zeros(V, dtype=torch.float64)
        self.assertEqual(fh.linear_cross_entropy(e, c, t, b, weight=w).item(), 0.0)
        self.assertTrue(torch.isnan(F.cross_entropy(F.linear(e, c, b), t, weight=w)).item())

    def test_float64_options_are_float32(self):
        """The C options struct holds float: label_smoothing=0.2 is used as float32(0.2), so in
        float64 the result differs from PyTorch's by ~1e-9 relative, not 1e-15."""
        e, c, b, t = problem(8)
        ours = fh.linear_cross_entropy(e, c, t, b, label_smoothing=0.2)
        exact = F.cross_entropy(F.linear(e, c, b), t, label_smoothing=0.2)
        as_f32 = F.cross_entropy(F.linear(e, c, b), t, label_smoothing=float(torch.tensor(0.2).float()))
        torch.testing.assert_close(ours, as_f32, rtol=1e-13, atol=1e-13)
        self.assertGreater(abs(ours.item() - exact.item()), 1e-12)

    def test_ignored_row_lse_is_zero(self):
        e, c, b, t = problem(9)
        _, lse = fh.linear_cross_entropy(e, c, t, b, return_lse=True)
        self.assertEqual(lse[1].item(), 0.0)
        torch.testing.assert_close(lse[0], torch.logsumexp(F.linear(e, c, b)[0], 0), rtol=1e-13, atol=1e-13)


class LowPrecision(unittest.TestCase):
    def test_bf16_and_fp16_match_fp64_of_rounded_inputs(self):
        """fp16/bf16 inputs: the reference computes in fp64 from the exact stored values and rounds
        the loss once to fp32, so it equals the fp64 loss of the same (upcast) values to fp32 rounding."""
        for dt in (torch.float16, torch.bfloat16):
            e, c, b, t = problem(10, dtype=dt)
            got = fh.linear_cross_entropy(e, c, t, b)
            self.assertEqual(got.dtype, torch.float32)
            want = F.cross_entropy(F.linear(e.double(), c.double(), b.double()), t)
            torch.testing.assert_close(got.double(), want, rtol=2e-7, atol=2e-7)
            de, dc, db = torch.autograd.grad(got, (e, c, b))
            self.assertEqual((de.dtype, dc.dtype, db.dtype), (dt, dt, dt))
            we, wc, wb = torch.autograd.grad(want, (e, c, b))
            # one rounding to the 8 (bf16) or 11 (fp16) bit mantissa: 2^-8 relative, plus atol for
            # entries near 0.
            for a, w in ((de, we), (dc, wc), (db, wb)):
                torch.testing.assert_close(a.double(), w.to(dt).double(), rtol=2 ** -7, atol=1e-3)



class EmptyBatch(unittest.TestCase):
    def test_n0_every_reduction_and_distill_and_sample(self):
        """N = 0: loss 0 (mean/sum) or an empty [0] (none), zero gradients, no NULL-pointer error."""
        e = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
        c = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
        t = torch.zeros(0, dtype=torch.int64)
        for red in ("mean", "sum", "none"):
            loss = fh.linear_cross_entropy(e, c, t, reduction=red)
            self.assertEqual(tuple(loss.shape), (0,) if red == "none" else ())
            (dc,) = torch.autograd.grad(loss.sum(), (c,))
            self.assertEqual(torch.count_nonzero(dc).item(), 0)
        d = fh.distillation_loss(e, c, torch.zeros(0, 3), torch.randn(V, 3), reduction="none")
        self.assertEqual(tuple(d.shape), (0,))
        self.assertEqual(tuple(fh.sample(torch.randn(0, V)).tokens.shape), (0,))


if __name__ == "__main__":
    unittest.main()
