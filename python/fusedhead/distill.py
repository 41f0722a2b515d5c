"""Distillation: an f-divergence between a teacher head (dense, or sparse top-K log-probs) and a
student head, gradients for the student only, logits never materialized."""
import ctypes

import torch

from . import _lib as L

_FN = "fusedhead.distillation_loss"
_FN_SPARSE = "fusedhead.sparse_distillation_loss"

DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "jsd_scaled": 3, "tvd": 4,
               "skew_forward_kl": 5, "skew_reverse_kl": 6, "alpha": 7, "hellinger": 8, "chi_square": 9}
JSD_ENDPOINTS = {"kl": 0, "plain": 1}
SPARSE_MASS = {"renormalize": 0, "remainder": 1, "none": 2}


def _code(fn, name, table, value):
    if value not in table:
        L.fail(fn, "%s is %r (must be one of %s)" % (name, value, ", ".join(repr(k) for k in table)))
    return table[value]


def _options(fn, kw):
    o = L.new_options(L.DistillOptions, "fh_distill_options_init")
    o.divergence = _code(fn, "divergence", DIVERGENCES, kw["divergence"])
    o.beta = float(kw["beta"])
    o.jsd_endpoints = _code(fn, "jsd_endpoints", JSD_ENDPOINTS, kw["jsd_endpoints"])
    o.skew = float(kw["skew"])
    o.alpha = float(kw["alpha"])
    o.temperature = float(kw["temperature"])
    o.scale_by_t_squared = 1 if kw["scale_by_t_squared"] else 0
    o.soft_weight = float(kw["soft_weight"])
    o.hard_weight = float(kw["hard_weight"])
    o.ignore_index = L.integer(fn, "ignore_index", kw["ignore_index"])
    o.reduction = L.reduction_code(fn, kw["reduction"])
    o.divisor = float(kw["divisor"] or 0.0)
    o.sparse_mass = _code(fn, "sparse_mass", SPARSE_MASS, kw["sparse_mass"])
    return o


class _Head:
    def __init__(self, fn, who, e, c, bias):
        self.e, self.E = L.matrix(fn, who + " e", e)
        self.c, self.C = L.matrix(fn, who + " c", c)
        self.bias, self.B = (None, None) if bias is None else L.vector_as_row(fn, who + " bias", bias)
        self.head = L.DistillHead(L.tensor_ptr(self.E), L.tensor_ptr(self.C), L.tensor_ptr(self.B))


def _teacher_arg(fn, teacher):
    """(C struct kept alive, sparse?) for the teacher tuple built by the public functions."""
    if teacher[0] == "dense":
        return _Head(fn, "teacher", *teacher[1:]), False
    _, ids, logprobs = teacher
    t = L.DistillSparseTeacher(L.ptr(ids), L.ptr(logprobs), ids.shape[1])
    t._keep = (ids, logprobs)
    return t, True


def _shape(student, teacher, sparse, N):
    s = L.DistillShape(N=N, V=student.C.rows, D_s=student.E.cols, dtype_s=student.E.dtype, dtype_t=student.E.dtype)
    if sparse:
        s.K = teacher.K
    else:
        s.V_t, s.D_t, s.dtype_t = teacher.C.rows, teacher.E.cols, teacher.E.dtype
    return s


class DistillationFunction(torch.autograd.Function):
    """Student (e, c, bias) get gradients; the teacher tuple and targets are constants. `components`,
    when given, is a dict that forward fills with "soft" and "hard" (the reduced soft and hard
    losses, no gradient)."""

    @staticmethod
    def forward(ctx, e, c, bias, teacher, targets, fn, kw, components=None):
        return forward_impl(ctx, e, c, bias, teacher, targets, fn, kw, components, _run_forward)

    @staticmethod
    @L.no_double_backward("fusedhead distillation")
    def backward(ctx, grad_loss):
        return backward_impl(ctx, grad_loss, _run_backward, 8)


