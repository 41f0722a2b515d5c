"""Decoding: exact top-k and truncation sampling over logits, or fused with the LM head."""
import collections
import ctypes

import torch

from . import _lib as L

SAMPLERS = {"standard": 0, "top_n_sigma": 1, "epsilon": 2, "eta": 3, "top_h": 4, "bregman": 5, "p_less": 6}
# How sampler 'standard' combines top_k and top_p (fh_decode_top_k_top_p_order_t).
TOP_K_TOP_P_ORDERS = {"top_k_first": 0, "joint": 1}
FLAG_DEGENERATE, FLAG_GREEDY, FLAG_ARGMAX_FALLBACK = 1, 2, 4

SampleOutput = collections.namedtuple(
    "SampleOutput", "tokens logprob full_logprob rank lse entropy allowed_count topn_ids topn_logprobs flags")
SampleOutput.__doc__ = """Per-row results of sample()/sample_fused() (include/fusedhead_decode.h):
tokens int64 [B]; logprob = log q(token) of the final (truncated, renormalised) distribution and
full_logprob = log softmax(s)(token), float32 [B]; rank int64 [B] (1 is best); lse and entropy of
softmax(s), float32 [B]; allowed_count int64 [B] (size of the allowed set); topn_ids int64 and
topn_logprobs float32 [B, num_logprobs]; flags int32 [B] (FLAG_* bits)."""

# Scalar option -> (per-row struct field, dtype of the per-row array).
_PER_ROW = {"temperature": ("temperature_per_row", torch.float32), "top_k": ("top_k_per_row", torch.int64),
            "top_p": ("top_p_per_row", torch.float32), "min_p": ("min_p_per_row", torch.float32),
            "top_n_sigma": ("top_n_sigma_per_row", torch.float32),
            "epsilon": ("epsilon_per_row", torch.float32), "top_h_alpha": ("top_h_alpha_per_row", torch.float32),
            "bregman_lambda": ("bregman_lambda_per_row", torch.float32),
            "seed": ("seed_per_row", torch.int64), "offset": ("offset_per_row", torch.int64)}

# Options without a per-row array.
_SCALAR_ONLY = ("top_h_candidates", "bregman_alpha", "top_k_top_p_order")


def _options(fn, B, dev, keep, sampler, params, num_logprobs, degenerate_token, logit_bias, banned):
    o = L.new_options(L.DecodeOptions, "fh_decode_options_init")
    if sampler not in SAMPLERS:
        L.fail(fn, "sampler is %r (must be one of %s)" % (sampler, ", ".join(repr(k) for k in SAMPLERS)))
    o.sampler = SAMPLERS[sampler]
    for name, value in params.items():
        if value is None:
            continue
        if name == "top_k_top_p_order":
            if value not in TOP_K_TOP_P_ORDERS:
                L.fail(fn, "top_k_top_p_order is %r (must be one of %s)"
                       % (value, ", ".join(repr(k) for k in TOP_K_TOP_P_ORDERS)))
            o.top_k_top_p_order = TOP_K_TOP_P_ORDERS[value]
            continue
        if isinstance(value, torch.Tensor):
            # A per-row tensor [B] replaces the scalar; seeds/offsets are uint64 bit patterns in int64.
            field, dt = _PER_ROW[name]
            t = L.dense(fn, name, value, dt, (B,))
            if t.device != dev:
                L.fail(fn, "%s is on %s but the logits are on %s" % (name, t.device, dev))
            keep.append(t)
            setattr(o, field, L.ptr(t))
        elif name in ("seed", "offset"):
            setattr(o, name, L.integer(fn, name, value, 0, L.UINT64_MAX))
        elif name in ("top_k", "top_h_candidates"):
            setattr(o, name, L.integer(fn, name, value))
        else:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError("%s: %s must be a number or a per-row tensor (got %s %r)"
                                % (fn, name, type(value).__name__, value))
            setattr(o, name, float(value))
    o.num_logprobs = L.integer(fn, "num_logprobs", num_logprobs)
    o.degenerate_token = L.integer(fn, "degenerate_token", degenerate_token)
    if logit_bias is not None:
        ids, values, count = logit_bias
        ids = L.int64_buffer(fn, "logit_bias ids", ids)
        if ids.dim() != 2 or ids.shape[0] != B:
            L.fail(fn, "logit_bias ids must be [B, W] (got %s)" % (tuple(ids.shape),))
        values = L.dense(fn, "logit_bias values", values, torch.float32, tuple(ids.shape))
        count = L.int64_buffer(fn, "logit_bias count", count, (B,))
        keep.extend((ids, values, count))
        o.bias_width, o.bias_ids, o.bias_values, o.bias_count = ids.shape[1], L.ptr(ids), L.ptr(values), L.ptr(count)
    if banned is not None:
        ids, count = banned
        ids = L.int64_buffer(fn, "banned ids", ids)
        if ids.dim() != 2 or ids.shape[0] != B:
            L.fail(fn, "banned ids must be [B, W] (got %s)" % (tuple(ids.shape),))
        count = L.int64_buffer(fn, "banned count", count, (B,))
        keep.extend((ids, count))
        o.banned_width, o.banned_ids, o.banned_count = ids.shape[1], L.ptr(ids), L.ptr(count)
    return o


