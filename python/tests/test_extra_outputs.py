"""The optional forward outputs and backward options: linear_cross_entropy's return_z_loss /
return_token_accuracy / return_predicted_tokens / return_entropy (CrossEntropyOutput) and
filter_eps / filter_e_grad / filter_c_grad / accum_mode, and distillation's return_components.
Every value is checked against PyTorch on the materialized logits, in float64."""
import ctypes
import unittest

import torch
import torch.nn.functional as F

from _util import add_tests, gen, randn
import fusedhead as fh
from fusedhead import _lib
from test_distill import heads, reduce, ref_dense, ref_sparse, sparse_teacher
import test_distill as TD

N, D, V = 8, 4, 11
IGNORED = (1, 5)


def lce_problem(seed, dtype=torch.float64, batch=(N,), peaked=False, ignore_index=-100):
    """Inputs with ignored rows and half of the valid targets set to the row's argmax (so the
    accuracy is neither 0 nor 1 and a wrong argmax changes it)."""
    g = gen(seed)
    e = randn(g, *batch, D, dtype=dtype, requires_grad=True)
    c = randn(g, V, D, dtype=dtype, scale=5.0 if peaked else 1.0, requires_grad=True)
    b = randn(g, V, dtype=dtype, requires_grad=True)
    n = e.numel() // D
    t = torch.randint(0, V, (n,), generator=g)
    best = logits(e, c, b).argmax(-1)
    t[::2] = best[::2]
    for i in IGNORED:
        t[i] = ignore_index
    return e, c, b, t.reshape(batch)


def logits(e, c, b, logit_scale=1.0, softcap=None):
    """The final logits z in float64 of the stored values (the library's fp64 reference)."""
    z = F.linear(e.detach().double().reshape(-1, D), c.detach().double(), b.detach().double()) * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def tie_free(z):
    """Rows whose largest logit is strictly larger than the second: argmax is unambiguous."""
    top2 = z.topk(2, -1).values
    return top2[:, 0] > top2[:, 1]


ALL_FLAGS = dict(return_z_loss=True, return_token_accuracy=True, return_predicted_tokens=True, return_entropy=True)

TOKEN_CASES = {
    "plain": dict(),
    "float32": dict(dtype=torch.float32),
    "bfloat16": dict(dtype=torch.bfloat16),
    "softcap_scale": dict(kw=dict(softcap=2.0, logit_scale=0.5)),
    "peaked": dict(peaked=True),
    "batched": dict(batch=(2, 4)),
    "custom_ignore": dict(ignore_index=3),
    "label_smoothing_weights": dict(kw=dict(label_smoothing=0.25, z_loss_scale=0.5, entropy_weight=0.25)),
}


def check_tokens(test, case):
    """predicted_tokens = z.argmax(-1) on tie-free valid rows, -1 at ignored rows; token_accuracy
    = mean over valid rows of [argmax == target]."""
    ii = case.get("ignore_index", -100)
    e, c, b, t = lce_problem(7, case.get("dtype", torch.float64), case.get("batch", (N,)), case.get("peaked", False),
                             ii)
    kw = dict(case.get("kw", {}))
    out = fh.linear_cross_entropy(e, c, t, b, ignore_index=ii, return_token_accuracy=True,
                                  return_predicted_tokens=True, **kw)
    z = logits(e, c, b, kw.get("logit_scale", 1.0), kw.get("softcap"))
    tf = tie_free(z)
    test.assertGreaterEqual(int(tf.sum()), N - 1)  # the comparison below is not vacuous
    tflat = t.reshape(-1)
    valid = tflat != ii
    pred = out.predicted_tokens
    test.assertEqual(pred.dtype, torch.int64)
    test.assertEqual(tuple(pred.shape), tuple(t.shape))
    pred = pred.reshape(-1)
    want = torch.where(valid, z.argmax(-1), torch.full_like(tflat, -1))
    test.assertTrue(torch.equal(pred[tf | ~valid], want[tf | ~valid]), (pred, want))
    acc = (want == tflat)[valid].double().mean()
    test.assertEqual(out.token_accuracy.shape, ())
    # The library's fp64 ratio rounded once to the stats dtype (fp32 unless the inputs are fp64).
    test.assertEqual(out.token_accuracy.dtype, torch.float64 if e.dtype == torch.float64 else torch.float32)
    test.assertEqual(out.token_accuracy.item(), acc.to(out.token_accuracy.dtype).item())
    test.assertTrue(0.0 < acc.item() < 1.0)


