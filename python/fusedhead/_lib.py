"""ctypes binding of libfusedhead: library loading, struct mirrors, contexts, errors, tensor views.

Everything here mirrors include/fusedhead.h. Pointer fields are declared c_void_p (same ABI as the
typed C pointers) so that torch data pointers can be stored without casts. The struct sizes are
checked against the struct_size each *_options_init writes when the library is loaded, so a
header change that this file does not follow fails loudly instead of corrupting memory.
"""
import ctypes
import atexit
import ctypes.util
import functools
import operator
import os
import re
import threading

import torch

# ---------------------------------------------------------------------------------------------
# Status and errors
# ---------------------------------------------------------------------------------------------

SUCCESS = 0
ERR_INVALID_ARGUMENT = 1
ERR_INVALID_USAGE = 2
ERR_UNSUPPORTED = 3
ERR_INSUFFICIENT_WORKSPACE = 4
ERR_OUT_OF_MEMORY = 5
ERR_CUDA = 6
ERR_INTERNAL = 7
STATUS_NAMES = {
    0: "FH_SUCCESS", 1: "FH_ERR_INVALID_ARGUMENT", 2: "FH_ERR_INVALID_USAGE",
    3: "FH_ERR_UNSUPPORTED", 4: "FH_ERR_INSUFFICIENT_WORKSPACE", 5: "FH_ERR_OUT_OF_MEMORY",
    6: "FH_ERR_CUDA", 7: "FH_ERR_INTERNAL",
}


class FusedHeadError(ValueError, RuntimeError):
    """A fusedhead call failed. `status` is the fh_status_t value, `status_name` its name and
    `message` fh_last_error() (or the Python-side check's message, in the same style)."""

    def __init__(self, status, message):
        self.status = int(status)
        self.status_name = STATUS_NAMES.get(self.status, "unknown status %d" % self.status)
        self.message = message
        super().__init__("%s: %s" % (self.status_name, message))


def fail(fn, msg, status=ERR_INVALID_ARGUMENT):
    """Raise a Python-side argument error in the library's message style."""
    raise FusedHeadError(status, "%s: %s" % (fn, msg))


# ---------------------------------------------------------------------------------------------
# Enums (C enums are int)
# ---------------------------------------------------------------------------------------------

BACKEND_CPU, BACKEND_CUDA = 0, 1
DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_F64 = 0, 1, 2, 3
TORCH_DTYPES = {torch.float32: DTYPE_F32, torch.float16: DTYPE_F16,
                torch.bfloat16: DTYPE_BF16, torch.float64: DTYPE_F64}
REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}
DISTILL_ROW_STATE = 4


def integer(fn, name, value, lo=-(1 << 63), hi=(1 << 63) - 1):
    """An integer argument, checked in Python before it reaches a ctypes field (which would
    truncate 1.5 to 1 or wrap 2**64 to 0 silently): TypeError for a non-integer (float, str),
    FusedHeadError for a value outside [lo, hi] (int64 unless stated, [0, 2**64) for seeds)."""
    if isinstance(value, bool):
        value = int(value)
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError("%s: %s must be an integer (got %s %r)" % (fn, name, type(value).__name__, value)) from None
    if not lo <= v <= hi:
        fail(fn, "%s is %d (must be in [%d, %d])" % (name, v, lo, hi))
    return v


UINT64_MAX = (1 << 64) - 1


def reduction_code(fn, reduction):
    if reduction not in REDUCTIONS:
        fail(fn, "reduction is %r (must be 'mean', 'sum' or 'none')" % (reduction,))
    return REDUCTIONS[reduction]


# ---------------------------------------------------------------------------------------------
# Struct mirrors
# ---------------------------------------------------------------------------------------------

_vp = ctypes.c_void_p
_i64 = ctypes.c_int64
_u64 = ctypes.c_uint64
_f = ctypes.c_float
_i = ctypes.c_int