def _sample(fn, B, V, D, dev, dtype, call_args, fused, sampler, num_logprobs, degenerate_token, logit_bias,
            banned, params, group=None, candidates=None):
    keep = []
    opts = _options(fn, B, dev, keep, sampler, params, num_logprobs, degenerate_token, logit_bias, banned)
    f32 = dict(dtype=torch.float32, device=dev)
    i64 = dict(dtype=torch.int64, device=dev)
    n = max(L.integer(fn, "num_logprobs", num_logprobs), 0)
    res = SampleOutput(tokens=L.out_buffer((B,), torch.int64, dev), logprob=torch.empty(B, **f32),
                       full_logprob=torch.empty(B, **f32), rank=torch.empty(B, **i64), lse=torch.empty(B, **f32),
                       entropy=torch.empty(B, **f32), allowed_count=torch.empty(B, **i64),
                       topn_ids=torch.empty((B, n), **i64), topn_logprobs=torch.empty((B, n), **f32),
                       flags=torch.empty(B, dtype=torch.int32, device=dev))
    if group is not None:  # vocabulary shards: rank is not available (include/fusedhead_shard.h)
        res = res._replace(rank=None)
    out = L.DecodeOutputs(*[L.ptr(t) for t in res])
    h = L.context_for(dev)
    if group is not None:
        from .parallel import decode_sharded
        top_k = params.get("top_k")
        k0 = int(top_k.max()) if isinstance(top_k, torch.Tensor) and top_k.numel() else int(top_k or 0)
        K = max(int(candidates), int(num_logprobs)) if candidates is not None else max(16, k0, int(num_logprobs))
        call = L.lib.fh_decode_shard_candidates if fused else L.lib.fh_decode_shard_candidates_from_logits
        decode_sharded(h, opts, lambda shard, k, part: call(h, ctypes.byref(opts), ctypes.byref(shard), *call_args, k,
                                                             part), V, B, dev, group, K, out)
        return res
    nbytes = ctypes.c_size_t()
    L.check(L.lib.fh_decode_workspace_size(h, ctypes.byref(opts), B, V, D, dtype, ctypes.byref(nbytes)), fn)
    ws, wsp = L.workspace(dev, nbytes.value)
    if fused:
        L.check(L.lib.fh_decode_fused(h, ctypes.byref(opts), *call_args, ctypes.byref(out), wsp, nbytes.value), fn)
    else:
        L.check(L.lib.fh_decode_from_logits(h, ctypes.byref(opts), *call_args, ctypes.byref(out), wsp,
                                            nbytes.value), fn)
    return res


