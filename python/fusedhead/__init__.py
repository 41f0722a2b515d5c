"""fusedhead for PyTorch: fused LM-head losses and decoding over libfusedhead (ctypes).

CPU tensors run on the library's CPU reference backend (fp64 accumulation; float64 tensors are
supported there, e.g. for torch.autograd.gradcheck); CUDA tensors use the CUDA backend on the
tensor's device and PyTorch's current stream, with workspace from PyTorch's allocator.
The library is found through $FUSEDHEAD_LIBRARY, next to this package, or on the loader path.
"""
from ._lib import FusedHeadError, library_path, version
from .decode import (FLAG_ARGMAX_FALLBACK, FLAG_DEGENERATE, FLAG_GREEDY, SampleOutput, logsumexp, sample,
                     sample_fused, topk, topk_fused)
from .distill import distillation_loss, sparse_distillation_loss
from .linear_ce import CrossEntropyOutput, LinearCrossEntropyFunction, linear_cross_entropy

__all__ = ["FusedHeadError", "library_path", "version", "linear_cross_entropy", "LinearCrossEntropyFunction", "CrossEntropyOutput",
           "distillation_loss", "sparse_distillation_loss", "sample", "sample_fused", "topk", "topk_fused",
           "logsumexp", "SampleOutput", "FLAG_DEGENERATE", "FLAG_GREEDY", "FLAG_ARGMAX_FALLBACK"]
