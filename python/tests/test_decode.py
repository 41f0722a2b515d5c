"""topk / sample: against torch.topk, a stable torch.sort, and top-k/top-p/min-p masks built
with torch.sort, on random and peaked rows, float32 and float64."""
import unittest

import torch

from _util import gen, randn
import fusedhead as fh

B, V, D = 6, 11, 4


def logits(seed, dtype, peaked):
    g = gen(seed)
    return randn(g, B, V, dtype=dtype, scale=8.0 if peaked else 1.0)


def standard_mask(z, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, top_k_top_p_order="top_k_first"):
    """vLLM order min-p -> top-k -> top-p, tie-inclusive, FlashInfer's sequential top-p (or, with
    top_k_top_p_order 'joint', top-p on the min-p survivors and intersected with top-k), in fp64."""
    s = z.double() / temperature
    p = torch.softmax(s, -1)
    keep = torch.ones_like(s, dtype=torch.bool)
    if min_p > 0:
        keep &= p >= min_p * p.max(-1, keepdim=True).values
    base = keep.clone()  # the distribution joint top-p renormalises over
    if 0 < top_k < s.shape[1]:
        above = ((s[:, None, :] > s[:, :, None]) & keep[:, None, :]).sum(-1)
        keep &= above < top_k
    if top_p < 1:
        if top_k_top_p_order != "joint":
            base = keep
        r = torch.where(base, p, torch.zeros_like(p))
        r = r / r.sum(-1, keepdim=True)
        # mass strictly above each token, from a descending sort (ties share the mass above them)
        sv, order = torch.sort(s.masked_fill(~base, -float("inf")), dim=-1, descending=True, stable=True)
        rs = r.gather(1, order)
        csum = torch.cumsum(rs, -1) - rs
        # tie-inclusive: a token tied with an earlier one gets that one's mass-above
        for b in range(s.shape[0]):
            for i in range(1, s.shape[1]):
                if sv[b, i] == sv[b, i - 1]:
                    csum[b, i] = csum[b, i - 1]
        above = torch.empty_like(csum).scatter_(1, order, csum)
        keep &= above < top_p
    amax = torch.nn.functional.one_hot(s.argmax(-1), s.shape[1]).bool()
    return keep | amax


class TopK(unittest.TestCase):
    def test_values_and_ids_match_torch_topk(self):
        for dtype in (torch.float32, torch.float64):
            for peaked in (False, True):
                z = logits(1, dtype, peaked)
                for k in (1, 3, V):
                    v, i = fh.topk(z, k)
                    tv, ti = torch.topk(z, k)
                    self.assertTrue(torch.equal(v, tv.float()), (dtype, peaked, k))
                    self.assertTrue(torch.equal(i, ti), (dtype, peaked, k))

    def test_ties_lowest_id_first(self):
        """Integer logits with many ties: ids as a stable descending sort (lowest id first);
        torch.topk's tie order is unspecified, so against it compare value lists and id sets."""
        g = gen(2)
        z = torch.randint(0, 4, (B, V), generator=g).float()
        for k in (2, 5, V):
            v, i = fh.topk(z, k)
            sv, si = torch.sort(z, dim=-1, descending=True, stable=True)
            self.assertTrue(torch.equal(v, sv[:, :k]))
            self.assertTrue(torch.equal(i, si[:, :k]))
            tv, ti = torch.topk(z, k)
            self.assertTrue(torch.equal(v, tv))
            self.assertTrue(torch.equal(z.gather(1, i), z.gather(1, ti)))

    def test_fused_equals_topk_of_logits(self):
        g = gen(3)
        h, c, b = randn(g, B, D), randn(g, V, D), randn(g, V)
        v, i = fh.topk_fused(h, c, 4, b)
        tv, ti = torch.topk(torch.nn.functional.linear(h, c, b), 4)
        torch.testing.assert_close(v, tv.float(), rtol=0, atol=1e-6)
        self.assertTrue(torch.equal(i, ti))

    def test_nan_sorts_first(self):
        z = logits(4, torch.float32, False)
        z[0, 5] = float("nan")
        v, i = fh.topk(z, 2)
        self.assertTrue(torch.isnan(v[0, 0]).item())
        self.assertEqual(i[0, 0].item(), 5)


