"""Vocabulary-parallel heads over torch.distributed with the gloo backend: 2 and 4 processes on
localhost (torch.multiprocessing spawn, a free port, a timeout), each holding an uneven slice of
the vocabulary, against the single-process op on the whole head. Losses in float64, so the only
differences are the merge's reordered fp64 sums: tolerance 1e-12 relative and absolute (values
are O(1..100); a reordered sum of V = 37 terms is off by a few ulps); predicted tokens and sampled
tokens must be equal exactly (decoding statistics are fp32 outputs of fp64 sums: 4 fp32 ulps)."""
import datetime
import os
import socket
import tempfile
import time
import traceback
import unittest

from _util import gen, randn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedhead

TOL = 1e-12
TIMEOUT_S = 240
# Uneven splits of V = 37 (V_t = 40 for the teacher: the last rank holds the 3 extra rows).
SPLITS = {2: [17, 20], 4: [3, 14, 9, 11]}
V, VT, N, D, DT = 37, 40, 11, 6, 5


def _close(name, got, want, errors):
    if got is None or want is None:
        if got is not want:
            errors.append("%s: one side is None" % name)
        return
    if got.dtype in (torch.int64, torch.int32):
        if not torch.equal(got, want):
            errors.append("%s: %s != %s" % (name, got.tolist(), want.tolist()))
        return
    err = (got - want).abs()
    bound = TOL + TOL * want.abs()
    if not bool((err <= bound).all()) or got.shape != want.shape:
        errors.append("%s: max abs err %.3e (shapes %s, %s)" % (name, float(err.max()), tuple(got.shape),
                                                                   tuple(want.shape)))


def _slice(sizes, rank):
    a = sum(sizes[:rank])
    return a, a + sizes[rank]


def _lce_inputs(seed):
    g = gen(seed)
    e = randn(g, N, D)
    c = randn(g, V, D, scale=0.7)
    b = randn(g, V, scale=0.3)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[2] = targets[7] = -100
    weight = torch.rand(V, generator=g, dtype=torch.float64) + 0.25
    tw = torch.rand(N, generator=g, dtype=torch.float64) + 0.25
    c[5] = c[V - 3] = 3.0 * e[0]  # row 0's maximum tied across ranks: the lower id must win
    b[5] = b[V - 3] = 0.0
    return e, c, b, targets, weight, tw


LCE_CASES = {
    "plain": dict(),
    "every_option_mean": dict(bias=True, weight=True, token_weights=True, label_smoothing=0.1, z_loss_scale=1e-2,
                              entropy_weight=-0.05, softcap=4.0, temperature=1.3),
    "every_option_sum": dict(bias=True, weight=True, label_smoothing=0.2, z_loss_scale=1e-3, softcap=2.0,
                             reduction="sum"),
    "every_option_none": dict(bias=True, token_weights=True, entropy_weight=0.1, logit_scale=0.8, reduction="none"),
    "divisor": dict(bias=True, weight=True, divisor=5.0, label_smoothing=0.05),
    # masked classes (-inf bias, docs/conventions.md) at the ranks' boundaries, smoothing over each
    # row's unmasked classes, and a masked target under token weight 0 (contributes 0, no 0*inf)
    "masked": dict(bias=True, weight=True, token_weights=True, label_smoothing=0.2, z_loss_scale=1e-2,
                   entropy_weight=0.05, mask=True),
}
MASKED = [0, 2, 3, 16, 17, 20, 26, 27, 36]


def _mask(b, targets, tw):
    """-inf bias on MASKED, targets moved off them except row 1 (token weight 0)."""
    b, targets, tw = b.clone(), targets.clone(), tw.clone()
    b[MASKED] = float("-inf")
    for i in range(targets.shape[0]):
        while int(targets[i]) in MASKED:
            targets[i] = (int(targets[i]) + 1) % V
    targets[1], tw[1] = 17, 0.0
    return b, targets, tw