def _head(fn, hidden, c, bias):
    L.same_device(fn, hidden=hidden, c=c, bias=bias)
    hidden, H = L.matrix(fn, "hidden", hidden.detach())
    c, C = L.matrix(fn, "c", c.detach())
    bias, Bt = (None, None) if bias is None else L.vector_as_row(fn, "bias", bias.detach())
    return (H, C, Bt), (hidden, c, bias)


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, sampler="standard", top_n_sigma=None,
           epsilon=None, top_h_alpha=None, top_h_candidates=None, bregman_lambda=None, bregman_alpha=None,
           seed=0, offset=0, num_logprobs=0, degenerate_token=-1, logit_bias=None, banned=None, process_group=None,
           candidates=None, top_k_top_p_order="top_k_first"):
    """Draw the next token of each row of logits [B, V] (float32/16/bf16/64).

    temperature 0 is greedy. sampler 'standard' applies min_p -> top_k -> top_p (vLLM's order,
    tie-inclusive); top_k_top_p_order 'top_k_first' (default) renormalises over the top_k
    survivors before top_p, 'joint' (FlashInfer's top_k_top_p_sampling_from_logits) keeps a
    token iff it passes both tests on the min_p survivors. 'top_n_sigma', 'epsilon', 'eta',
    'top_h', 'bregman' use their own options (None keeps the library default); 'p_less' has
    none (keeps p >= sum p^2). Any of temperature, top_k, top_p, min_p, top_n_sigma,
    epsilon, top_h_alpha, bregman_lambda, seed, offset may be a tensor [B] (per-row values).
    The noise of token v depends only on (seed, offset, v): same seed and offset, same token.
    logit_bias = (ids [B, W], values [B, W], count [B]); banned = (ids [B, W], count [B]).
    process_group, candidates: logits [B, V_local] is this rank's slice of the vocabulary; see
    sample_fused. Returns a SampleOutput. No gradient."""
    fn = "fusedhead.sample"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        L.fail(fn, "logits must be a 2-D tensor [B, V]")
    logits, T = L.matrix(fn, "logits", logits.detach())
    B, V = logits.shape
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, top_n_sigma=top_n_sigma,
                  epsilon=epsilon, top_h_alpha=top_h_alpha, top_h_candidates=top_h_candidates,
                  bregman_lambda=bregman_lambda, bregman_alpha=bregman_alpha, seed=seed, offset=offset,
                  top_k_top_p_order=top_k_top_p_order)
    return _sample(fn, B, V, 0, logits.device, T.dtype, (ctypes.byref(T),), False, sampler, num_logprobs,
                   degenerate_token, logit_bias, banned, params, process_group, candidates)


def sample_fused(hidden, c, bias=None, *, process_group=None, candidates=None, **kwargs):
    """sample() of the logits hidden·cᵀ + bias (hidden [B, D], c [V, D], bias [V]), computed
    row by row inside the library, never as a [B, V] tensor. Same keyword arguments.

    process_group: a torch.distributed group over which the vocabulary is sharded (docs/
    distributed.md): c and bias are this rank's contiguous slice (rank order, sizes may differ),
    hidden and every option (logit_bias and banned ids are global) are the same on every rank.
    Each rank sends its statistics, its `candidates` best tokens (default max(16, top_k,
    num_logprobs); at least num_logprobs) and its Gumbel winner in one all-gather; every rank gets the same result, and
    the tokens are bitwise those of the single-device call on the whole head. Supported: greedy,
    plain sampling, top_k, min_p, and top_p after top_k or min_p (sampler 'standard'); when the
    candidates cannot prove the allowed set the call doubles them and gathers again. rank is None
    in the result."""
    fn = "fusedhead.sample_fused"
    args, keep = _head(fn, hidden, c, bias)
    H, C, Bt = args
    p = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, sampler="standard", num_logprobs=0,
             degenerate_token=-1, logit_bias=None, banned=None)
    for k in kwargs:
        if k not in p and k not in _PER_ROW and k not in _SCALAR_ONLY:
            raise TypeError("sample_fused() got an unexpected keyword argument %r" % k)
    p.update(kwargs)
    params = {k: p.get(k) for k in list(_PER_ROW) + list(_SCALAR_ONLY)}
    if params["seed"] is None:
        params["seed"] = 0
    if params["offset"] is None:
        params["offset"] = 0
    return _sample(fn, H.rows, C.rows, H.cols, keep[0].device, H.dtype,
                   (ctypes.byref(H), ctypes.byref(C), L.tensor_ptr(Bt)), True, p["sampler"], p["num_logprobs"],
                   p["degenerate_token"], p["logit_bias"], p["banned"], params, process_group, candidates)