class Sample(unittest.TestCase):
    def test_statistics_match_torch(self):
        for dtype in (torch.float32, torch.float64):
            for peaked in (False, True):
                z = logits(5, dtype, peaked)
                T = 0.5
                out = fh.sample(z, temperature=T, seed=7, num_logprobs=3)
                s = z.double() / T
                logp = torch.log_softmax(s, -1)
                tol = dict(rtol=1e-6, atol=1e-6)  # fp64 values rounded once to fp32
                torch.testing.assert_close(out.lse.double(), torch.logsumexp(s, -1), **tol)
                torch.testing.assert_close(out.entropy.double(), -(logp.exp() * logp).sum(-1), **tol)
                torch.testing.assert_close(out.full_logprob.double(), logp.gather(1, out.tokens[:, None])[:, 0], **tol)
                torch.testing.assert_close(out.logprob, out.full_logprob, **tol)  # no truncation
                want_rank = 1 + (s > s.gather(1, out.tokens[:, None])).sum(-1)
                self.assertTrue(torch.equal(out.rank, want_rank))
                tv, ti = torch.topk(logp, 3)
                self.assertTrue(torch.equal(out.topn_ids, ti))
                torch.testing.assert_close(out.topn_logprobs.double(), tv, **tol)
                self.assertTrue(torch.equal(out.allowed_count, torch.full((B,), V)))

    def test_greedy_is_argmax(self):
        z = logits(6, torch.float32, False)
        out = fh.sample(z, temperature=0.0)
        self.assertTrue(torch.equal(out.tokens, z.argmax(-1)))
        self.assertTrue(bool(((out.flags & fh.FLAG_GREEDY) != 0).all()))
        self.assertTrue(torch.equal(out.logprob, torch.zeros(B)))

    def check_mask(self, dtype, peaked, **kw):
        z = logits(7, dtype, peaked)
        want = standard_mask(z, **kw)
        seen = torch.zeros_like(want)
        for seed in range(120):
            out = fh.sample(z, seed=seed, **kw)
            self.assertTrue(torch.equal(out.allowed_count, want.sum(-1)), (kw, out.allowed_count, want.sum(-1)))
            seen[torch.arange(B), out.tokens] = True
        # every sampled token is in the allowed set; with 120 draws over a few tokens, each row
        # draws more than one distinct token unless the set (or the mass) is concentrated
        self.assertFalse(bool((seen & ~want).any()), kw)
        self.assertTrue(bool((seen.sum(-1) > 1).any()), kw)

    def test_masks(self):
        cases = [dict(top_k=3), dict(top_p=0.5), dict(top_p=0.9), dict(min_p=0.2), dict(min_p=0.05, top_k=4),
                 dict(min_p=0.05, top_k=5, top_p=0.7), dict(top_k=4, top_p=0.6, temperature=0.7)]
        for dtype in (torch.float32, torch.float64):
            for peaked in (False, True):
                for kw in cases:
                    if peaked and "top_k" not in kw and kw.get("top_p", 1) < 0.9:
                        kw = dict(kw, temperature=8.0)  # keep more than the argmax in play
                    self.check_mask(dtype, peaked, **kw)

    def test_joint_order_masks(self):
        cases = [dict(top_k=3, top_p=0.5), dict(min_p=0.05, top_k=5, top_p=0.7),
                 dict(top_k=4, top_p=0.6, temperature=2.0)]
        for peaked in (False, True):
            for kw in cases:
                if peaked:  # joint top-p sees the un-truncated peak: flatten it so more than the argmax is in play
                    kw = dict(kw, temperature=8.0)
                self.check_mask(torch.float64, peaked, top_k_top_p_order="joint", **kw)
        # the example of docs/decoding.md: sequential keeps 1 token, joint 2
        z = torch.tensor([[0.30, 0.25, 0.24, 0.11, 0.10]], dtype=torch.float64).log()
        self.assertEqual(fh.sample(z, top_k=3, top_p=0.35).allowed_count.item(), 1)
        self.assertEqual(fh.sample(z, top_k=3, top_p=0.35, top_k_top_p_order="joint").allowed_count.item(), 2)
        with self.assertRaises(ValueError):
            fh.sample(z, top_k_top_p_order="both")

    def test_p_less(self):
        for peaked, t in ((False, 1.0), (False, 3.0), (True, 8.0)):
            z = logits(12, torch.float64, peaked)
            p = torch.softmax(z / t, -1)
            want = p >= (p * p).sum(-1, keepdim=True)
            for seed in range(20):
                out = fh.sample(z, sampler="p_less", temperature=t, seed=seed)
                self.assertTrue(torch.equal(out.allowed_count, want.sum(-1)))
                self.assertTrue(bool(want[torch.arange(B), out.tokens].all()))
            g = gen(13)
            h, c = randn(g, B, D), randn(g, V, D)
            f = fh.sample_fused(h, c, sampler="p_less", temperature=t, seed=4)
            ref = fh.sample(torch.nn.functional.linear(h, c), sampler="p_less", temperature=t, seed=4)
            self.assertTrue(torch.equal(f.tokens, ref.tokens))

    def test_same_seed_same_tokens_and_batch_invariance(self):
        z = logits(8, torch.float32, False)
        a = fh.sample(z, seed=3, offset=5).tokens
        self.assertTrue(torch.equal(a, fh.sample(z, seed=3, offset=5).tokens))
        seeds = torch.arange(100, 100 + B)
        per_row = fh.sample(z, seed=seeds, offset=5).tokens
        for b in range(B):
            self.assertEqual(per_row[b].item(), fh.sample(z[b:b + 1], seed=100 + b, offset=5).tokens.item())

    def test_fused_equals_logits(self):
        g = gen(9)
        h, c, b = randn(g, B, D), randn(g, V, D), randn(g, V)
        for kw in (dict(top_k=3, seed=1), dict(top_p=0.8, seed=2), dict(temperature=0.0)):
            f = fh.sample_fused(h, c, b, **kw)
            ref = fh.sample(torch.nn.functional.linear(h, c, b), **kw)
            self.assertTrue(torch.equal(f.tokens, ref.tokens), kw)
            self.assertTrue(torch.equal(f.allowed_count, ref.allowed_count), kw)

    def test_banned_and_degenerate(self):
        z = logits(10, torch.float32, False)
        ban = z.argmax(-1, keepdim=True)
        z[1, (ban[1, 0] + 1) % V] = float("nan")  # a banned NaN would be replaced by -inf
        out = fh.sample(z, temperature=0.0, banned=(ban, torch.ones(B, dtype=torch.int64)))
        self.assertEqual(out.tokens[1].item(), -1)
        self.assertTrue(out.flags[1].item() & fh.FLAG_DEGENERATE)
        ok = torch.arange(B) != 1
        self.assertFalse(bool((out.tokens[ok] == ban[ok, 0]).any()))

    def test_logsumexp(self):
        z = logits(11, torch.float32, True)
        torch.testing.assert_close(fh.logsumexp(z).double(), torch.logsumexp(z.double(), -1), rtol=1e-7, atol=1e-6)


if __name__ == "__main__":
    unittest.main()
