"""What a new user meets first (docs/conventions.md): -inf logits (masked classes), fp32 accuracy at
large logits, hidden size 0, double backward, messages in the user's terms, threads."""
import ctypes
import unittest

import torch
import torch.nn.functional as F

from _util import gen, randn
import fusedhead as fh
from fusedhead import _lib

N, D, V = 6, 4, 9
MASK = torch.tensor([0, 1, 0, 0, 1, 0, 0, 1, 0], dtype=torch.bool)


def head(seed, dtype=torch.float64):
    g = gen(seed)
    e = randn(g, N, D, dtype=dtype)
    e[:, 0] = e[:, 0].abs() + 0.5  # so that C[j, 0] = -inf gives a -inf logit
    c = randn(g, V, D, dtype=dtype)
    b = randn(g, V, dtype=dtype, scale=0.5)
    keep = (~MASK).nonzero().flatten()
    t = keep[torch.randint(0, len(keep), (N,), generator=g)]
    return e, c, b, t


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


class MaskedClasses(unittest.TestCase):
    """Oracle: PyTorch on the vocabulary without the masked classes (and, where PyTorch defines it,
    PyTorch on the masked logits directly)."""

    def check(self, via_c, **kw):
        e, c, b, t = head(3)
        if via_c:
            c[MASK, 0] = float("-inf")
        else:
            b[MASK] = float("-inf")
        e, c, b = (x.clone().requires_grad_() for x in (e, c, b))
        loss = fh.linear_cross_entropy(e, c, t, b, **kw)
        ge, gc, gb = grads(loss, e, c, b)
        keep = (~MASK).nonzero().flatten()
        remap = torch.full((V,), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        e2, c2, b2 = (x.detach().clone().requires_grad_() for x in (e, c[keep], b[keep]))
        z = F.linear(e2, c2, b2)
        if kw.get("softcap"):
            z = kw["softcap"] * torch.tanh(z / kw["softcap"])
        ref = F.cross_entropy(z, remap[t], label_smoothing=kw.get("label_smoothing", 0.0))
        if kw.get("z_loss_scale"):
            ref = ref + kw["z_loss_scale"] * (torch.logsumexp(z, 1) ** 2).mean()
        re, rc, rb = grads(ref, e2, c2, b2)
        self.assertTrue(torch.allclose(loss, ref, rtol=1e-12, atol=1e-12), (loss, ref))
        self.assertTrue(torch.allclose(ge, re, rtol=1e-10, atol=1e-12))
        self.assertTrue(torch.allclose(gc[keep], rc, rtol=1e-10, atol=1e-12))
        self.assertTrue(torch.allclose(gb[keep], rb, rtol=1e-10, atol=1e-12))
        self.assertTrue(bool((gc[MASK] == 0).all()) and bool((gb[MASK] == 0).all()), "masked classes: zero gradient")

    def test_bias_minus_inf_matches_torch_directly(self):
        e, c, b, t = head(4)
        b[MASK] = float("-inf")
        e, c, b = (x.clone().requires_grad_() for x in (e, c, b))
        loss = fh.linear_cross_entropy(e, c, t, b)
        ref = F.cross_entropy(F.linear(e, c, b), t)
        self.assertTrue(torch.isfinite(loss) and torch.allclose(loss, ref, rtol=1e-12), (loss, ref))
        for mine, theirs in zip(grads(loss, e, c, b), grads(ref, e, c, b)):
            self.assertTrue(torch.allclose(mine, theirs, rtol=1e-10, atol=1e-13))

    def test_bias_minus_inf_options(self):
        for kw in (dict(), dict(label_smoothing=0.125), dict(softcap=3.0), dict(z_loss_scale=2 ** -7),
                   dict(label_smoothing=0.25, softcap=2.0, z_loss_scale=2 ** -10)):  # exact in fp32 options
            with self.subTest(**kw):
                self.check(False, **kw)

    def test_c_minus_inf_options(self):
        for kw in (dict(), dict(label_smoothing=0.125), dict(softcap=3.0)):
            with self.subTest(**kw):
                self.check(True, **kw)

    def test_masked_target_gives_inf_like_torch(self):
        e, c, b, t = head(5)
        b[MASK] = float("-inf")
        t[1] = 4  # a masked class
        loss = fh.linear_cross_entropy(e, c, t, b, reduction="none")
        ref = F.cross_entropy(F.linear(e, c, b), t, reduction="none")
        self.assertEqual(loss[1].item(), float("inf"))
        self.assertTrue(torch.equal(torch.isinf(loss), torch.isinf(ref)))
        self.assertTrue(torch.allclose(loss[torch.isfinite(ref)], ref[torch.isfinite(ref)], rtol=1e-12))

    def test_distillation_padded_vocabulary(self):
        e, c, b, t = head(6)
        te, tc, tb, _ = head(7)
        b[MASK] = float("-inf")
        tb[MASK] = float("-inf")
        keep = (~MASK).nonzero().flatten()
        e = e.requires_grad_()
        for div in ("forward_kl", "reverse_kl", "jsd", "tvd", "alpha"):
            with self.subTest(divergence=div):
                loss = fh.distillation_loss(e, c, te, tc, student_bias=b, teacher_bias=tb, divergence=div,
                                            temperature=2.0)
                ref = fh.distillation_loss(e, c[keep], te, tc[keep], student_bias=b[keep], teacher_bias=tb[keep],
                                           divergence=div, temperature=2.0)
                self.assertTrue(torch.isfinite(loss) and torch.allclose(loss, ref, rtol=1e-12), (loss, ref))
                self.assertTrue(torch.allclose(grads(loss, e)[0], grads(ref, e)[0], rtol=1e-10, atol=1e-13))
        # forward KL against PyTorch's kl_div on the kept classes (batchmean = fusedhead's mean, × T²)
        s, tt = F.linear(e, c[keep], b[keep]) / 2.0, F.linear(te, tc[keep], tb[keep]) / 2.0
        ref = 4.0 * F.kl_div(F.log_softmax(s, 1), F.log_softmax(tt, 1), log_target=True, reduction="batchmean")
        loss = fh.distillation_loss(e, c, te, tc, student_bias=b, teacher_bias=tb, temperature=2.0)
        self.assertTrue(torch.allclose(loss, ref, rtol=1e-12), (loss, ref))

    def test_sampling_never_draws_a_masked_class(self):
        z = torch.randn(4, V, generator=gen(8))
        z[:, MASK] = float("-inf")
        for seed in range(50):
            out = fh.sample(z, seed=seed, top_p=0.95)
            self.assertFalse(bool(MASK[out.tokens].any()))
            self.assertTrue(bool(torch.isfinite(out.entropy).all()))


class Precision(unittest.TestCase):
    """fp32 gradients at logit scales 1, 1e2, 1e4: never less accurate than PyTorch's fp32 (up to
    the one rounding into fp32 that any fp32 result has)."""

    def test_linear_ce_fp32_vs_torch_fp32(self):
        for scale in (1.0, 1e2, 1e4):
            e, c, b, t = head(9)
            e32 = (e * scale).float()
            c32, b32 = c.float(), b.float()
            truth = [x.double().requires_grad_() for x in (e32, c32, b32)]
            g64 = grads(F.cross_entropy(F.linear(*truth), t), *truth)
            ours = [x.clone().requires_grad_() for x in (e32, c32, b32)]
            g_fh = grads(fh.linear_cross_entropy(ours[0], ours[1], t, ours[2]), *ours)
            theirs = [x.clone().requires_grad_() for x in (e32, c32, b32)]
            g_pt = grads(F.cross_entropy(F.linear(*theirs), t), *theirs)
            for name, a, p, r in zip(("e", "c", "bias"), g_fh, g_pt, g64):
                gmax = r.abs().max().item()
                err_fh = (a.double() - r).abs().max().item() / gmax
                err_pt = (p.double() - r).abs().max().item() / gmax
                with self.subTest(scale=scale, grad=name):
                    self.assertLessEqual(err_fh, max(err_pt, 2 ** -24) * 1.01, (err_fh, err_pt))

    def test_distillation_fp32_saturated_rows(self):
        for scale in (1.0, 1e2, 1e4):
            for div in ("tvd", "reverse_kl", "forward_kl", "jsd"):
                e, c, _, _ = head(10)
                te, tc, _, _ = head(11)
                args32 = [(e * scale).float(), c.float(), (te * scale).float(), tc.float()]
                r = [x.double() for x in args32]
                r[0].requires_grad_()
                g64 = grads(fh.distillation_loss(*r, divergence=div), r[0])[0]
                a = args32[0].clone().requires_grad_()
                g32 = grads(fh.distillation_loss(a, *args32[1:], divergence=div), a)[0]
                gmax = max(g64.abs().max().item(), 1e-30)
                with self.subTest(scale=scale, divergence=div):
                    self.assertLessEqual((g32.double() - g64).abs().max().item(), 2 ** -24 * 2 * gmax)


class HiddenSizeZero(unittest.TestCase):
    def test_d0_is_the_loss_of_the_bias_alone(self):
        for bias in (None, torch.randn(V, dtype=torch.float64, generator=gen(12))):
            e = torch.zeros(2, 3, 0, dtype=torch.float64, requires_grad=True)
            c = torch.zeros(V, 0, dtype=torch.float64, requires_grad=True)
            t = torch.randint(0, V, (2, 3), generator=gen(13))
            b = None if bias is None else bias.clone().requires_grad_()
            loss = fh.linear_cross_entropy(e, c, t, b)
            zb = torch.zeros(V, dtype=torch.float64) if b is None else b
            ref = F.cross_entropy(zb.expand(6, V), t.reshape(6))
            self.assertTrue(torch.allclose(loss, ref, rtol=1e-12), (loss, ref))
            loss.backward()
            self.assertEqual(tuple(e.grad.shape), (2, 3, 0))
            if b is not None:
                bb = bias.clone().requires_grad_()
                F.cross_entropy(bb.expand(6, V), t.reshape(6)).backward()
                self.assertTrue(torch.allclose(b.grad, bb.grad, rtol=1e-12))


class DoubleBackward(unittest.TestCase):
    def test_create_graph_raises(self):
        e, c, b, t = head(14)
        e.requires_grad_()
        loss = fh.linear_cross_entropy(e, c, t)
        with self.assertRaisesRegex(RuntimeError, "double backward"):
            torch.autograd.grad(loss, e, create_graph=True)
        loss = fh.distillation_loss(e, c, e.detach(), c)
        with self.assertRaisesRegex(RuntimeError, "double backward"):
            torch.autograd.grad(loss, e, create_graph=True)
        # plain backward still works
        fh.linear_cross_entropy(e, c, t).backward()
        self.assertTrue(torch.isfinite(e.grad).all())


class Messages(unittest.TestCase):
    def test_user_terms(self):
        e, c, b, t = head(15, torch.float32)
        with self.assertRaisesRegex(fh.FusedHeadError, r"fusedhead.linear_cross_entropy: temperature is inf"):
            fh.linear_cross_entropy(e, c, t, temperature=float("inf"))
        with self.assertRaisesRegex(fh.FusedHeadError, r"C->dtype is fp64 \(must be fp32"):
            fh.linear_cross_entropy(e, c.double(), t)
        with self.assertRaisesRegex(fh.FusedHeadError, r"fusedhead.linear_cross_entropy: label_smoothing is 2"):
            fh.linear_cross_entropy(e, c, t, label_smoothing=2.0)
        with self.assertRaisesRegex(TypeError, r"ignore_index must be an integer \(got float 1.5\)"):
            fh.linear_cross_entropy(e, c, t, ignore_index=1.5)
        with self.assertRaisesRegex(fh.FusedHeadError, r"ignore_index is 9223372036854775808"):
            fh.linear_cross_entropy(e, c, t, ignore_index=2 ** 63)
        with self.assertRaisesRegex(TypeError, r"ignore_index must be an integer"):
            fh.distillation_loss(e, c, e, c, ignore_index=2.5)
        z = torch.randn(2, V)
        with self.assertRaisesRegex(TypeError, r"fusedhead.sample: top_k must be an integer \(got float 2.5\)"):
            fh.sample(z, top_k=2.5)
        with self.assertRaisesRegex(TypeError, r"seed must be an integer"):
            fh.sample(z, seed=1.0)
        with self.assertRaisesRegex(fh.FusedHeadError, r"seed is 18446744073709551616"):
            fh.sample(z, seed=2 ** 64)
        with self.assertRaisesRegex(fh.FusedHeadError, r"offset is -1"):
            fh.sample(z, offset=-1)
        with self.assertRaisesRegex(fh.FusedHeadError, r"fusedhead.sample: temperature is inf"):
            fh.sample(z, temperature=float("inf"))
        with self.assertRaisesRegex(TypeError, r"fusedhead.topk: k must be an integer"):
            fh.topk(z, 2.0)
        self.assertEqual(fh.sample(z, seed=2 ** 64 - 1).tokens.shape, (2,))


class Threads(unittest.TestCase):
    def test_cpu_backend_uses_torch_thread_count(self):
        before = torch.get_num_threads()
        try:
            for n in (2, 1):
                torch.set_num_threads(n)
                e, c, b, t = head(16)
                fh.linear_cross_entropy(e, c, t)
                h = _lib.context_for(torch.device("cpu"))
                got = ctypes.c_int(-1)
                _lib.check(_lib.lib.fh_context_get_num_threads(h, ctypes.byref(got)))
                self.assertEqual(got.value, n)
        finally:
            torch.set_num_threads(before)


if __name__ == "__main__":
    unittest.main()