def _runner(workspace_size, dense_call, sparse_call):
    """The library calls of one pass: workspace query, then the dense or sparse call with the
    pass's trailing structs (out; or gin, grads)."""
    def run(ctx, h, opts, student, tstruct, sparse, targets, *structs):
        shape = _shape(student, tstruct, sparse, student.E.rows)
        nbytes = ctypes.c_size_t()
        L.check(workspace_size(h, ctypes.byref(opts), ctypes.byref(shape), ctypes.byref(nbytes)), ctx.fn)
        ws, wsp = L.workspace(student.e.device, nbytes.value)
        tp = ctypes.byref(tstruct) if sparse else ctypes.byref(tstruct.head)
        L.check((sparse_call if sparse else dense_call)(h, ctypes.byref(opts), ctypes.byref(student.head), tp,
                                                        L.ptr(targets), *[ctypes.byref(x) for x in structs], wsp,
                                                        nbytes.value), ctx.fn)
    return run


_run_forward = _runner(L.lib.fh_distill_forward_workspace_size, L.lib.fh_distill_forward,
                       L.lib.fh_distill_sparse_forward)
_run_backward = _runner(L.lib.fh_distill_backward_workspace_size, L.lib.fh_distill_backward,
                        L.lib.fh_distill_sparse_backward)


def forward_impl(ctx, e, c, bias, teacher, targets, fn, kw, components, run):
    """The forward of the autograd Functions (whole head, or a vocabulary shard: python/fusedhead/
    parallel.py): buffers, run(ctx, h, opts, student, teacher, sparse, targets, out), saved state."""
    opts = _options(fn, kw)
    st = L.stats_dtype(e)
    dev = e.device
    N = e.shape[0]
    student = _Head(fn, "student", e, c, bias)
    tstruct, sparse = _teacher_arg(fn, teacher)
    per_row = opts.reduction == L.REDUCTIONS["none"]
    loss = L.out_buffer((N,) if per_row else (), st, dev)
    row_state = L.out_buffer((N, L.DISTILL_ROW_STATE), st, dev)
    soft = hard = None
    if components is not None:
        soft, hard = L.out_buffer(loss.shape, st, dev), L.out_buffer(loss.shape, st, dev)
    out = L.DistillOutputs(loss=L.ptr(loss), row_state=L.ptr(row_state), soft_loss=L.ptr(soft),
                           hard_loss=L.ptr(hard))
    ctx.fn, ctx.kw, ctx.teacher = fn, kw, teacher  # before run: its messages name ctx.fn
    run(ctx, L.context_for(dev), opts, student, tstruct, sparse, targets, out)
    if components is not None:
        components["soft"], components["hard"] = soft, hard
    ctx.save_for_backward(e, c, bias, targets, row_state)
    return loss


def backward_impl(ctx, grad_loss, run, n_out):
    """The backward of the autograd Functions: gradient buffers, then run(ctx, h, opts, student,
    teacher, sparse, targets, gin, grads); n_out is the number of forward inputs."""
    e, c, bias, targets, row_state = ctx.saved_tensors
    need_e, need_c, need_b = ctx.needs_input_grad[:3]
    if not (need_e or need_c or (need_b and bias is not None)):
        return (None,) * n_out
    if e.shape[0] == 0:
        # No rows, no contribution (and empty per-row buffers would be NULL pointers).
        return (torch.zeros_like(e) if need_e else None, torch.zeros_like(c) if need_c else None,
                torch.zeros_like(bias) if (need_b and bias is not None) else None) + (None,) * (n_out - 3)
    opts = _options(ctx.fn, ctx.kw)
    st = L.stats_dtype(e)
    dev = e.device
    grad_loss = grad_loss.to(st).contiguous()
    student = _Head(ctx.fn, "student", e, c, bias)
    tstruct, sparse = _teacher_arg(ctx.fn, ctx.teacher)
    de = torch.empty(e.shape, dtype=e.dtype, device=dev) if need_e else None
    dc = torch.empty(c.shape, dtype=c.dtype, device=dev) if need_c else None
    db = torch.empty(bias.shape, dtype=bias.dtype, device=dev) if (need_b and bias is not None) else None
    tE = L.matrix(ctx.fn, "grad e", de)[1] if de is not None else None
    tC = L.matrix(ctx.fn, "grad c", dc)[1] if dc is not None else None
    tB = L.vector_as_row(ctx.fn, "grad bias", db)[1] if db is not None else None
    grads = L.Grads(L.tensor_ptr(tE), L.tensor_ptr(tC), L.tensor_ptr(tB))
    gin = L.DistillGradInputs(row_state=L.ptr(row_state), grad_loss=L.ptr(grad_loss))
    run(ctx, L.context_for(dev), opts, student, tstruct, sparse, targets, gin, grads)
    return (de, dc, db) + (None,) * (n_out - 3)


