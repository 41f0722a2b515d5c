"""Shared test helpers: import fusedhead from the source tree, seeded inputs, tolerances."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import fusedhead  # noqa: E402,F401

torch.set_num_threads(1)  # tiny shapes: threads only add noise and start-up time


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(g, *shape, dtype=torch.float64, scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def add_tests(cls, prefix, cases, make):
    """One test method per case (so each counts and fails on its own): make(case) -> method."""
    for name, case in cases.items():
        setattr(cls, "test_%s_%s" % (prefix, name), make(case))