class Tensor(ctypes.Structure):
    _fields_ = [("data", _vp), ("dtype", _i), ("rows", _i64), ("cols", _i64), ("row_stride", _i64)]


class LinearCEOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ignore_index", _i64), ("reduction", _i),
                ("softcap", _f), ("label_smoothing", _f), ("logit_scale", _f), ("z_loss_scale", _f),
                ("entropy_weight", _f), ("divisor", _f), ("filter_eps", _f), ("filter_e_grad", _i),
                ("filter_c_grad", _i), ("accum_mode", _i), ("accumulate", _i)]


class LinearCEOutputs(ctypes.Structure):
    _fields_ = [("loss", _vp), ("lse", _vp), ("entropy", _vp), ("z_loss", _vp), ("argmax", _vp),
                ("accuracy", _vp)]


class LinearCEGradInputs(ctypes.Structure):
    _fields_ = [("lse", _vp), ("entropy", _vp), ("grad_loss", _vp), ("grad_lse", _vp)]


class Grads(ctypes.Structure):
    """fh_linear_ce_grads_t and fh_distill_grads_t (same layout)."""
    _fields_ = [("dE", ctypes.POINTER(Tensor)), ("dC", ctypes.POINTER(Tensor)),
                ("dbias", ctypes.POINTER(Tensor))]


class DistillOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("divergence", _i), ("beta", _f),
                ("jsd_endpoints", _i), ("skew", _f), ("alpha", _f), ("temperature", _f),
                ("scale_by_t_squared", _i), ("soft_weight", _f), ("hard_weight", _f),
                ("ignore_index", _i64), ("reduction", _i), ("divisor", _f), ("sparse_mass", _i),
                ("accum_mode", _i), ("accumulate", _i)]


class DistillHead(ctypes.Structure):
    _fields_ = [("E", ctypes.POINTER(Tensor)), ("C", ctypes.POINTER(Tensor)),
                ("bias", ctypes.POINTER(Tensor))]


class DistillSparseTeacher(ctypes.Structure):
    _fields_ = [("ids", _vp), ("logprobs", _vp), ("K", _i64)]


class DistillOutputs(ctypes.Structure):
    _fields_ = [("loss", _vp), ("row_state", _vp), ("soft_loss", _vp), ("hard_loss", _vp)]


class DistillGradInputs(ctypes.Structure):
    _fields_ = [("row_state", _vp), ("grad_loss", _vp)]


class DistillShape(ctypes.Structure):
    _fields_ = [("N", _i64), ("V", _i64), ("D_s", _i64), ("V_t", _i64), ("D_t", _i64), ("K", _i64),
                ("dtype_s", _i), ("dtype_t", _i)]


class DecodeOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("sampler", _i), ("temperature", _f),
                ("top_k", _i64), ("top_p", _f), ("min_p", _f), ("top_n_sigma", _f), ("epsilon", _f),
                ("top_h_alpha", _f), ("top_h_candidates", _i64), ("bregman_lambda", _f),
                ("bregman_alpha", _f), ("seed", _u64), ("offset", _u64), ("num_logprobs", _i64),
                ("degenerate_token", _i64),
                ("temperature_per_row", _vp), ("top_k_per_row", _vp), ("top_p_per_row", _vp),
                ("min_p_per_row", _vp), ("top_n_sigma_per_row", _vp), ("epsilon_per_row", _vp),
                ("top_h_alpha_per_row", _vp), ("bregman_lambda_per_row", _vp),
                ("seed_per_row", _vp), ("offset_per_row", _vp),
                ("bias_width", _i64), ("bias_ids", _vp), ("bias_values", _vp), ("bias_count", _vp),
                ("banned_width", _i64), ("banned_ids", _vp), ("banned_count", _vp),
                ("top_k_top_p_order", _i)]


class DecodeOutputs(ctypes.Structure):
    _fields_ = [("tokens", _vp), ("logprob", _vp), ("full_logprob", _vp), ("rank", _vp),
                ("lse", _vp), ("entropy", _vp), ("allowed_count", _vp), ("topn_ids", _vp),
                ("topn_logprobs", _vp), ("flags", _vp)]