def _lce_run(case, e, c, b, targets, weight, tw, group):
    kw = dict(case)
    use_bias, use_w, use_tw = kw.pop("bias", False), kw.pop("weight", False), kw.pop("token_weights", False)
    kw.pop("mask", None)
    e = e.clone().requires_grad_(True)
    c = c.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if use_bias else None
    out = fusedhead.linear_cross_entropy(e, c, targets, b, weight=weight if use_w else None,
                                         token_weights=tw if use_tw else None, return_lse=True, return_z_loss=True,
                                         return_token_accuracy=True, return_predicted_tokens=True,
                                         return_entropy=True, process_group=group, **kw)
    g = gen(99)
    up = torch.rand(out.loss.shape, generator=g, dtype=torch.float64) + 0.5
    up_lse = torch.randn(out.lse.shape, generator=g, dtype=torch.float64) * 0.3
    ((out.loss * up).sum() + (out.lse * up_lse).sum()).backward()
    res = dict(loss=out.loss, lse=out.lse, z_loss=out.z_loss, acc=out.token_accuracy, pred=out.predicted_tokens,
               entropy=out.entropy, de=e.grad, dc=c.grad, db=b.grad if use_bias else None)
    return {k: (v.detach() if v is not None else None) for k, v in res.items()}


def _check_lce(rank, sizes, group, errors):
    for name, case in LCE_CASES.items():
        e, c, b, targets, weight, tw = _lce_inputs(1234)
        if case.get("mask"):
            b, targets, tw = _mask(b, targets, tw)
        want = _lce_run(case, e, c, b, targets, weight, tw, None)
        lo, hi = _slice(sizes, rank)
        got = _lce_run(case, e, c[lo:hi], b[lo:hi], targets, weight, tw, group)
        for k in ("loss", "lse", "z_loss", "acc", "pred", "entropy", "de"):
            _close("lce %s %s" % (name, k), got[k], want[k], errors)
        _close("lce %s dc" % name, got["dc"], want["dc"][lo:hi], errors)
        if got["db"] is not None:
            _close("lce %s db" % name, got["db"], want["db"][lo:hi], errors)
        if int(want["pred"][0]) != 5:
            errors.append("lce %s: row 0's tied maximum must predict 5, got %d" % (name, int(want["pred"][0])))
        if case.get("mask") and not (bool(torch.isfinite(got["loss"]).all()) and
                                     float(got["dc"][[j - lo for j in MASKED if lo <= j < hi]].abs().sum()) == 0.0):
            errors.append("lce masked: loss %s not finite or a masked class has a gradient" % got["loss"].tolist())
    # float32 inputs: outputs are the fp64 merge rounded once to fp32, and e's gradient adds P
    # fp32 parts: a few fp32 ulps (rtol 1e-5, atol 1e-6 for entries near 0).
    e, c, b, targets, weight, tw = [x.float() if x.is_floating_point() else x for x in _lce_inputs(99)]
    case = LCE_CASES["every_option_mean"]
    want = _lce_run(case, e, c, b, targets, weight, tw, None)
    lo, hi = _slice(sizes, rank)
    got = _lce_run(case, e, c[lo:hi], b[lo:hi], targets, weight, tw, group)
    for k in ("loss", "lse", "entropy", "de"):
        if not torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6):
            errors.append("lce float32 %s: max err %.3e" % (k, float((got[k] - want[k]).abs().max())))
    if not (torch.equal(got["pred"], want["pred"]) and torch.allclose(got["dc"], want["dc"][lo:hi], rtol=1e-5,
                                                                       atol=1e-6)):
        errors.append("lce float32: predicted tokens or c's gradient differ")


DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "jsd_scaled", "tvd", "skew_forward_kl", "skew_reverse_kl",
               "alpha", "hellinger", "chi_square"]


def _distill_run(k, dv, se, sc, sb, te, tc, tb, targets, group):
    se = se.clone().requires_grad_(True)
    sc = sc.clone().requires_grad_(True)
    sb = sb.clone().requires_grad_(True)
    red = ("mean", "sum", "none")[k % 3]
    loss, soft, hard = fusedhead.distillation_loss(
        se, sc, te, tc, targets, sb, tb, divergence=dv, temperature=1.5, hard_weight=0.3 if k % 2 else 0.0,
        reduction=red, return_components=True, process_group=group)
    up = torch.rand(loss.shape, generator=gen(7), dtype=torch.float64) + 0.5
    (loss * up).sum().backward()
    return dict(loss=loss.detach(), soft=soft, hard=hard, de=se.grad, dc=sc.grad, db=sb.grad)


