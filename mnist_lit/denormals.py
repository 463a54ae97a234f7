"""Subnormal floats flushed to zero on the CPU, in every thread that computes, or left as IEEE 754 has them.

    python -m mnist_lit fit --config configs/default.yaml                         # flushed (the default)
    python -m mnist_lit fit --config configs/default.yaml --flush_denormal false  # kept

Momentum buffers of weights whose gradient stays zero decay geometrically into the subnormal range, and some
CPUs compute on subnormals many times slower (measured: docs/benchmarks.md, "Subnormal floats"). Flushing them
(FTZ and DAZ) is what TensorFlow's thread pools and XLA's CPU client always do; accuracy is unchanged.

``torch.set_flush_denormal`` sets the calling thread's MXCSR only, and OpenMP's workers inherit it only when they
are created after the call. So the setting is also made inside one OpenMP parallel region of the pool torch
uses (libgomp's, the one torch's Linux wheels bundle), which reaches every worker that exists now; the workers
created later inherit it from the thread that creates them. ``flushed`` measures the result over all of them.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

_EACH = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def openmp() -> ctypes.CDLL | None:
    """torch's libgomp, already loaded by torch (the same library: one pool), or None (another OpenMP, no OpenMP)."""
    for path in (Path(torch.__file__).parent / "lib" / "libgomp.so.1", Path("libgomp.so.1")):
        try:
            lib = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD)
        except (OSError, AttributeError):
            continue
        lib.GOMP_parallel.argtypes = [_EACH, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        return lib
    return None


def set_flush_denormal(on: bool) -> bool:
    """Flush subnormals (or stop) in this thread and in every OpenMP worker of torch's pool; whether the CPU can."""
    supported = torch.set_flush_denormal(on)
    lib = openmp()
    if supported and lib is not None:
        each = _EACH(lambda _: torch.set_flush_denormal(on) and None)
        lib.GOMP_parallel(each, None, torch.get_num_threads(), 0)
    return supported


def flushed() -> bool:
    """Whether subnormals are flushed in every thread that computes: half the smallest normal float, computed by a
    multiplication large enough to be spread over all of torch's threads, is zero everywhere."""
    return not (torch.full((1 << 22,), torch.finfo(torch.float32).tiny) * 0.5).count_nonzero().item()