class Tokens(unittest.TestCase):
    def test_all_ignored(self):
        e, c, b, t = lce_problem(8)
        t[:] = -100
        out = fh.linear_cross_entropy(e, c, t, b, return_token_accuracy=True, return_predicted_tokens=True)
        self.assertEqual(out.token_accuracy.item(), 0.0)
        self.assertTrue(bool((out.predicted_tokens == -1).all()))


add_tests(Tokens, "tokens", TOKEN_CASES, lambda case: lambda self: check_tokens(self, case))


Z_CASES = {
    "mean": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "mean_weighted": dict(token_weights=True, weight=True),  # class weights leave D_reg alone
    "divisor": dict(divisor=5.0, token_weights=True),
    "softcap_scale": dict(softcap=3.0, temperature=2.0),
    "float32": dict(dtype=torch.float32),
}


def check_z_loss(test, case):
    kw = dict(case)
    dtype = kw.pop("dtype", torch.float64)
    e, c, b, t = lce_problem(9, dtype)
    lam = 0.25
    tw = torch.linspace(0.5, 1.5, N, dtype=dtype) if kw.pop("token_weights", False) else None
    cw = torch.linspace(0.25, 2.0, V, dtype=dtype) if kw.pop("weight", False) else None
    out = fh.linear_cross_entropy(e, c, t, b, z_loss_scale=lam, token_weights=tw, weight=cw, return_z_loss=True,
                                  **kw)
    scale = 1.0 / kw["temperature"] if "temperature" in kw else 1.0
    z = logits(e, c, b, scale, kw.get("softcap"))
    valid = (t != -100).double()
    om = valid * (tw.double() if tw is not None else 1.0)
    rows = lam * om * torch.logsumexp(z, -1) ** 2
    red = kw.get("reduction", "mean")
    want = rows if red == "none" else rows.sum() if red == "sum" else rows.sum() / (kw.get("divisor") or om.sum())
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    test.assertFalse(out.z_loss.requires_grad)
    test.assertEqual(out.z_loss.shape, out.loss.shape)
    torch.testing.assert_close(out.z_loss.double(), want, **tol)
    # It is the part of the loss that z_loss_scale adds.
    base = fh.linear_cross_entropy(e, c, t, b, token_weights=tw, weight=cw, **kw)
    torch.testing.assert_close((out.loss - out.z_loss).double(), base.detach().double(), **tol)


class ZLoss(unittest.TestCase):
    def test_mean_is_lambda_mean_lse_squared(self):
        """The brief's definition, spelled out: λ·mean over valid rows of lse²."""
        e, c, b, t = lce_problem(10)
        out = fh.linear_cross_entropy(e, c, t, b, z_loss_scale=1e-2, return_z_loss=True)
        lse = torch.logsumexp(logits(e, c, b), -1)[t != -100]
        torch.testing.assert_close(out.z_loss, 1e-2 * (lse ** 2).mean(), rtol=1e-6, atol=0.0)  # λ is fp32

    def test_zero_scale_gives_zero(self):
        e, c, b, t = lce_problem(11)
        out = fh.linear_cross_entropy(e, c, t, b, return_z_loss=True)
        self.assertEqual(out.z_loss.item(), 0.0)


add_tests(ZLoss, "z_loss", Z_CASES, lambda case: lambda self: check_z_loss(self, case))


ENTROPY_CASES = {
    "plain": dict(),
    "softcap_scale": dict(softcap=2.0, logit_scale=1.5),
    "with_entropy_weight": dict(entropy_weight=-0.5),
    "batched_none": dict(batch=(2, 4), reduction="none"),
    "float32": dict(dtype=torch.float32),
    "peaked": dict(peaked=True),
}


def check_entropy(test, case):
    kw = dict(case)
    dtype, batch, peaked = kw.pop("dtype", torch.float64), kw.pop("batch", (N,)), kw.pop("peaked", False)
    e, c, b, t = lce_problem(12, dtype, batch, peaked)
    out = fh.linear_cross_entropy(e, c, t, b, return_entropy=True, **kw)
    z = logits(e, c, b, kw.get("logit_scale", 1.0), kw.get("softcap"))
    logp = F.log_softmax(z, -1)
    want = -(logp.exp() * logp).sum(-1) * (t.reshape(-1) != -100)
    test.assertFalse(out.entropy.requires_grad)
    test.assertEqual(tuple(out.entropy.shape), tuple(t.shape))
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.entropy.double().reshape(-1), want, **tol)
    test.assertTrue(bool((out.entropy.reshape(-1)[list(IGNORED)] == 0).all()))