def topk(logits, k, *, process_group=None):
    """Exact top-k of each row of logits [B, V]: (values float32 [B, k], ids int64 [B, k]), values
    descending, ties by lowest id, NaN above +inf (torch.topk's order, with its ties fixed).
    process_group: logits [B, V_local] is this rank's slice of the vocabulary (docs/
    distributed.md); ids are global and every rank gets the top-k of the whole row."""
    fn = "fusedhead.topk"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        L.fail(fn, "logits must be a 2-D tensor [B, V]")
    if process_group is not None:
        from .parallel import topk_sharded
        kl = min(int(k), logits.shape[1])
        if kl > 0:
            values, ids = topk(logits, kl)
        else:
            values = torch.empty((logits.shape[0], 0), dtype=torch.float32, device=logits.device)
            ids = torch.empty((logits.shape[0], 0), dtype=torch.int64, device=logits.device)
        return topk_sharded(values, ids, logits.shape[1], int(k), process_group)
    logits, T = L.matrix(fn, "logits", logits.detach())
    return _topk(fn, T.rows, T.cols, 0, L.integer(fn, "k", k), logits.device, T.dtype,
                 lambda *rest: L.lib.fh_topk_from_logits(L.context_for(logits.device), ctypes.byref(T), *rest))


def topk_fused(hidden, c, k, bias=None):
    """topk() of hidden·cᵀ + bias without the [B, V] logits."""
    fn = "fusedhead.topk_fused"
    (H, C, Bt), keep = _head(fn, hidden, c, bias)
    dev = keep[0].device
    return _topk(fn, H.rows, C.rows, H.cols, L.integer(fn, "k", k), dev, H.dtype,
                 lambda *rest: L.lib.fh_topk_fused(L.context_for(dev), ctypes.byref(H), ctypes.byref(C),
                                                   L.tensor_ptr(Bt), *rest))


def _topk(fn, B, V, D, k, dev, dtype, call):
    # k is range-checked by the library (its message names the argument); allocate safely first.
    values = torch.empty((B, max(k, 0)), dtype=torch.float32, device=dev)
    ids = torch.empty((B, max(k, 0)), dtype=torch.int64, device=dev)
    nbytes = ctypes.c_size_t()
    L.check(L.lib.fh_topk_workspace_size(L.context_for(dev), B, V, D, k, dtype, ctypes.byref(nbytes)), fn)
    ws, wsp = L.workspace(dev, nbytes.value)
    L.check(call(k, L.ptr(values), L.ptr(ids), wsp, nbytes.value), fn)
    return values, ids


def logsumexp(logits):
    """Row logsumexp of logits [B, V] (float32/16/bf16) as float32 [B] (fh_rows_logsumexp)."""
    fn = "fusedhead.logsumexp"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        L.fail(fn, "logits must be a 2-D tensor [B, V]")
    logits, T = L.matrix(fn, "logits", logits.detach())
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    L.check(L.lib.fh_rows_logsumexp(L.context_for(logits.device), ctypes.byref(T), L.ptr(out)), fn)
    return out
