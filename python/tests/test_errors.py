"""Every kind of bad argument raises FusedHeadError (a ValueError and a RuntimeError) carrying
fusedhead's status and message: from the C library (fh_last_error) or from the Python checks
PyTorch semantics need before any pointer reaches C."""
import unittest

import torch

from _util import gen, randn
import fusedhead as fh
from fusedhead import _lib

N, D, V = 5, 3, 7


def lce_inputs(dtype=torch.float32):
    g = gen(1)
    return randn(g, N, D, dtype=dtype), randn(g, V, D, dtype=dtype), torch.randint(0, V, (N,), generator=g)


class Errors(unittest.TestCase):
    def expect(self, fn, status, *fragments):
        with self.assertRaises(fh.FusedHeadError) as cm:
            fn()
        err = cm.exception
        self.assertIsInstance(err, ValueError)
        self.assertIsInstance(err, RuntimeError)
        self.assertEqual(err.status, status, err)
        for f in fragments:
            self.assertIn(f, str(err))
        return err

    # ---- linear cross-entropy: from C
    def test_lce_dtype_mismatch(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e, c.double(), t), _lib.ERR_INVALID_ARGUMENT,
                    "fh_linear_ce_forward", "C->dtype")

    def test_lce_hidden_size_mismatch(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e, c[:, :2], t), _lib.ERR_INVALID_ARGUMENT,
                    "fh_linear_ce_forward", "C->cols")

    def test_lce_bias_size(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e, c, t, torch.zeros(V + 1)), _lib.ERR_INVALID_ARGUMENT,
                    "fh_linear_ce_forward", "bias")

    def test_lce_target_out_of_range(self):
        e, c, t = lce_inputs()
        t[3] = V
        self.expect(lambda: fh.linear_cross_entropy(e, c, t), _lib.ERR_INVALID_ARGUMENT, "targets[3]")

    def test_lce_option_ranges(self):
        e, c, t = lce_inputs()
        # Named in the user's terms: the function called and the keyword argument, with its value.
        for kw, name in ((dict(softcap=-1.0), "softcap is -1"), (dict(label_smoothing=1.5), "label_smoothing is 1.5"),
                         (dict(logit_scale=0.0), "logit_scale is 0"), (dict(z_loss_scale=-1.0), "z_loss_scale is -1"),
                         (dict(divisor=-2.0), "divisor is -2")):
            self.expect(lambda: fh.linear_cross_entropy(e, c, t, **kw), _lib.ERR_INVALID_ARGUMENT,
                        "fusedhead.linear_cross_entropy: " + name)

    def test_lce_negative_class_weight(self):
        e, c, t = lce_inputs()
        w = torch.ones(V)
        w[2] = -1
        self.expect(lambda: fh.linear_cross_entropy(e, c, t, weight=w), _lib.ERR_INVALID_ARGUMENT,
                    "fh_linear_ce_forward", "class_weights")

    # ---- linear cross-entropy: Python-side checks
    def test_lce_integer_hidden(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e.long(), c, t), _lib.ERR_INVALID_ARGUMENT, "e has dtype")

    def test_lce_float_targets(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e, c, t.float()), _lib.ERR_INVALID_ARGUMENT, "targets")

    def test_lce_targets_shape(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e, c, t[:-1]), _lib.ERR_INVALID_ARGUMENT, "targets has shape")

    def test_lce_classifier_rank(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e, c[0], t), _lib.ERR_INVALID_ARGUMENT, "c must be 2-D")

    def test_lce_weight_shape(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e, c, t, weight=torch.ones(V - 1)), _lib.ERR_INVALID_ARGUMENT,
                    "weight has shape")

    def test_lce_bad_reduction(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e, c, t, reduction="avg"), _lib.ERR_INVALID_ARGUMENT, "reduction")

    def test_lce_scale_and_temperature(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e, c, t, logit_scale=2.0, temperature=0.5),
                    _lib.ERR_INVALID_ARGUMENT, "not both")

    def test_lce_bad_accum_mode(self):
        e, c, t = lce_inputs()
        for mode in ("fast", "FP32", 0, None):
            self.expect(lambda: fh.linear_cross_entropy(e, c, t, accum_mode=mode), _lib.ERR_INVALID_ARGUMENT,
                        "fusedhead.linear_cross_entropy", "accum_mode is %r" % (mode,), "'deterministic'")

    def test_lce_bad_filter_eps(self):
        """-1.0 is C's FH_FILTER_EPS_AUTO; from Python it is an error, not a silent 'auto' (None is)."""
        e, c, t = lce_inputs()
        for eps in (-1.0, -1e-3, float("nan"), float("inf")):
            self.expect(lambda: fh.linear_cross_entropy(e, c, t, filter_eps=eps), _lib.ERR_INVALID_ARGUMENT,
                        "fusedhead.linear_cross_entropy", "filter_eps is %r" % (eps,))

    def test_lce_option_errors_before_any_work(self):
        """A bad option with an otherwise-failing call reports the option (checked first, no C call)."""
        e, c, t = lce_inputs()
        t[0] = V  # out of range: C would report targets[0]
        self.expect(lambda: fh.linear_cross_entropy(e, c, t, accum_mode="fast"), _lib.ERR_INVALID_ARGUMENT,
                    "accum_mode")

    def test_mismatched_devices(self):
        """The 'meta' device stands in for a second device (no GPU here): checked before C sees a pointer."""
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e, c.to("meta"), t), _lib.ERR_INVALID_ARGUMENT,
                    "c is on meta", "one device")

    def test_unsupported_device(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e.to("meta"), c.to("meta"), t.to("meta")), _lib.ERR_UNSUPPORTED,
                    "meta")

    def test_non_tensor(self):
        e, c, t = lce_inputs()
        self.expect(lambda: fh.linear_cross_entropy(e.tolist(), c, t), _lib.ERR_INVALID_ARGUMENT, "torch.Tensor")

    def test_non_contiguous_inputs_work(self):
        """Not an error: a column-major classifier is copied, a row-strided one is passed as is."""
        e, c, t = lce_inputs()
        want = fh.linear_cross_entropy(e, c, t)
        self.assertEqual(fh.linear_cross_entropy(e, c.t().contiguous().t(), t).item(), want.item())
        wide = torch.cat([c, torch.zeros_like(c)], 1)
        self.assertEqual(fh.linear_cross_entropy(e, wide[:, :D], t).item(), want.item())

    # ---- distillation
    def heads(self):
        g = gen(2)
        return randn(g, N, D), randn(g, V, D), randn(g, N, D), randn(g, V + 2, D)

    def test_distill_bad_divergence(self):
        se, sc, te, tc = self.heads()
        self.expect(lambda: fh.distillation_loss(se, sc, te, tc, divergence="kl"), _lib.ERR_INVALID_ARGUMENT,
                    "divergence")

    def test_distill_teacher_vocab_too_small(self):
        se, sc, te, tc = self.heads()
        self.expect(lambda: fh.distillation_loss(se, sc, te, tc[:V - 1]), _lib.ERR_INVALID_ARGUMENT,
                    "fh_distill_forward")

    def test_distill_hard_weight_without_targets(self):
        se, sc, te, tc = self.heads()
        self.expect(lambda: fh.distillation_loss(se, sc, te, tc, hard_weight=0.5), _lib.ERR_INVALID_ARGUMENT,
                    "targets")

    def test_distill_option_range(self):
        se, sc, te, tc = self.heads()
        self.expect(lambda: fh.distillation_loss(se, sc, te, tc, divergence="jsd", beta=1.5),
                    _lib.ERR_INVALID_ARGUMENT, "beta")
        self.expect(lambda: fh.distillation_loss(se, sc, te, tc, temperature=0.0), _lib.ERR_INVALID_ARGUMENT,
                    "temperature")

    def test_distill_teacher_rows(self):
        se, sc, te, tc = self.heads()
        self.expect(lambda: fh.distillation_loss(se, sc, te[:-1], tc), _lib.ERR_INVALID_ARGUMENT, "teacher_e")

    def test_sparse_duplicate_ids(self):
        se, sc, _, _ = self.heads()
        ids = torch.tensor([[0, 1, 1]] * N)
        self.expect(lambda: fh.sparse_distillation_loss(se, sc, ids, torch.full((N, 3), -1.5)),
                    _lib.ERR_INVALID_ARGUMENT, "fh_distill_sparse_forward")

    def test_sparse_remainder_needs_t1(self):
        se, sc, _, _ = self.heads()
        ids = torch.tensor([[0, 1, 2]] * N)
        self.expect(lambda: fh.sparse_distillation_loss(se, sc, ids, torch.full((N, 3), -1.5), sparse_mass="remainder",
                                                        temperature=2.0), _lib.ERR_INVALID_ARGUMENT, "temperature")

    def test_sparse_shapes(self):
        se, sc, _, _ = self.heads()
        ids = torch.tensor([[0, 1, 2]] * N)
        self.expect(lambda: fh.sparse_distillation_loss(se, sc, ids, torch.full((N, 2), -1.5)),
                    _lib.ERR_INVALID_ARGUMENT, "teacher_logprobs")

    # ---- decoding
    def test_topk_k_range(self):
        z = torch.randn(2, V)
        self.expect(lambda: fh.topk(z, 0), _lib.ERR_INVALID_ARGUMENT, "fh_topk_from_logits", "k")
        self.expect(lambda: fh.topk(z, V + 1), _lib.ERR_INVALID_ARGUMENT, "k")

    def test_sample_option_ranges(self):
        z = torch.randn(2, V)
        self.expect(lambda: fh.sample(z, top_p=0.0), _lib.ERR_INVALID_ARGUMENT, "fh_decode", "top_p")
        self.expect(lambda: fh.sample(z, temperature=-1.0), _lib.ERR_INVALID_ARGUMENT, "temperature")
        self.expect(lambda: fh.sample(z, min_p=2.0), _lib.ERR_INVALID_ARGUMENT, "min_p")

    def test_sample_per_row_value_checked(self):
        z = torch.randn(2, V)
        self.expect(lambda: fh.sample(z, top_p=torch.tensor([0.5, 0.0])), _lib.ERR_INVALID_ARGUMENT, "top_p")
        self.expect(lambda: fh.sample(z, top_p=torch.tensor([0.5])), _lib.ERR_INVALID_ARGUMENT, "top_p has shape")

    def test_sample_bad_sampler_and_shape(self):
        z = torch.randn(2, V)
        self.expect(lambda: fh.sample(z, sampler="nucleus"), _lib.ERR_INVALID_ARGUMENT, "sampler")
        self.expect(lambda: fh.sample(z[0]), _lib.ERR_INVALID_ARGUMENT, "2-D")

    def test_fused_dtype_mismatch(self):
        self.expect(lambda: fh.sample_fused(torch.randn(2, D), torch.randn(V, D).double()), _lib.ERR_INVALID_ARGUMENT,
                    "fh_decode_fused")

    def test_banned_id_out_of_range(self):
        z = torch.randn(2, V)
        self.expect(lambda: fh.sample(z, banned=(torch.full((2, 1), V), torch.ones(2, dtype=torch.int64))),
                    _lib.ERR_INVALID_ARGUMENT, "banned")


if __name__ == "__main__":
    unittest.main()
