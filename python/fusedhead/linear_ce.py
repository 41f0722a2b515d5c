"""Linear cross-entropy: loss = CE(E·Cᵀ + bias, targets) without materializing the logits."""
import collections
import ctypes
import math

import torch

from . import _lib as L

_FN = "fusedhead.linear_cross_entropy"

ACCUM_MODES = {"fp32": 0, "output_dtype": 1, "deterministic": 2}
FILTER_EPS_AUTO = -1.0  # FH_FILTER_EPS_AUTO

CrossEntropyOutput = collections.namedtuple(
    "CrossEntropyOutput", ["loss", "lse", "z_loss", "token_accuracy", "predicted_tokens", "entropy"])
CrossEntropyOutput.__doc__ = """What linear_cross_entropy returns when a return_* flag beyond return_lse is set.
Fields that were not asked for are None. Only `loss` and `lse` carry gradients."""

# Forward outputs beyond (loss, lse) that the caller may ask for: name in the extras dict -> field of
# fh_linear_ce_outputs_t.
_EXTRA_FIELDS = ("z_loss", "accuracy", "argmax", "entropy")


def _options(ignore_index, reduction, softcap, label_smoothing, logit_scale, z_loss_scale,
             entropy_weight, divisor, filter_eps=None, filter_e_grad=True, filter_c_grad=True,
             accum_mode="fp32"):
    o = L.new_options(L.LinearCEOptions, "fh_linear_ce_options_init")
    o.ignore_index = L.integer(_FN, "ignore_index", ignore_index)
    o.reduction = L.reduction_code(_FN, reduction)
    o.softcap = float(softcap or 0.0)
    o.label_smoothing = float(label_smoothing)
    o.logit_scale = float(logit_scale)
    o.z_loss_scale = float(z_loss_scale)
    o.entropy_weight = float(entropy_weight)
    o.divisor = float(divisor or 0.0)
    if filter_eps is None:
        o.filter_eps = FILTER_EPS_AUTO
    else:
        # Checked here, not in C: C reads -1 as "auto", which a negative Python value must not
        # silently become.
        eps = float(filter_eps)
        if not (eps >= 0.0 and math.isfinite(eps)):
            L.fail(_FN, "filter_eps is %r (must be finite and >= 0; 0 is off, None is auto)" % (filter_eps,))
        o.filter_eps = eps
    o.filter_e_grad = 1 if filter_e_grad else 0
    o.filter_c_grad = 1 if filter_c_grad else 0
    if not isinstance(accum_mode, str) or accum_mode not in ACCUM_MODES:
        L.fail(_FN, "accum_mode is %r (must be 'fp32', 'output_dtype' or 'deterministic')" % (accum_mode,))
    o.accum_mode = ACCUM_MODES[accum_mode]
    return o