class Shard(ctypes.Structure):
    _fields_ = [("class_start", _i64), ("V_local", _i64), ("V_global", _i64)]


SHARD_LCE_PARTIAL = 9    # FH_SHARD_LCE_PARTIAL
SHARD_DISTILL_STATS = 7  # FH_SHARD_DISTILL_STATS
SHARD_DISTILL_DIV = 2    # FH_SHARD_DISTILL_DIV


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_P = ctypes.POINTER
_sz = ctypes.c_size_t
_SIGNATURES = {
    "fh_version": (ctypes.c_char_p, []),
    "fh_version_number": (_i, []),
    "fh_status_string": (ctypes.c_char_p, [_i]),
    "fh_last_error": (ctypes.c_char_p, []),
    "fh_backend_available": (_i, [_i]),
    "fh_context_create": (_i, [_P(_vp), _i, _i]),
    "fh_context_destroy": (None, [_vp]),
    "fh_context_set_stream": (_i, [_vp, _vp]),
    "fh_context_check": (_i, [_vp]),
    "fh_context_set_num_threads": (_i, [_vp, _i]),
    "fh_context_get_num_threads": (_i, [_vp, _P(_i)]),
    "fh_rows_logsumexp": (_i, [_vp, _P(Tensor), _vp]),
    "fh_linear_ce_options_init": (None, [_vp]),
    "fh_linear_ce_forward_workspace_size": (_i, [_vp, _P(LinearCEOptions), _i64, _i64, _i64, _i, _P(_sz)]),
    "fh_linear_ce_backward_workspace_size": (_i, [_vp, _P(LinearCEOptions), _i64, _i64, _i64, _i, _P(_sz)]),
    "fh_linear_ce_forward": (_i, [_vp, _P(LinearCEOptions), _P(Tensor), _P(Tensor), _P(Tensor), _vp, _vp,
                                  _vp, _P(LinearCEOutputs), _vp, _sz]),
    "fh_linear_ce_backward": (_i, [_vp, _P(LinearCEOptions), _P(Tensor), _P(Tensor), _P(Tensor), _vp, _vp,
                                   _vp, _P(LinearCEGradInputs), _P(Grads), _vp, _sz]),
    "fh_distill_options_init": (None, [_vp]),
    "fh_distill_forward_workspace_size": (_i, [_vp, _P(DistillOptions), _P(DistillShape), _P(_sz)]),
    "fh_distill_backward_workspace_size": (_i, [_vp, _P(DistillOptions), _P(DistillShape), _P(_sz)]),
    "fh_distill_forward": (_i, [_vp, _P(DistillOptions), _P(DistillHead), _P(DistillHead), _vp,
                                _P(DistillOutputs), _vp, _sz]),
    "fh_distill_backward": (_i, [_vp, _P(DistillOptions), _P(DistillHead), _P(DistillHead), _vp,
                                 _P(DistillGradInputs), _P(Grads), _vp, _sz]),
    "fh_distill_sparse_forward": (_i, [_vp, _P(DistillOptions), _P(DistillHead), _P(DistillSparseTeacher),
                                       _vp, _P(DistillOutputs), _vp, _sz]),
    "fh_distill_sparse_backward": (_i, [_vp, _P(DistillOptions), _P(DistillHead), _P(DistillSparseTeacher),
                                        _vp, _P(DistillGradInputs), _P(Grads), _vp, _sz]),
    "fh_linear_ce_shard_forward": (_i, [_vp, _P(LinearCEOptions), _P(Shard), _P(Tensor), _P(Tensor), _P(Tensor),
                                        _vp, _vp, _vp, _vp]),
    "fh_linear_ce_shard_combine": (_i, [_vp, _P(LinearCEOptions), _i, _i64, _i64, _i64, _vp, _vp, _vp, _vp,
                                        _P(LinearCEOutputs)]),
    "fh_linear_ce_shard_backward": (_i, [_vp, _P(LinearCEOptions), _P(Shard), _P(Tensor), _P(Tensor), _P(Tensor),
                                         _vp, _vp, _vp, _i64, _vp, _P(LinearCEGradInputs), _P(Grads)]),
    "fh_distill_shard_stats": (_i, [_vp, _P(DistillOptions), _P(Shard), _P(DistillHead), _P(DistillHead), _vp,
                                    _vp]),
    "fh_distill_shard_divergence": (_i, [_vp, _P(DistillOptions), _P(Shard), _P(DistillHead), _P(DistillHead),
                                         _vp, _i64, _vp, _vp]),
    "fh_distill_shard_combine": (_i, [_vp, _P(DistillOptions), _i, _i64, _i64, _vp, _vp, _vp,
                                      _P(DistillOutputs)]),
    "fh_distill_shard_backward": (_i, [_vp, _P(DistillOptions), _P(Shard), _P(DistillHead), _P(DistillHead), _vp,
                                       _i64, _vp, _vp, _P(DistillGradInputs), _P(Grads)]),
    "fh_decode_shard_candidates": (_i, [_vp, _P(DecodeOptions), _P(Shard), _P(Tensor), _P(Tensor), _P(Tensor), _i64,
                                        _vp]),
    "fh_decode_shard_candidates_from_logits": (_i, [_vp, _P(DecodeOptions), _P(Shard), _P(Tensor), _i64, _vp]),
    "fh_decode_shard_combine": (_i, [_vp, _P(DecodeOptions), _i64, _i64, _i64, _i64, _vp, _P(DecodeOutputs)]),
    "fh_decode_options_init": (None, [_vp]),
    "fh_decode_workspace_size": (_i, [_vp, _P(DecodeOptions), _i64, _i64, _i64, _i, _P(_sz)]),
    "fh_decode_from_logits": (_i, [_vp, _P(DecodeOptions), _P(Tensor), _P(DecodeOutputs), _vp, _sz]),
    "fh_decode_fused": (_i, [_vp, _P(DecodeOptions), _P(Tensor), _P(Tensor), _P(Tensor), _P(DecodeOutputs),
                             _vp, _sz]),
    "fh_topk_workspace_size": (_i, [_vp, _i64, _i64, _i64, _i64, _i, _P(_sz)]),
    "fh_topk_from_logits": (_i, [_vp, _P(Tensor), _i64, _vp, _vp, _vp, _sz]),
    "fh_topk_fused": (_i, [_vp, _P(Tensor), _P(Tensor), _P(Tensor), _i64, _vp, _vp, _vp, _sz]),
}