def _common(fn, student_e, student_c, targets, student_bias, kw, **others):
    for name, t in (("student_e", student_e), ("student_c", student_c)):
        if not isinstance(t, torch.Tensor):
            L.fail(fn, "%s must be a torch.Tensor (got %s)" % (name, type(t).__name__))
    L.same_device(fn, student_e=student_e, student_c=student_c, student_bias=student_bias, targets=targets,
                  **others)
    if student_e.dim() < 1 or student_c.dim() != 2:
        L.fail(fn, "student_e must be [..., D] and student_c [V, D] (got %s and %s)"
               % (tuple(student_e.shape), tuple(student_c.shape)))
    L.fh_dtype(fn, "student_e", student_e)
    batch = student_e.shape[:-1]
    N = int(torch.Size(batch).numel())
    t64 = None
    if targets is not None:
        t64 = L.int64_buffer(fn, "targets", targets, tuple(batch)).reshape(N)
    _options(fn, kw)  # argument errors before any work
    return batch, N, student_e.reshape(N, student_e.shape[-1]), t64


def _apply(e2, c, bias, teacher, t64, fn, kw, batch, return_components, process_group=None):
    """Run the Function; reshape per-row results to the batch shape; add the components if asked."""
    components = {} if return_components else None
    if process_group is None:
        loss = DistillationFunction.apply(e2, c, bias, teacher, t64, fn, kw, components)
    else:
        from .parallel import ShardedDistillationFunction
        loss = ShardedDistillationFunction.apply(e2, c, bias, teacher, t64, fn, kw, components, process_group)
    parts = [loss] + ([components["soft"], components["hard"]] if return_components else [])
    if kw["reduction"] == "none":
        parts = [p.reshape(batch) for p in parts]
    return tuple(parts) if return_components else parts[0]


def _kw(divergence, beta, jsd_endpoints, skew, alpha, temperature, scale_by_t_squared, soft_weight,
        hard_weight, ignore_index, reduction, divisor, sparse_mass="renormalize"):
    return dict(divergence=divergence, beta=beta, jsd_endpoints=jsd_endpoints, skew=skew, alpha=alpha,
                temperature=temperature, scale_by_t_squared=scale_by_t_squared, soft_weight=soft_weight,
                hard_weight=hard_weight, ignore_index=ignore_index, reduction=reduction, divisor=divisor,
                sparse_mass=sparse_mass)


def distillation_loss(student_e, student_c, teacher_e, teacher_c, targets=None, student_bias=None,
                      teacher_bias=None, *, divergence="forward_kl", beta=0.5, jsd_endpoints="kl", skew=0.1,
                      alpha=0.5, temperature=1.0, scale_by_t_squared=True, soft_weight=1.0, hard_weight=0.0,
                      ignore_index=-100, reduction="mean", divisor=None, return_components=False,
                      process_group=None):
    """Distillation loss between a dense teacher head and the student head (include/fusedhead.h,
    "Distillation", defines every option).

    loss_i = hard_weight·CE(s_i, targets_i) + soft_weight·κ·D(P_i‖Q_i), P = softmax(t/T) over the
    student's V classes, Q = softmax(s/T), κ = T² when scale_by_t_squared. divergence is one of
    'forward_kl' (KL(P‖Q), as F.kl_div(log Q, P)), 'reverse_kl', 'jsd' (beta, jsd_endpoints 'kl'
    or 'plain'), 'jsd_scaled', 'tvd', 'skew_forward_kl', 'skew_reverse_kl' (skew), 'alpha'
    (alpha), 'hellinger', 'chi_square'. student_e [..., D_s], student_c [V, D_s], teacher_e
    [..., D_t], teacher_c [V_t >= V, D_t]; targets [...] or None. The teacher gets no gradient.
    Returns the mean/sum scalar or the per-row loss (reduction='none'); all-ignored mean is 0.
    With return_components=True returns (loss, soft_loss, hard_loss): soft_loss = κ·D and
    hard_loss = CE, each reduced like loss and unweighted, so loss = hard_weight·hard_loss +
    soft_weight·soft_loss; the components are detached (for logging; gradients flow through loss).
    hard_loss is 0 when hard_weight is 0 (the library then skips the cross-entropy) or targets is
    None.

    process_group: a torch.distributed group over which both heads' vocabularies are sharded
    (docs/distributed.md): student_c/student_bias and teacher_c/teacher_bias hold this rank's
    contiguous slice of the classes, in rank order (sizes may differ; the last rank's teacher may
    hold the V_t − V extra rows); student_e, teacher_e and targets (global ids) are the same on
    every rank. The loss equals the single-device one to fp64 round-off; the student's c and bias
    gradients are this rank's slice and student_e's is summed over the ranks. Two all-gathers of per-row partials forward, one
    all-reduce of e's gradient backward. CPU tensors (gloo) on the reference backend.
    """
    kw = _kw(divergence, beta, jsd_endpoints, skew, alpha, temperature, scale_by_t_squared, soft_weight,
             hard_weight, ignore_index, reduction, divisor)
    fn = _FN
    batch, N, e2, t64 = _common(fn, student_e, student_c, targets, student_bias, kw, teacher_e=teacher_e,
                                teacher_c=teacher_c, teacher_bias=teacher_bias)
    if tuple(teacher_e.shape[:-1]) != tuple(batch):
        L.fail(fn, "teacher_e has shape %s (expected %s + [D_t])" % (tuple(teacher_e.shape), tuple(batch)))
    L.fh_dtype(fn, "teacher_e", teacher_e)
    te2 = teacher_e.detach().reshape(N, teacher_e.shape[-1])
    teacher = ("dense", te2, teacher_c.detach(), None if teacher_bias is None else teacher_bias.detach())
    return _apply(e2, student_c, student_bias, teacher, t64, fn, kw, batch, return_components, process_group)