class _Problem:
    """The fh_tensor_t views and buffers shared by the forward and backward calls."""

    def __init__(self, e, c, bias, targets, weight, token_weights):
        self.e, self.E = L.matrix(_FN, "e", e)
        self.c, self.C = L.matrix(_FN, "c", c)
        self.bias, self.B = (None, None) if bias is None else L.vector_as_row(_FN, "bias", bias)
        self.targets = targets
        self.weight = weight
        self.token_weights = token_weights
        self.N, self.D = e.shape
        self.V = c.shape[0]

    def args(self):
        return (L.tensor_ptr(self.E), L.tensor_ptr(self.C), L.tensor_ptr(self.B), L.ptr(self.targets),
                L.ptr(self.weight), L.ptr(self.token_weights))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Inputs are already flattened and checked by linear_cross_entropy(); outputs (loss, lse).
    opts_tuple holds _options()' arguments in order (the last four may be left out). `extras`, when
    given, is a dict whose keys (of "z_loss", "accuracy", "argmax", "entropy") name the further
    forward outputs wanted; forward stores each there as a tensor without gradient."""

    @staticmethod
    def forward(ctx, e, c, bias, targets, weight, token_weights, opts_tuple, extras=None):
        return forward_impl(ctx, e, c, bias, targets, weight, token_weights, opts_tuple, extras, _run_forward)

    @staticmethod
    @L.no_double_backward(_FN)
    def backward(ctx, grad_loss, grad_lse):
        return backward_impl(ctx, grad_loss, grad_lse, _run_backward, 8)


def _run_forward(ctx, h, opts, prob, out):
    nbytes = ctypes.c_size_t()
    L.check(L.lib.fh_linear_ce_forward_workspace_size(h, ctypes.byref(opts), prob.N, prob.V, prob.D,
                                                      prob.E.dtype, ctypes.byref(nbytes)), _FN)
    ws, wsp = L.workspace(prob.e.device, nbytes.value)
    L.check(L.lib.fh_linear_ce_forward(h, ctypes.byref(opts), *prob.args(), ctypes.byref(out), wsp, nbytes.value),
            _FN)


def _run_backward(ctx, h, opts, prob, gin, grads):
    nbytes = ctypes.c_size_t()
    L.check(L.lib.fh_linear_ce_backward_workspace_size(h, ctypes.byref(opts), prob.N, prob.V, prob.D,
                                                       prob.E.dtype, ctypes.byref(nbytes)), _FN)
    ws, wsp = L.workspace(prob.e.device, nbytes.value)
    L.check(L.lib.fh_linear_ce_backward(h, ctypes.byref(opts), *prob.args(), ctypes.byref(gin),
                                        ctypes.byref(grads), wsp, nbytes.value), _FN)


def forward_impl(ctx, e, c, bias, targets, weight, token_weights, opts_tuple, extras, run):
    """The forward of the autograd Functions (whole head, or a vocabulary shard: python/fusedhead/
    parallel.py): output buffers, run(ctx, h, opts, prob, out) for the library calls, saved state."""
    opts = _options(*opts_tuple)
    st = L.stats_dtype(e)
    dev = e.device
    prob = _Problem(e, c, bias, targets, weight, token_weights)
    N = prob.N
    loss = L.out_buffer((N,) if opts.reduction == L.REDUCTIONS["none"] else (), st, dev)
    lse = L.out_buffer((N,), st, dev)
    want = extras if extras is not None else {}
    need_entropy = opts.entropy_weight != 0.0 or "entropy" in want
    entropy = L.out_buffer((N,), st, dev) if need_entropy else None
    z_loss = L.out_buffer(loss.shape, st, dev) if "z_loss" in want else None
    argmax = L.out_buffer((N,), torch.int64, dev) if "argmax" in want else None
    accuracy = L.out_buffer((), st, dev) if "accuracy" in want else None
    out = L.LinearCEOutputs(loss=L.ptr(loss), lse=L.ptr(lse), entropy=L.ptr(entropy), z_loss=L.ptr(z_loss),
                            argmax=L.ptr(argmax), accuracy=L.ptr(accuracy))
    run(ctx, L.context_for(dev), opts, prob, out)
    for name, t in (("z_loss", z_loss), ("accuracy", accuracy), ("argmax", argmax), ("entropy", entropy)):
        if name in want:
            # A copy for entropy: the saved buffer must not be the user's tensor (in-place edits).
            want[name] = t.clone() if name == "entropy" else t
    ctx.opts_tuple = opts_tuple
    ctx.has_bias = bias is not None
    # The backward reads entropy only when entropy_weight != 0 (header).
    ctx.save_for_backward(e, c, bias, targets, weight, token_weights, lse,
                          entropy if opts.entropy_weight != 0.0 else None)
    ctx.set_materialize_grads(False)
    return loss, lse


def backward_impl(ctx, grad_loss, grad_lse, run, n_out):
    """The backward of the autograd Functions: gradient buffers, then run(ctx, h, opts, prob, gin,
    grads) for the library calls; n_out is the number of forward inputs."""
    e, c, bias, targets, weight, token_weights, lse, entropy = ctx.saved_tensors
    need_e, need_c, need_b = ctx.needs_input_grad[:3]
    if not (need_e or need_c or (need_b and bias is not None)) or (grad_loss is None and grad_lse is None):
        return (None,) * n_out
    if e.shape[0] == 0:
        # No rows, no contribution (and empty per-row buffers would be NULL pointers).
        return (torch.zeros_like(e) if need_e else None, torch.zeros_like(c) if need_c else None,
                torch.zeros_like(bias) if (need_b and bias is not None) else None) + (None,) * (n_out - 3)
    opts = _options(*ctx.opts_tuple)
    st = L.stats_dtype(e)
    dev = e.device
    if grad_loss is None:
        shape = (e.shape[0],) if opts.reduction == L.REDUCTIONS["none"] else ()
        grad_loss = torch.zeros(shape, dtype=st, device=dev)
    grad_loss = grad_loss.to(st).contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.to(st).contiguous()
    prob = _Problem(e, c, bias, targets, weight, token_weights)
    gin = L.LinearCEGradInputs(lse=L.ptr(lse), entropy=L.ptr(entropy), grad_loss=L.ptr(grad_loss),
                               grad_lse=L.ptr(grad_lse))
    de = torch.empty(e.shape, dtype=e.dtype, device=dev) if need_e else None
    dc = torch.empty(c.shape, dtype=c.dtype, device=dev) if need_c else None
    db = torch.empty(bias.shape, dtype=bias.dtype, device=dev) if (need_b and bias is not None) else None
    tE = L.matrix(_FN, "grad e", de)[1] if de is not None else None
    tC = L.matrix(_FN, "grad c", dc)[1] if dc is not None else None
    tB = L.vector_as_row(_FN, "grad bias", db)[1] if db is not None else None
    grads = L.Grads(L.tensor_ptr(tE), L.tensor_ptr(tC), L.tensor_ptr(tB))
    run(ctx, L.context_for(dev), opts, prob, gin, grads)
    return (de, dc, db) + (None,) * (n_out - 3)


def linear_cross_entropy(e, c, targets, bias=None, *, ignore_index=-100, reduction="mean", softcap=None,
                         label_smoothing=0.0, weight=None, token_weights=None, z_loss_scale=0.0,
                         logit_scale=None, temperature=None, entropy_weight=0.0, divisor=None,
                         return_lse=False, return_z_loss=False, return_token_accuracy=False,
                         return_predicted_tokens=False, return_entropy=False, filter_eps=None,
                         filter_e_grad=True, filter_c_grad=True, accum_mode="fp32", process_group=None):
    """Cross-entropy of the logits e·cᵀ + bias against targets, never materialized.

    Same meaning as F.cross_entropy(F.linear(e, c, bias), targets, weight=weight,
    ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing) for the
    options PyTorch has, except that a mean over no valid row (or zero total weight) is 0, not NaN.
    Extra options (include/fusedhead.h defines each): softcap (z = softcap·tanh(s/softcap)),
    token_weights ([...] like targets), z_loss_scale (λ·lse²), logit_scale or temperature
    (s = logit_scale·r = r / temperature, applied before the softcap), entropy_weight (η·entropy),
    divisor (replaces the mean's denominators, e.g. a global token count).

    e: [..., D]; c: [V, D]; bias: [V] or None; targets: integer [...] (e.shape[:-1]).
    dtypes float32/float16/bfloat16/float64 (all of e, c, bias the same). Returns the loss
    (scalar, or shaped like targets for reduction='none'), and with return_lse=True also the
    per-row logsumexp of the final logits z (shaped like targets, 0 at ignored rows),
    differentiable (for a user-side z-loss). Gradients flow to e, c and bias only.

    Further forward outputs (as Liger's CrossEntropyOutput): when any of return_z_loss,
    return_token_accuracy, return_predicted_tokens or return_entropy is True the result is a
    CrossEntropyOutput(loss, lse, z_loss, token_accuracy, predicted_tokens, entropy) namedtuple
    in which every field not asked for is None (lse is filled only with return_lse=True). Only
    loss and lse carry gradients; the others are detached (requires_grad False):
      z_loss: the z_loss_scale·lse² part already included in loss, reduced like loss (same
        shape, mean over the token weights of the valid rows; 0 when z_loss_scale is 0);
      token_accuracy: scalar, the unweighted mean over valid rows of [predicted == target]
        (0 when no row is valid);
      predicted_tokens: int64 shaped like targets, the first index of the row's largest logit,
        -1 at ignored rows;
      entropy: shaped like targets, -Σ p log p of the final softmax (after logit_scale and
        softcap), 0 at ignored rows. Detached even when entropy_weight != 0 (the entropy term's
        gradient reaches e, c, bias through loss).
    With only return_lse=True the result stays the plain tuple (loss, lse).

    Backward tuning, passed to the library; the CPU backend ignores all four (its results do not
    depend on them), they matter only for CUDA tensors (include/fusedhead.h):
      filter_eps: None (default, "auto": the input dtype's epsilon / 32), 0 (filter off) or a
        finite threshold > 0 below which a logit tile's gradient is skipped (Cut Cross-Entropy);
      filter_e_grad, filter_c_grad: let that filter skip tiles for the gradient of e, resp. of
        c and bias (default True);
      accum_mode: "fp32" (default), "output_dtype" (low memory) or "deterministic" (bitwise
        reproducible gradients).
    """
    for name, t in (("e", e), ("c", c), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            L.fail(_FN, "%s must be a torch.Tensor (got %s)" % (name, type(t).__name__))
    L.same_device(_FN, e=e, c=c, targets=targets, bias=bias, weight=weight, token_weights=token_weights)
    if e.dim() < 1:
        L.fail(_FN, "e must have at least 1 dimension [..., D] (got a scalar)")
    if c.dim() != 2:
        L.fail(_FN, "c must be 2-D [V, D] (got shape %s)" % (tuple(c.shape),))
    L.fh_dtype(_FN, "e", e)
    if tuple(targets.shape) != tuple(e.shape[:-1]):
        L.fail(_FN, "targets has shape %s (expected e.shape[:-1] = %s)" % (tuple(targets.shape),
                                                                          tuple(e.shape[:-1])))
    if temperature is not None and logit_scale is not None:
        L.fail(_FN, "give logit_scale or temperature, not both")
    if temperature is not None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            L.fail(_FN, "temperature is %r (must be finite and > 0; logit_scale = 1 / temperature)" % (temperature,))
        logit_scale = 1.0 / float(temperature)
    if logit_scale is None:
        logit_scale = 1.0
    batch_shape = targets.shape
    # Explicit N (not -1): with D = 0 (no hidden features) the logits are the bias alone, or 0.
    N = int(torch.Size(batch_shape).numel())
    e2 = e.reshape(N, e.shape[-1])
    st = L.stats_dtype(e)
    t64 = L.int64_buffer(_FN, "targets", targets).reshape(N)
    w = None if weight is None else L.dense(_FN, "weight", weight, st,
                                            (c.shape[0],) if process_group is None else None)
    tw = None if token_weights is None else L.dense(_FN, "token_weights", token_weights, st,
                                                    tuple(batch_shape)).reshape(N)
    opts_tuple = (ignore_index, reduction, softcap, label_smoothing, logit_scale, z_loss_scale,
                  entropy_weight, divisor, filter_eps, filter_e_grad, filter_c_grad, accum_mode)
    _options(*opts_tuple)  # argument errors before any work
    asked = {"z_loss": return_z_loss, "accuracy": return_token_accuracy, "argmax": return_predicted_tokens,
             "entropy": return_entropy}
    extras = {name: None for name, on in asked.items() if on}
    if process_group is None:
        loss, lse = LinearCrossEntropyFunction.apply(e2, c, bias, t64, w, tw, opts_tuple, extras)
    else:
        from .parallel import ShardedLinearCrossEntropyFunction
        loss, lse = ShardedLinearCrossEntropyFunction.apply(e2, c, bias, t64, w, tw, opts_tuple, extras,
                                                            process_group)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    lse = lse.reshape(batch_shape)
    if not extras:
        return (loss, lse) if return_lse else loss
    z_loss = extras.get("z_loss")
    if z_loss is not None:
        z_loss = z_loss.reshape(loss.shape)
    per_row = {k: (extras[k].reshape(batch_shape) if k in extras else None) for k in ("argmax", "entropy")}
    return CrossEntropyOutput(loss, lse if return_lse else None, z_loss, extras.get("accuracy"),
                              per_row["argmax"], per_row["entropy"])
