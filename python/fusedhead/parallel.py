"""Vocabulary-parallel heads over torch.distributed (docs/distributed.md).

Each rank of a process group holds a contiguous slice of the vocabulary (rank order, sizes may
differ); the functions of this package take process_group= and then run the library's shard calls
(include/fusedhead_shard.h) with the collectives issued here through torch.distributed, so they
work on whatever backend the group has (gloo for CPU tensors; NCCL for CUDA tensors once the CUDA
backend has shard kernels). Per call:
  - one all-gather of each rank's class count (int64, 8 bytes per rank) to learn the layout;
  - linear cross-entropy: one all-gather of [N, 7] fp64 partials forward, one all-reduce (sum)
    of e's gradient backward;
  - distillation: two all-gathers ([N, 7] and [N, 2] fp64) forward, one all-reduce backward;
  - decoding: one all-gather of [B, 10 + 2K] fp64 candidates (sample, sample_fused); topk from
    logits: one all-gather of each rank's top-k (value, global id) pairs.
Merges happen in rank order from all-gathered buffers, so results are deterministic and the same
on every rank.
"""
import ctypes

import torch
import torch.distributed as dist

from . import _lib as L
from . import distill as _distill
from . import linear_ce as _lce


def _all_gather(t, group):
    """[P, *t.shape]: every rank's t in rank order."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts).contiguous()


def shard_layout(v_local, group, device):
    """This rank's fh_shard_t and every rank's class count, from one all-gather of the counts."""
    sizes = _all_gather(torch.tensor([int(v_local)], dtype=torch.int64, device=device), group).reshape(-1)
    sizes = [int(x) for x in sizes.tolist()]
    rank = dist.get_rank(group)
    return L.Shard(sum(sizes[:rank]), int(v_local), sum(sizes)), sizes


def _shard_tuple(s):
    return (s.class_start, s.V_local, s.V_global)


# ---------------------------------------------------------------------------------------------
# Linear cross-entropy
# ---------------------------------------------------------------------------------------------

def _lce_forward(group):
    def run(ctx, h, opts, prob, out):
        shard, sizes = shard_layout(prob.V, group, prob.e.device)
        if prob.weight is not None and prob.weight.numel() != shard.V_global:
            L.fail(_lce._FN, "weight has %d entries (expected the global V = %d: class weights are global)"
                   % (prob.weight.numel(), shard.V_global))
        partials = torch.empty((prob.N, L.SHARD_LCE_PARTIAL), dtype=torch.float64)
        L.check(L.lib.fh_linear_ce_shard_forward(h, ctypes.byref(opts), ctypes.byref(shard), *prob.args(),
                                                 L.ptr(partials)), _lce._FN)
        gathered = _all_gather(partials, group)
        L.check(L.lib.fh_linear_ce_shard_combine(h, ctypes.byref(opts), prob.E.dtype, prob.N, shard.V_global,
                                                 len(sizes), L.ptr(gathered), L.ptr(prob.targets),
                                                 L.ptr(prob.weight), L.ptr(prob.token_weights), ctypes.byref(out)),
                _lce._FN)
        # The backward merges each row's lse, entropy, V_i and W_i from the gathered partials in
        # fp64 (fusedhead_shard.h): kept, N·P·FH_SHARD_LCE_PARTIAL doubles.
        ctx.shard, ctx.group, ctx.gathered = _shard_tuple(shard), group, gathered
    return run


def _lce_backward(ctx, h, opts, prob, gin, grads):
    shard = L.Shard(*ctx.shard)
    nranks = ctx.gathered.shape[0]  # [P, N, FH_SHARD_LCE_PARTIAL]
    L.check(L.lib.fh_linear_ce_shard_backward(h, ctypes.byref(opts), ctypes.byref(shard), *prob.args(),
                                              nranks, L.ptr(ctx.gathered), ctypes.byref(gin), ctypes.byref(grads)),
            _lce._FN)


class ShardedLinearCrossEntropyFunction(torch.autograd.Function):
    """LinearCrossEntropyFunction on a vocabulary shard; the last input is the process group."""

    @staticmethod
    def forward(ctx, e, c, bias, targets, weight, token_weights, opts_tuple, extras, group):
        return _lce.forward_impl(ctx, e, c, bias, targets, weight, token_weights, opts_tuple, extras,
                                 _lce_forward(group))

    @staticmethod
    @L.no_double_backward(_lce._FN)
    def backward(ctx, grad_loss, grad_lse):
        grads = _lce.backward_impl(ctx, grad_loss, grad_lse, _lce_backward, 9)
        _sum_e_grad(ctx, grads)
        return grads


def _sum_e_grad(ctx, grads):
    """e's gradient is the sum of every rank's part: the one collective of the backward."""
    if grads[0] is not None and ctx.saved_tensors[0].shape[0] > 0:
        dist.all_reduce(grads[0], op=dist.ReduceOp.SUM, group=ctx.group)


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------

def _distill_forward(group):
    def run(ctx, h, opts, student, tstruct, sparse, targets, out):
        if sparse:
            L.fail(_distill._FN, "a sparse teacher is not supported with process_group", L.ERR_UNSUPPORTED)
        shard, sizes = shard_layout(student.C.rows, group, student.e.device)
        N = student.E.rows
        args = (h, ctypes.byref(opts), ctypes.byref(shard), ctypes.byref(student.head), ctypes.byref(tstruct.head),
                L.ptr(targets))
        stats = torch.empty((N, L.SHARD_DISTILL_STATS), dtype=torch.float64)
        L.check(L.lib.fh_distill_shard_stats(*args, L.ptr(stats)), ctx.fn)
        gstats = _all_gather(stats, group)
        div = torch.empty((N, L.SHARD_DISTILL_DIV), dtype=torch.float64)
        L.check(L.lib.fh_distill_shard_divergence(*args, len(sizes), L.ptr(gstats), L.ptr(div)), ctx.fn)
        gdiv = _all_gather(div, group)
        L.check(L.lib.fh_distill_shard_combine(h, ctypes.byref(opts), student.E.dtype, N, len(sizes), L.ptr(gstats),
                                               L.ptr(gdiv), L.ptr(targets), ctypes.byref(out)), ctx.fn)
        # The backward merges the global row state from these in fp64 (fusedhead_shard.h).
        ctx.shard, ctx.group, ctx.nranks, ctx.gstats, ctx.gdiv = _shard_tuple(shard), group, len(sizes), gstats, gdiv
    return run


def _distill_backward(ctx, h, opts, student, tstruct, sparse, targets, gin, grads):
    shard = L.Shard(*ctx.shard)
    L.check(L.lib.fh_distill_shard_backward(h, ctypes.byref(opts), ctypes.byref(shard), ctypes.byref(student.head),
                                            ctypes.byref(tstruct.head), L.ptr(targets), ctx.nranks, L.ptr(ctx.gstats),
                                            L.ptr(ctx.gdiv), ctypes.byref(gin), ctypes.byref(grads)), ctx.fn)


class ShardedDistillationFunction(torch.autograd.Function):
    """DistillationFunction on a vocabulary shard; the last input is the process group."""

    @staticmethod
    def forward(ctx, e, c, bias, teacher, targets, fn, kw, components, group):
        return _distill.forward_impl(ctx, e, c, bias, teacher, targets, fn, kw, components, _distill_forward(group))

    @staticmethod
    @L.no_double_backward("fusedhead distillation")
    def backward(ctx, grad_loss):
        grads = _distill.backward_impl(ctx, grad_loss, _distill_backward, 9)
        _sum_e_grad(ctx, grads)
        return grads


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def decode_sharded(h, opts, candidates, v_local, B, device, group, K, out):
    """candidates(shard, K, partials) (fh_decode_shard_candidates or its from-logits twin), one
    all-gather, fh_decode_shard_combine into `out`. When the merge cannot prove a row's allowed
    set from K candidates per rank it says so (the same on every rank, which hold the same
    gathered data), and every rank gathers again with 2K."""
    shard, sizes = shard_layout(v_local, group, device)
    K = max(1, min(int(K), shard.V_global))
    while True:
        part = torch.empty((B, 10 + 2 * K), dtype=torch.float64)  # FH_SHARD_DECODE_WIDTH(K)
        L.check(candidates(shard, K, L.ptr(part)))
        gathered = _all_gather(part, group)
        st = L.lib.fh_decode_shard_combine(h, ctypes.byref(opts), B, shard.V_global, len(sizes), K, L.ptr(gathered),
                                           ctypes.byref(out))
        if st == L.ERR_UNSUPPORTED and K < shard.V_global and b"larger K" in L.lib.fh_last_error():
            K = min(2 * K, shard.V_global)
            continue
        L.check(st)
        return


def topk_sharded(values, ids, v_local, k, group):
    """Merge every rank's top-min(k, V_local) (values fp32 [B, k_r], local ids) into the global
    top-k: one all-gather of (value, global id) pairs padded to k, then the single-device order
    (NaN first, value descending, lowest id on ties). Exact for logits inputs: their values are
    the logits themselves, so the fp32 order is the order of the op."""
    shard, sizes = shard_layout(v_local, group, values.device)
    if not 1 <= k <= shard.V_global:
        L.fail("fusedhead.topk", "k is %d (must be in [1, V = %d])" % (k, shard.V_global))
    B = values.shape[0]
    pad_v = torch.full((B, k), float("-inf"), dtype=torch.float64, device=values.device)
    pad_i = torch.full((B, k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=values.device)
    n = values.shape[1]
    pad_v[:, :n] = values.double()
    pad_i[:, :n] = ids + shard.class_start
    vals = _all_gather(pad_v, group).permute(1, 0, 2).reshape(B, -1)
    gids = _all_gather(pad_i, group).permute(1, 0, 2).reshape(B, -1)
    by_id = torch.sort(gids, dim=1, stable=True)
    vals, gids = vals.gather(1, by_id.indices), by_id.values
    by_value = torch.sort(vals, dim=1, descending=True, stable=True)
    top = by_value.indices[:, :k]
    return vals.gather(1, top).float(), gids.gather(1, top)