class Entropy(unittest.TestCase):
    def test_entropy_weight_gradient_still_flows_through_loss(self):
        """The returned entropy is detached, the entropy term of the loss is not."""
        e, c, b, t = lce_problem(13)
        out = fh.linear_cross_entropy(e, c, t, b, entropy_weight=0.5, return_entropy=True)
        plain = fh.linear_cross_entropy(e, c, t, b, entropy_weight=0.5)
        for x, y in zip(torch.autograd.grad(out.loss, (e, c, b)), torch.autograd.grad(plain, (e, c, b))):
            self.assertTrue(torch.equal(x, y))
        self.assertTrue(torch.autograd.gradcheck(
            lambda a: fh.linear_cross_entropy(a, c, t, b, entropy_weight=0.5, return_entropy=True).loss, (e,)))


add_tests(Entropy, "entropy", ENTROPY_CASES, lambda case: lambda self: check_entropy(self, case))


class ReturnConvention(unittest.TestCase):
    def test_plain_and_return_lse_unchanged(self):
        e, c, b, t = lce_problem(14)
        loss = fh.linear_cross_entropy(e, c, t, b)
        self.assertIsInstance(loss, torch.Tensor)
        res = fh.linear_cross_entropy(e, c, t, b, return_lse=True)
        self.assertIs(type(res), tuple)
        self.assertEqual(len(res), 2)
        self.assertTrue(torch.equal(res[0], loss))

    def test_namedtuple_fields_none_unless_asked(self):
        e, c, b, t = lce_problem(15)
        for flag, field in (("return_z_loss", "z_loss"), ("return_token_accuracy", "token_accuracy"),
                            ("return_predicted_tokens", "predicted_tokens"), ("return_entropy", "entropy")):
            out = fh.linear_cross_entropy(e, c, t, b, **{flag: True})
            self.assertIsInstance(out, fh.CrossEntropyOutput)
            self.assertEqual(out._fields, ("loss", "lse", "z_loss", "token_accuracy", "predicted_tokens", "entropy"))
            for name in out._fields:
                if name in ("loss", field):
                    self.assertIsInstance(getattr(out, name), torch.Tensor, name)
                else:
                    self.assertIsNone(getattr(out, name), (flag, name))

    def test_all_flags_leave_loss_lse_and_grads_bitwise_unchanged(self):
        e, c, b, t = lce_problem(16)
        kw = dict(softcap=3.0, z_loss_scale=0.25, entropy_weight=0.125, label_smoothing=0.25)
        out = fh.linear_cross_entropy(e, c, t, b, return_lse=True, **ALL_FLAGS, **kw)
        loss, lse = fh.linear_cross_entropy(e, c, t, b, return_lse=True, **kw)
        self.assertTrue(torch.equal(out.loss, loss) and torch.equal(out.lse, lse))
        for x in (out.z_loss, out.token_accuracy, out.predicted_tokens, out.entropy):
            self.assertFalse(x.requires_grad)
        ga = torch.autograd.grad(out.loss + (out.lse ** 2).sum(), (e, c, b))
        gb = torch.autograd.grad(loss + (lse ** 2).sum(), (e, c, b))
        for x, y in zip(ga, gb):
            self.assertTrue(torch.equal(x, y))

    def test_empty_batch(self):
        g = gen(17)
        e = randn(g, 0, D, requires_grad=True)
        c = randn(g, V, D, requires_grad=True)
        t = torch.zeros(0, dtype=torch.int64)
        for red in ("mean", "none"):
            out = fh.linear_cross_entropy(e, c, t, reduction=red, return_lse=True, **ALL_FLAGS)
            self.assertEqual(out.token_accuracy.item(), 0.0)
            self.assertEqual(tuple(out.predicted_tokens.shape), (0,))
            self.assertEqual(tuple(out.entropy.shape), (0,))
            self.assertEqual(tuple(out.z_loss.shape), tuple(out.loss.shape))
            self.assertEqual(float(out.z_loss.sum()), 0.0)
            out.loss.sum().backward()