_OPTION_STRUCTS = {"fh_linear_ce_options_init": LinearCEOptions,
                   "fh_distill_options_init": DistillOptions,
                   "fh_decode_options_init": DecodeOptions}


def _candidates():
    env = os.environ.get("FUSEDHEAD_LIBRARY")
    if env:
        # An explicit choice is the only one tried: silently falling back would hide a typo.
        return [env]
    here = os.path.dirname(os.path.abspath(__file__))
    out = [os.path.join(here, "libfusedhead.so"), os.path.join(here, "libfusedhead.dylib")]
    found = ctypes.util.find_library("fusedhead")
    if found:
        out.append(found)
    return out


def _load():
    errors = []
    for path in _candidates():
        if os.path.sep in path and not os.path.exists(path):
            errors.append("%s: no such file" % path)
            continue
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as exc:
            errors.append("%s: %s" % (path, exc))
    else:
        raise ImportError("fusedhead: cannot load libfusedhead (set FUSEDHEAD_LIBRARY to its path, "
                          "put it next to the package, or on the loader path): " + "; ".join(errors))
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    # The struct layouts here must be the library's: init writes sizeof(C struct) into the
    # first field. Init a generously sized scratch buffer, so a larger C struct cannot overrun it.
    for init, cls in _OPTION_STRUCTS.items():
        buf = ctypes.create_string_buffer(4096)
        getattr(lib, init)(ctypes.cast(buf, _vp))
        c_size = ctypes.c_size_t.from_buffer(buf).value
        if c_size != ctypes.sizeof(cls):
            raise ImportError("fusedhead: %s writes struct_size %d but the Python mirror %s has %d bytes "
                              "(python/fusedhead/_lib.py is out of date with include/fusedhead.h)"
                              % (init, c_size, cls.__name__, ctypes.sizeof(cls)))
    return lib, path