def _check_distill(rank, sizes, group, errors):
    g = gen(4321)
    se, sc, sb = randn(g, N, D), randn(g, V, D, scale=0.6), randn(g, V, scale=0.2)
    te, tc, tb = randn(g, N, DT), randn(g, VT, DT, scale=0.6), randn(g, VT, scale=0.2)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[4] = -100
    lo, hi = _slice(sizes, rank)
    thi = VT if rank == len(sizes) - 1 else hi
    for k, dv in enumerate(DIVERGENCES):
        want = _distill_run(k, dv, se, sc, sb, te, tc, tb, targets, None)
        got = _distill_run(k, dv, se, sc[lo:hi], sb[lo:hi], te, tc[lo:thi], tb[lo:thi], targets, group)
        for key in ("loss", "soft", "hard", "de"):
            _close("distill %s %s" % (dv, key), got[key], want[key], errors)
        _close("distill %s dc" % dv, got["dc"], want["dc"][lo:hi], errors)
        _close("distill %s db" % dv, got["db"], want["db"][lo:hi], errors)
    # classes masked in both heads (-inf biases) at the ranks' boundaries: contribute nothing
    msb, mtb, mt = sb.clone(), tb.clone(), targets.clone()
    msb[MASKED], mtb[MASKED] = float("-inf"), float("-inf")
    for i in range(N):
        while int(mt[i]) in MASKED:
            mt[i] = (int(mt[i]) + 1) % V
    for k, dv in ((1, "forward_kl"), (3, "jsd")):
        want = _distill_run(k, dv, se, sc, msb, te, tc, mtb, mt, None)
        got = _distill_run(k, dv, se, sc[lo:hi], msb[lo:hi], te, tc[lo:thi], mtb[lo:thi], mt, group)
        for key in ("loss", "soft", "hard", "de"):
            _close("distill masked %s %s" % (dv, key), got[key], want[key], errors)
        _close("distill masked %s dc" % dv, got["dc"], want["dc"][lo:hi], errors)
        if not bool(torch.isfinite(got["loss"]).all()):
            errors.append("distill masked %s: loss %s" % (dv, got["loss"].tolist()))


DECODE_CASES = {
    "greedy": dict(temperature=0.0),
    "plain": dict(temperature=0.8),
    "top_k": dict(temperature=1.3, top_k=5),
    "min_p": dict(min_p=0.02, candidates=2),  # 2 candidates cannot prove the set: the call must retry
    "top_k_min_p_bias_bans": dict(top_k=4, min_p=0.01, logit_bias="yes", banned="yes"),
    "top_k_top_p": dict(top_k=8, top_p=0.6, temperature=1.5),
    "per_row": dict(temperature="rows", seed="rows"),
}


def _decode_kwargs(case, B, offset):
    kw = dict(case)
    g = gen(55)
    if kw.get("logit_bias") == "yes":
        kw["logit_bias"] = (torch.randint(0, V, (B, 2), generator=g), torch.rand(B, 2, generator=g) * 4,
                            torch.full((B,), 2, dtype=torch.int64))
    if kw.get("banned") == "yes":
        kw["banned"] = (torch.tensor([[5, V - 3]] * B), torch.ones(B, dtype=torch.int64))
    if kw.get("temperature") == "rows":
        kw["temperature"] = torch.rand(B, generator=g) + 0.3
        kw["temperature"][1] = 0.0
    if kw.get("seed") == "rows":
        kw["seed"] = torch.arange(B, dtype=torch.int64) * 1000 + offset
    else:
        kw["seed"] = 1234 + offset
    kw["offset"] = offset
    return kw