class BackwardOptions(unittest.TestCase):
    """filter_eps, filter_e_grad, filter_c_grad and accum_mode reach both C calls as the C fields,
    and (CPU backend) change nothing in the results."""

    def capture(self, **kw):
        seen = {}
        originals = {name: getattr(_lib.lib, name) for name in ("fh_linear_ce_forward", "fh_linear_ce_backward")}

        def spy(name):
            def call(*args):
                o = args[1]._obj  # the LinearCEOptions behind ctypes.byref
                seen[name] = (o.filter_eps, o.filter_e_grad, o.filter_c_grad, o.accum_mode)
                return originals[name](*args)
            return call

        e, c, b, t = lce_problem(18)
        try:
            for name in originals:
                setattr(_lib.lib, name, spy(name))
            loss = fh.linear_cross_entropy(e, c, t, b, **kw)
            grads = torch.autograd.grad(loss, (e, c, b))
        finally:
            for name, fn_ in originals.items():
                setattr(_lib.lib, name, fn_)
        self.assertEqual(set(seen), set(originals))
        self.assertEqual(seen["fh_linear_ce_forward"], seen["fh_linear_ce_backward"])
        return seen["fh_linear_ce_forward"], loss, grads

    def test_defaults(self):
        self.assertEqual(self.capture()[0], (-1.0, 1, 1, 0))  # FH_FILTER_EPS_AUTO, on, on, FP32

    def test_values_reach_c_and_cpu_results_do_not_change(self):
        base, loss0, g0 = self.capture()
        f32 = ctypes.c_float(1e-3).value
        for kw, want in ((dict(filter_eps=0.0), (0.0, 1, 1, 0)),
                         (dict(filter_eps=1e-3, filter_e_grad=False), (f32, 0, 1, 0)),
                         (dict(filter_c_grad=False, accum_mode="output_dtype"), (-1.0, 1, 0, 1)),
                         (dict(accum_mode="deterministic", filter_eps=None), (-1.0, 1, 1, 2)),
                         (dict(accum_mode="fp32"), (-1.0, 1, 1, 0))):
            got, loss, grads = self.capture(**kw)
            self.assertEqual(got, want, kw)
            self.assertTrue(torch.equal(loss, loss0))
            for x, y in zip(grads, g0):
                self.assertTrue(torch.equal(x, y), kw)


# ---------------------------------------------------------------------------------------------
# Distillation components
# ---------------------------------------------------------------------------------------------

COMPONENT_CASES = {
    "mean": dict(hard_weight=0.25, soft_weight=0.75),
    "sum_jsd_T2": dict(divergence="jsd", beta=0.25, temperature=2.0, hard_weight=0.5, reduction="sum"),
    "none_tvd": dict(divergence="tvd", hard_weight=1.5, soft_weight=0.5, reduction="none"),
    "divisor_no_t2": dict(temperature=0.5, scale_by_t_squared=False, hard_weight=0.25, divisor=3.0),
    "soft_only": dict(),
    "no_targets": dict(targets=False),
    "float32": dict(hard_weight=0.5, soft_weight=2.0, dtype=torch.float32),
}


def hard_ref(s, targets, reduction, divisor, ignore_index=-100):
    valid = (targets != ignore_index).to(s.dtype)
    ty = torch.where(targets != ignore_index, targets, torch.zeros_like(targets))
    return reduce(F.cross_entropy(s, ty, reduction="none"), valid, reduction, divisor)


def check_components(test, soft, hard, loss, plain, hw, sw, want_soft, want_hard, tol, inputs):
    for x in (soft, hard):
        test.assertFalse(x.requires_grad)
        test.assertEqual(x.shape, loss.shape)
    torch.testing.assert_close(soft.double(), want_soft, **tol)
    torch.testing.assert_close(hard.double(), want_hard, **tol)
    torch.testing.assert_close(loss.detach().double(), hw * hard.double() + sw * soft.double(), **tol)
    test.assertTrue(torch.equal(loss, plain))
    for x, y in zip(torch.autograd.grad(loss.sum(), inputs), torch.autograd.grad(plain.sum(), inputs)):
        test.assertTrue(torch.equal(x, y))