def sparse_distillation_loss(student_e, student_c, teacher_ids, teacher_logprobs, targets=None,
                             student_bias=None, *, sparse_mass="renormalize", divergence="forward_kl",
                             beta=0.5, jsd_endpoints="kl", skew=0.1, alpha=0.5, temperature=1.0,
                             scale_by_t_squared=True, soft_weight=1.0, hard_weight=0.0, ignore_index=-100,
                             reduction="mean", divisor=None, return_components=False):
    """Distillation from a sparse (offline) teacher: teacher_ids [..., K] (integer, in [0, V), no
    duplicates) and teacher_logprobs [..., K] (temperature-1 log-probabilities, as a serving
    engine returns them). sparse_mass 'renormalize' (the teacher conditioned on its support, any
    T; divergences finite off the support), 'remainder' (T = 1; the missing mass is one extra
    bucket against the student's mass outside the support; every divergence) or 'none' (T = 1,
    forward_kl only: the log-probs as given against the student's full log-softmax at the ids,
    docs/distillation.md). Other arguments (return_components included) as distillation_loss."""
    kw = _kw(divergence, beta, jsd_endpoints, skew, alpha, temperature, scale_by_t_squared, soft_weight,
             hard_weight, ignore_index, reduction, divisor, sparse_mass)
    fn = _FN_SPARSE
    batch, N, e2, t64 = _common(fn, student_e, student_c, targets, student_bias, kw, teacher_ids=teacher_ids,
                                teacher_logprobs=teacher_logprobs)
    if teacher_ids.dim() != len(batch) + 1 or tuple(teacher_ids.shape[:-1]) != tuple(batch) or \
            tuple(teacher_logprobs.shape) != tuple(teacher_ids.shape):
        L.fail(fn, "teacher_ids and teacher_logprobs must both be %s + [K] (got %s and %s)"
               % (tuple(batch), tuple(teacher_ids.shape), tuple(teacher_logprobs.shape)))
    K = teacher_ids.shape[-1]
    ids = L.int64_buffer(fn, "teacher_ids", teacher_ids).reshape(N, K)
    if not teacher_logprobs.dtype.is_floating_point:
        L.fail(fn, "teacher_logprobs has dtype %s (must be floating point)" % teacher_logprobs.dtype)
    # The sparse teacher's log-probs are fp32 whatever the student dtype (header).
    lp = teacher_logprobs.detach().to(torch.float32).contiguous().reshape(N, K)
    return _apply(e2, student_c, student_bias, ("sparse", ids, lp), t64, fn, kw, batch, return_components)