def _check_decode(rank, sizes, group, errors):
    g = gen(777)
    B = 6
    hid = randn(g, B, D, dtype=torch.float32)
    c = randn(g, V, D, dtype=torch.float32, scale=0.8)
    b = randn(g, V, dtype=torch.float32, scale=0.5)
    c[V - 3] = c[5]  # a tied logit on two ranks
    b[V - 3] = b[5]
    lo, hi = _slice(sizes, rank)
    for name, case in DECODE_CASES.items():
        for offset in range(8):
            kw = _decode_kwargs(case, B, offset)
            cand = kw.pop("candidates", None)
            want = fusedhead.sample_fused(hid, c, b, num_logprobs=3, **kw)
            got = fusedhead.sample_fused(hid, c[lo:hi], b[lo:hi], num_logprobs=3, process_group=group,
                                         candidates=cand, **kw)
            for key in ("tokens", "topn_ids", "allowed_count", "flags"):
                if not torch.equal(getattr(got, key), getattr(want, key)):
                    errors.append("decode %s offset %d %s: %s != %s" % (name, offset, key, getattr(got, key).tolist(),
                                                                       getattr(want, key).tolist()))
            for key in ("logprob", "full_logprob", "lse", "entropy", "topn_logprobs"):
                a, w = getattr(got, key), getattr(want, key)
                if not torch.allclose(a, w, rtol=5e-7, atol=1e-6):
                    errors.append("decode %s offset %d %s: max err %.3e" % (name, offset, key,
                                                                            float((a - w).abs().max())))
            if got.rank is not None:
                errors.append("decode %s: rank must be None on a shard" % name)
    logits = hid.double() @ c.double().T + b.double()  # sample() from logits: a column slice per rank
    for offset in range(8):
        want = fusedhead.sample(logits, temperature=0.7, top_k=6, seed=9, offset=offset, num_logprobs=2)
        got = fusedhead.sample(logits[:, lo:hi], temperature=0.7, top_k=6, seed=9, offset=offset, num_logprobs=2,
                               process_group=group)
        if not (torch.equal(got.tokens, want.tokens) and torch.equal(got.topn_ids, want.topn_ids)):
            errors.append("sample from logits offset %d: %s != %s" % (offset, got.tokens.tolist(),
                                                                        want.tokens.tolist()))
    # topk from logits: ties across ranks (rounded to quarters), a NaN and -inf entries
    lg = (torch.round(logits.float() * 4) / 4)
    lg[1, V - 2] = float("nan")
    lg[2, :] = float("-inf")
    for k in (1, 5, V):
        wv, wi = fusedhead.topk(lg, k)
        gv, gi = fusedhead.topk(lg[:, lo:hi], k, process_group=group)
        if not (torch.equal(gi, wi) and torch.allclose(gv, wv, equal_nan=True)):
            errors.append("topk k=%d: ids %s != %s" % (k, gi[:3].tolist(), wi[:3].tolist()))


CHECKS = [_check_lce, _check_distill, _check_decode]


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    errors = []
    try:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        group = dist.new_group(list(range(world)))
        for check in CHECKS:
            check(rank, SPLITS[world], group, errors)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # reported to the parent through the file, with the traceback
        errors.append(traceback.format_exc())
    with open(os.path.join(outdir, "rank%d.txt" % rank), "w") as f:
        f.write("\n".join(errors))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(test, world):
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), outdir), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.time() + TIMEOUT_S
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                test.fail("world %d: timed out after %d s" % (world, TIMEOUT_S))
        report = []
        for r in range(world):
            path = os.path.join(outdir, "rank%d.txt" % r)
            if not os.path.exists(path):
                report.append("rank %d wrote no report" % r)
                continue
            with open(path) as f:
                text = f.read().strip()
            if text:
                report.append("rank %d:\n%s" % (r, text))
        test.assertFalse(report, "\n".join(report))


class TestShardConstants(unittest.TestCase):
    def test_python_mirror_matches_header(self):
        """The buffer widths python/fusedhead/_lib.py uses are the header's (scripts/comm_table.py
        parses them from include/fusedhead_shard.h)."""
        import importlib.util
        import fusedhead._lib as L
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "comm_table.py")
        spec = importlib.util.spec_from_file_location("comm_table", path)
        ct = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ct)
        w = ct.header_widths()
        self.assertEqual(L.SHARD_LCE_PARTIAL, w["FH_SHARD_LCE_PARTIAL"])
        self.assertEqual(L.SHARD_DISTILL_STATS, w["FH_SHARD_DISTILL_STATS"])
        self.assertEqual(L.SHARD_DISTILL_DIV, w["FH_SHARD_DISTILL_DIV"])
        self.assertEqual(w["decode"], (10, 2))  # python/fusedhead/parallel.py: 10 + 2 * K


class TestVocabParallelGloo(unittest.TestCase):
    def test_world_2(self):
        _run_world(self, 2)

    def test_world_4(self):
        _run_world(self, 4)

    def test_single_process_group_matches(self):
        """A group of one (no other rank): the shard path must equal the plain op too."""
        if not dist.is_available() or not dist.is_gloo_available():
            self.skipTest("torch.distributed with gloo is not available")
        errors = []
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % _free_port(), rank=0, world_size=1)
        try:
            for check in CHECKS:
                check(0, [V], dist.group.WORLD, errors)
        finally:
            dist.destroy_process_group()
        self.assertFalse(errors, "\n".join(errors))


if __name__ == "__main__":
    unittest.main()