lib, library_path = _load()


def version():
    return lib.fh_version().decode()


_C_PREFIX = re.compile(r"^(fh_[a-z0-9_]+): ")


def check(status, fn=None):
    """Raise FusedHeadError carrying fh_last_error() when status is not FH_SUCCESS. With `fn`
    (the Python function the user called) the message is put in the user's terms: it starts
    with fn instead of the C function (named at the end), and option fields ("opts->top_k") are
    named as the keyword arguments that set them ("top_k")."""
    if status != SUCCESS:
        msg = lib.fh_last_error().decode(errors="replace")
        if fn is not None:
            m = _C_PREFIX.match(msg)
            cfn = m.group(1) if m else None
            body = msg[m.end():] if m else msg
            body = body.replace("opts->", "")
            msg = "%s: %s%s" % (fn, body, " (in %s)" % cfn if cfn else "")
        raise FusedHeadError(status, msg)


def no_double_backward(fn_name):
    """Wrap a custom Function's backward: the library computes first derivatives only, so a
    backward run with create_graph=True (grad mode on inside backward) raises instead of
    returning gradients that silently carry no graph (docs/conventions.md)."""
    def wrap(backward):
        once = torch.autograd.function.once_differentiable(backward)

        @functools.wraps(backward)
        def run(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError("%s: double backward (create_graph=True, a gradient of the gradient) is not "
                                   "supported: fusedhead computes first derivatives only" % fn_name)
            return once(ctx, *grads)
        return run
    return wrap


def new_options(cls, init_name):
    o = cls()
    getattr(lib, init_name)(ctypes.byref(o))
    return o


# ---------------------------------------------------------------------------------------------
# Contexts: one per thread and device (fh_last_error is thread-local, the CPU backend is
# thread-safe for distinct outputs; the CUDA stream is set before every call).
# ---------------------------------------------------------------------------------------------

class _Context:
    def __init__(self, backend, device):
        self.handle = _vp()
        check(lib.fh_context_create(ctypes.byref(self.handle), backend, device))
        _all_contexts.append(self)

    def destroy(self):
        if self.handle:
            lib.fh_context_destroy(self.handle)
            self.handle = _vp()


# Destroyed explicitly at exit: __del__ during interpreter teardown would run after ctypes'
# module globals are gone. Contexts of threads that ended stay alive until then (a few bytes).
_all_contexts = []


@atexit.register
def _destroy_contexts():
    while _all_contexts:
        _all_contexts.pop().destroy()


_local = threading.local()


def context_for(device):
    """The context for a torch device; for CUDA set to PyTorch's current stream (untested here:
    this machine has no GPU)."""
    cache = getattr(_local, "contexts", None)
    if cache is None:
        cache = _local.contexts = {}
    if device.type == "cpu":
        key = ("cpu", 0)
        backend, index = BACKEND_CPU, 0
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = ("cuda", index)
        backend = BACKEND_CUDA
    else:
        fail("fusedhead", "tensors on device %s are not supported (CPU or CUDA)" % device, ERR_UNSUPPORTED)
    ctx = cache.get(key)
    if ctx is None:
        ctx = cache[key] = _Context(backend, index)
    if backend == BACKEND_CPU:
        # The CPU backend's OpenMP teams follow PyTorch's intra-op thread count (docs/architecture.md).
        check(lib.fh_context_set_num_threads(ctx.handle, max(torch.get_num_threads(), 1)))
    if backend == BACKEND_CUDA:
        stream = torch.cuda.current_stream(torch.device("cuda", index)).cuda_stream
        check(lib.fh_context_set_stream(ctx.handle, _vp(stream)))
    return ctx.handle


def workspace(device, nbytes):
    """Workspace from PyTorch's allocator (0 bytes on the CPU backend). Returns (tensor, ptr)."""
    if nbytes == 0:
        return None, None
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buf, buf.data_ptr()


# ---------------------------------------------------------------------------------------------
# Tensor helpers
# ---------------------------------------------------------------------------------------------

def ptr(t):
    """Data pointer of a tensor or None (NULL)."""
    if t is None:
        return None
    if t.numel() == 0 and hasattr(t, "_fh_backing"):
        return t._fh_backing.data_ptr()
    return t.data_ptr() or None  # 0 (an empty tensor) -> NULL


def fh_dtype(fn, name, t):
    dt = TORCH_DTYPES.get(t.dtype)
    if dt is None:
        fail(fn, "%s has dtype %s (must be float32, float16, bfloat16 or float64)" % (name, t.dtype))
    return dt


def matrix(fn, name, t):
    """A 2-D tensor as (tensor kept alive, fh_tensor_t). Rows with unit column stride are passed
    with their row stride (no copy); anything else is made contiguous."""
    if t.dim() != 2:
        fail(fn, "%s must be 2-D (got shape %s)" % (name, tuple(t.shape)))
    dt = fh_dtype(fn, name, t)
    rows, cols = t.shape
    if t.numel() == 0:
        return t, Tensor(None, dt, rows, cols, cols)
    rs = t.stride(0) if rows > 1 else cols
    if not ((cols == 1 or t.stride(1) == 1) and rs >= cols):
        t = t.contiguous()
        rs = cols
    return t, Tensor(t.data_ptr(), dt, rows, cols, rs)


def vector_as_row(fn, name, t):
    """A 1-D tensor (a bias) as a 1 x n fh_tensor_t."""
    if t.dim() != 1:
        fail(fn, "%s must be 1-D (got shape %s)" % (name, tuple(t.shape)))
    return matrix(fn, name, t.unsqueeze(0))


def dense(fn, name, t, dtype, shape=None):
    """A contiguous buffer of `dtype` (converted), checked against `shape` when given."""
    if shape is not None and tuple(t.shape) != tuple(shape):
        fail(fn, "%s has shape %s (expected %s)" % (name, tuple(t.shape), tuple(shape)))
    return t.detach().to(dtype=dtype).contiguous()


def int64_buffer(fn, name, t, shape=None):
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        fail(fn, "%s has dtype %s (must be an integer dtype)" % (name, t.dtype))
    return dense(fn, name, t, torch.int64, shape)


def same_device(fn, **tensors):
    """PyTorch semantics: all tensors of one call on one device (checked before any pointer
    reaches C, which could not tell a host pointer from a device one)."""
    dev = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dev is None:
            dev, first = t.device, name
        elif t.device != dev:
            fail(fn, "%s is on %s but %s is on %s (all tensors must be on one device)"
                 % (name, t.device, first, dev))
    return dev


def stats_dtype(t):
    """Per-row float arrays are double for fp64 inputs (FH_DTYPE_F64), else float."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def out_buffer(shape, dtype, device):
    """An output tensor whose data pointer is never NULL: the library rejects a NULL required
    output even when it has 0 elements (reduction 'none' with N = 0)."""
    n = 1
    for d in shape:
        n *= d
    backing = torch.empty(max(n, 1), dtype=dtype, device=device)
    t = backing[:n].view(shape)
    t._fh_backing = backing  # data_ptr() of an empty view is 0; ptr() uses the backing store
    return t


def tensor_ptr(t):
    return ctypes.pointer(t) if t is not None else None