def check_dense_components(test, case):
    kw = dict(case)
    dtype = kw.pop("dtype", torch.float64)
    use_t = kw.pop("targets", True)
    se, sc, sb, te, tc, tb, t = heads(41, dtype=dtype)
    tt = t if use_t else None
    loss, soft, hard = fh.distillation_loss(se, sc, te, tc, tt, sb, tb, return_components=True, **kw)
    plain = fh.distillation_loss(se, sc, te, tc, tt, sb, tb, **kw)
    hw, sw = kw.pop("hard_weight", 0.0), kw.pop("soft_weight", 1.0)
    ref = dict(kw)
    ref["divergence_name"] = ref.pop("divergence", "forward_kl")
    up = [x.detach().double() for x in (se, sc, te, tc, sb, tb)]
    want_soft = ref_dense(up[0], up[1], up[2], up[3], tt, up[4], up[5], **ref)  # soft_weight 1, hard 0
    red, div = kw.get("reduction", "mean"), kw.get("divisor")
    # hard_loss is the CE only when it is part of the loss (hard_weight != 0): documented.
    want_hard = hard_ref(F.linear(up[0], up[1], up[4]), tt, red, div) if hw else torch.zeros_like(want_soft)
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    check_components(test, soft, hard, loss, plain, hw, sw, want_soft, want_hard, tol, (se, sc, sb))


class DistillComponents(unittest.TestCase):
    def test_default_return_is_the_loss_alone(self):
        se, sc, sb, te, tc, tb, t = heads(42)
        self.assertIsInstance(fh.distillation_loss(se, sc, te, tc, t, sb, tb), torch.Tensor)
        ids, lp, _ = sparse_teacher(43)
        self.assertIsInstance(fh.sparse_distillation_loss(se, sc, ids, lp.float(), t, sb), torch.Tensor)

    def test_batched_none_shapes(self):
        g = gen(44)
        se = randn(g, 2, 3, TD.DS, requires_grad=True)
        sc = randn(g, TD.V, TD.DS, requires_grad=True)
        te, tc = randn(g, 2, 3, TD.DT), randn(g, TD.VT, TD.DT)
        t = torch.randint(0, TD.V, (2, 3), generator=g)
        loss, soft, hard = fh.distillation_loss(se, sc, te, tc, t, hard_weight=0.5, reduction="none",
                                                return_components=True)
        self.assertEqual(tuple(loss.shape), (2, 3))
        self.assertEqual(tuple(soft.shape), (2, 3))
        self.assertEqual(tuple(hard.shape), (2, 3))
        torch.testing.assert_close(loss.detach(), 0.5 * hard + soft, rtol=1e-12, atol=1e-13)


add_tests(DistillComponents, "dense", COMPONENT_CASES, lambda case: lambda self: check_dense_components(self, case))

SPARSE_COMPONENT_CASES = {
    "renormalize_mean": dict(sparse_mass="renormalize", hard_weight=0.5, soft_weight=0.75),
    "renormalize_T2_sum": dict(sparse_mass="renormalize", temperature=2.0, hard_weight=0.25, reduction="sum"),
    "remainder_none": dict(sparse_mass="remainder", hard_weight=1.5, reduction="none"),
}


def check_sparse_components(test, case):
    kw = dict(case)
    g = gen(45)
    se = randn(g, TD.N, TD.DS, requires_grad=True)
    sc = randn(g, TD.V, TD.DS, requires_grad=True)
    sb = randn(g, TD.V, requires_grad=True)
    ids, lp, _ = sparse_teacher(46)
    lp32 = lp.float()
    t = torch.randint(0, TD.V, (TD.N,), generator=g)
    t[3] = -100
    loss, soft, hard = fh.sparse_distillation_loss(se, sc, ids, lp32, t, sb, return_components=True, **kw)
    plain = fh.sparse_distillation_loss(se, sc, ids, lp32, t, sb, **kw)
    mode = kw.pop("sparse_mass")
    hw, sw = kw.pop("hard_weight", 0.0), kw.pop("soft_weight", 1.0)
    want_soft = ref_sparse(se.detach(), sc.detach(), sb.detach(), ids, lp32.double(), t, mode, **kw)
    want_hard = hard_ref(F.linear(se.detach(), sc.detach(), sb.detach()), t, kw.get("reduction", "mean"), None)
    check_components(test, soft, hard, loss, plain, hw, sw, want_soft, want_hard, dict(rtol=1e-11, atol=1e-12),
                     (se, sc, sb))


add_tests(DistillComponents, "sparse", SPARSE_COMPONENT_CASES,
          lambda case: lambda self: check_sparse_components(self, case))


if __name__ == "__main__":
    unittest.main()
